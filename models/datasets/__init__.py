"""Datasets: the synthetic audio-video emotion set (:mod:`.data`), readers of RAVDESS,
CREMA-D (:mod:`.corpora`, ``build_corpus``) and CMU-MOSEI (:mod:`.mosei`) on local disk,
with what only they use: media decoding (:mod:`.media`) and the on-disk cache of features
computed once per file (:mod:`.feature_cache`)."""
