"""Front-ends, tensors in and features out, no files: spectrogram images and clip
normalisation (:mod:`.frontends`), the hand-crafted audio and video descriptors
(:mod:`.handcrafted`) and MFA fusion of feature vectors (:mod:`.mfa`)."""
