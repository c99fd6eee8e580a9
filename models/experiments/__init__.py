"""Experiments: training and evaluation (:mod:`.train`, run as ``python -m models.train``),
the papers' metrics (:mod:`.metrics`) and the fused-vs-reference comparison report
(:mod:`.compare`, run as ``python -m models.compare``)."""
