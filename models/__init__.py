"""Reference models of the audio-video emotion papers fastfusion grew from, built on its
fusion modules, with a synthetic dataset, training, metrics and a comparison report.

- :mod:`models.zoo`: every model by name (``build_model``), at "paper" and "tiny" sizes;
- :mod:`models.backbones`, :mod:`models.heads`: the CBGP paper's CNN encoders and its
  fusion heads (early, late, hybrid, MFB, CBP, CBGP, LMF, TFN);
- :mod:`models.sequence_fusion`: the LMF and TFN models with LSTM sub-networks;
- :mod:`models.avt_ca`: AVT-CA and its ablations;
- :mod:`models.frontends`: spectrogram images and clip normalisation;
- :mod:`models.data`: the synthetic audio-video emotion dataset;
- :mod:`models.corpora`, :mod:`models.mosei`: readers of RAVDESS, CREMA-D and CMU-MOSEI
  on local disk (``build_corpus``), with :mod:`models.media` (decoding) and
  :mod:`models.feature_cache` (features computed once per file);
- :mod:`models.seed_zoo`: the seed systems by name (``build_seed_model``,
  ``build_mosei_model``): :mod:`models.mfa_cnn` (hand-crafted features of
  :mod:`models.handcrafted`, :mod:`models.mfa` fusion, :mod:`models.cnn1d`),
  :mod:`models.cross_attention_triplet` and :mod:`models.decision_fusion`;
- :mod:`models.metrics`: the papers' metrics;
- ``python -m models.train``: training and evaluation (torchrun for several processes);
- ``python -m models.compare``: the fused-vs-reference comparison report.

This package lives in the repository beside ``fastfusion`` and is not installed with it;
run it from the repository root.
"""

from .zoo import MODEL_NAMES, build_model, data_config

__all__ = ["MODEL_NAMES", "build_model", "data_config"]
