"""``python -m models.train`` (also ``torchrun ... -m models.train``): runs the training CLI
of :mod:`models.experiments.train`, whose docstring has the usage."""

from models.experiments.train import main

if __name__ == "__main__":
    main()
