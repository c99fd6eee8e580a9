"""``python -m models.compare``: runs the comparison report of
:mod:`models.experiments.compare`, whose docstring has the usage."""

from models.experiments.compare import main

if __name__ == "__main__":
    main()
