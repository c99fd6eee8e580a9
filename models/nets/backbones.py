"""Unimodal encoders of the CBGP seed paper: a 2D CNN on spectrogram images and a 3D CNN on
frame clips. Each maps its input to an embedding vector that the fusion heads combine.

The paper fixes channels, kernels, pooling, ReLU and dropout. Two choices are ours:

- Global average pooling turns the last feature map into the embedding (the paper does
  not say how): the encoders then take any input size (224 x 224 in the paper, 32 x 32
  in the CPU tests) and add no parameters, so the fusion heads are what differs.
- Batch norm after every convolution. Without it the pooled embeddings of different clips
  differed by under 1% at initialisation, and on the synthetic data the LMF and TFN heads
  learnt nothing past arousal in 15 epochs; with it every head trains in a few epochs.
  Batch statistics are per process under DistributedDataParallel on CPU (PyTorch's
  SyncBatchNorm needs CUDA).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class AudioCNN(nn.Module):
    """2D CNN on (B, 1, H, W) spectrogram images -> (B, channels[-1]).

    Per stage: 3 x 3 convolution (stride 1, same padding), batch norm, ReLU, 2 x 2 max
    pooling; then global average pooling and dropout. Paper defaults: channels
    32-64-128-256, dropout 0.3.
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 128, 256), *, in_channels: int = 1, dropout: float = 0.3):
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in zip((in_channels, *channels[:-1]), channels):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2, ceil_mode=True)]
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.out_dim = channels[-1]

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.features(spectrogram).mean(dim=(-2, -1)))


class VideoCNN(nn.Module):
    """3D CNN on (B, 3, T, H, W) clips -> (B, channels[-1]).

    Per stage: 3 x 3 x 3 convolution (stride 1, same padding), batch norm, ReLU, max
    pooling; then global average pooling and dropout. Paper defaults: channels 64-128-256-512, dropout
    0.2, pooling "3 x 3 x 3 / 2 x 2 x 2", which we read as kernel 3 with stride 2 (padding
    1, so even a single frame survives every stage); ``pool_kernel=2`` gives plain 2 x 2 x 2
    pooling instead.
    """

    def __init__(
        self,
        channels: Sequence[int] = (64, 128, 256, 512),
        *,
        in_channels: int = 3,
        dropout: float = 0.2,
        pool_kernel: int = 3,
    ):
        super().__init__()
        if pool_kernel not in (2, 3):
            raise ValueError(f"pool_kernel must be 2 or 3, got {pool_kernel}")
        layers: list[nn.Module] = []
        for c_in, c_out in zip((in_channels, *channels[:-1]), channels):
            pool = nn.MaxPool3d(3, stride=2, padding=1) if pool_kernel == 3 else nn.MaxPool3d(2, ceil_mode=True)
            layers += [nn.Conv3d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True),
                       pool]
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.out_dim = channels[-1]

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.features(clip).mean(dim=(-3, -2, -1)))


def torchvision_r3d_18(*, pretrained: bool = False) -> nn.Module:
    """torchvision's R3D-18 with its classifier removed: (B, 3, T, H, W) -> (B, 512).

    Optional: needs a torchvision that imports alongside the installed torch. ``pretrained``
    downloads the Kinetics-400 weights (clips normalised with
    :data:`models.features.frontends.KINETICS_MEAN` / ``KINETICS_STD``, as :func:`normalize_clip` does).
    """
    try:
        from torchvision.models.video import R3D_18_Weights, r3d_18
    except Exception as error:  # a torchvision built for another torch fails in many ways
        raise ImportError(f"the r3d_18 backbone needs a working torchvision ({error})") from error
    model = r3d_18(weights=R3D_18_Weights.KINETICS400_V1 if pretrained else None)
    model.fc = nn.Identity()
    model.out_dim = 512
    return model
