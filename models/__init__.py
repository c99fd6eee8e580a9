"""Reference models of the audio-video emotion papers fastfusion grew from, built on its
fusion modules, with a synthetic dataset, training, metrics and a comparison report.
Laid out by role:

- :mod:`models.zoo`: every model by name (``build_model``, ``MODEL_NAMES``), at "paper"
  and "tiny" sizes, the seed systems and the CMU-MOSEI sequence models included;
- :mod:`models.nets`: the networks (CNN encoders and fusion heads, LMF and TFN with LSTM
  sub-networks, AVT-CA, MFA + 1D-CNN, cross-attention with the triplet loss, decision
  fusion, the operational network);
- :mod:`models.features`: front-ends (spectrogram images, hand-crafted descriptors, MFA);
- :mod:`models.datasets`: the synthetic dataset and the readers of RAVDESS, CREMA-D and
  CMU-MOSEI on local disk (``build_corpus``), with media decoding and the feature cache;
- :mod:`models.experiments`: training, the papers' metrics and the comparison report;
- ``python -m models.train``: training and evaluation (torchrun for several processes);
- ``python -m models.compare``: the fused-vs-reference comparison report.

This package lives in the repository beside ``fastfusion`` and is not installed with it;
run it from the repository root.
"""

from .zoo import MODEL_NAMES, build_model, data_config

__all__ = ["MODEL_NAMES", "build_model", "data_config"]
