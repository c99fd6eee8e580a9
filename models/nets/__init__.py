"""The networks: the CBGP paper's CNN encoders (:mod:`.backbones`) and fusion heads
(:mod:`.heads`), the LMF and TFN models with LSTM sub-networks (:mod:`.sequence_fusion`),
AVT-CA (:mod:`.avt_ca`), and the seed systems' networks: :mod:`.mfa_cnn` over
:mod:`.cnn1d`, :mod:`.cross_attention_triplet`, :mod:`.decision_fusion`, :mod:`.onn`.
Build them by name with :func:`models.zoo.build_model`."""
