"""The 1D-CNN classifier of the CNN/MFA seed system.

From the paper: a one-dimensional convolutional network classifies the fused hand-crafted
features. The paper's layer table is not available to us, so the sizes below are our
choice, in the shape such 1D-CNNs for speech emotion usually take: per block a
convolution (same padding), batch norm, ReLU and max pooling by 2; then global average
pooling, dropout, a hidden layer and the classifier. Every size is a constructor argument,
so the paper's table can be set once known.

Input is a batch of 1-channel signals (B, L), such as MFA-fused vectors, or of
multi-channel sequences (B, C, L), such as frame-level features with C features per step.
Pooling uses ``ceil_mode`` so that short inputs (a 16-component MFA vector through three
blocks) never shrink to nothing.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Conv1DClassifier(nn.Module):
    """(B, L) or (B, in_channels, L) -> (B, num_classes) logits."""

    def __init__(
        self,
        num_classes: int,
        *,
        in_channels: int = 1,
        channels: Sequence[int] = (64, 128, 128),
        kernel_size: int = 5,
        hidden: int = 128,
        dropout: float = 0.3,
    ):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {kernel_size}")
        self.in_channels = in_channels
        layers: list[nn.Module] = []
        for c_in, c_out in zip((in_channels, *channels[:-1]), channels):
            layers += [nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2), nn.BatchNorm1d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool1d(2, ceil_mode=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(channels[-1], hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, L) or (B, {self.in_channels}, L), got {tuple(x.shape)}")
        return self.head(self.features(x).mean(-1))
