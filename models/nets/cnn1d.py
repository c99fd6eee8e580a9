"""The 1D-CNN classifier of the CNN/MFA seed system (seed 002), after the paper's layer table.

The table (Keras names, "valid" convolutions of kernel 3, Keras' default max pooling whose
stride is its size):

    ==============  =============  ========  =================================
    layer           output shape   params    as printed / as derived
    ==============  =============  ========  =================================
    conv1d          (160, 256)      1,024    printed (168, 256) and 1,824
    max_pooling1d   (53, 256)           0
    conv1d_1        (51, 128)      98,432
    max_pooling1d   (17, 128)           0    then dropout
    conv1d_2        (15, 64)       24,640    printed 24,648
    max_pooling1d   (5, 64)             0    then dropout
    conv1d_3        (3, 64)        12,352
    max_pooling1d   (3, 64)             0    leaves the length: pool size 1
    conv1d_4        (1, 32)         6,176
    max_pooling1d   (1, 32)             0    leaves the length: pool size 1
    flatten         (32,)               0
    dense           (256,)          8,448    ReLU, then dropout 0.2
    dense_1         (6,)            1,542    softmax
    ==============  =============  ========  =================================

How the printed table is reconciled with its own "Total params: 152,614": a Conv1D of
kernel k from c_in to c_out channels has (k c_in + 1) c_out parameters. The printed first
row, 1,824 = 7.125 x 256, and third row, 24,648 = 385.125 x 64, fit no whole number of
input channels; the printed rows sum to 153,422. With one input channel the first row is
(3 + 1) 256 = 1,024 and the third (3 x 128 + 1) 64 = 24,640, and then the rows sum to
exactly 152,614. Both misprints are an 8 where a 0 belongs. The shape column has the
same misprint: 168 cannot pool to 53 by 3 (it gives 56, and the next rows would read
54, 18, 16), while 160 gives 53, 51, 17, 15, 5, 3 and 1 as printed. So the first
convolution outputs 160 steps and the input is 162 long (the issue read 168 + 2 = 170;
170 reproduces the printed parameters too, but four rows of shapes would be wrong).

Math, per block i: x <- maxpool_{p_i}(ReLU(conv_k(x))) (a dropout after the blocks in
``dropout_after``); then logits = W_2 dropout(ReLU(W_1 flatten(x) + b_1)) + b_2. The
paper's softmax is left to the loss (cross-entropy takes logits). The convolutions' "Act"
is not named in the paper; ReLU, as in its dense layers.

Input: (B, L) one-channel signals or (B, in_channels, L) sequences, L = ``input_length``
(the flatten makes the classifier's width depend on it, as in Keras).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

# The paper's table: widths, kernel, pool sizes, which blocks a dropout follows (0-based).
PAPER_CHANNELS = (256, 128, 64, 64, 32)
PAPER_POOLS = (3, 3, 3, 1, 1)
PAPER_DROPOUT_AFTER = (1, 2)
PAPER_INPUT_LENGTH = 162


def output_length(input_length: int, kernel_size: int, pools: Sequence[int]) -> list[int]:
    """The length after each block (valid convolution then pooling by floor division)."""
    lengths, length = [], input_length
    for pool in pools:
        length = (length - kernel_size + 1) // pool
        lengths.append(length)
    return lengths


class Conv1DClassifier(nn.Module):
    """(B, L) or (B, in_channels, L) -> (B, num_classes) logits. Defaults are seed 002's table."""

    def __init__(
        self,
        num_classes: int = 6,
        *,
        input_length: int = PAPER_INPUT_LENGTH,
        in_channels: int = 1,
        channels: Sequence[int] = PAPER_CHANNELS,
        kernel_size: int = 3,
        pools: Sequence[int] = PAPER_POOLS,
        dropout_after: Sequence[int] = PAPER_DROPOUT_AFTER,
        hidden: int = 256,
        dropout: float = 0.2,
    ):
        super().__init__()
        if len(pools) != len(channels):
            raise ValueError(f"pools needs one size per block ({len(channels)}), got {tuple(pools)}")
        if any(not 0 <= i < len(channels) for i in dropout_after):
            raise ValueError(f"dropout_after must index the {len(channels)} blocks, got {tuple(dropout_after)}")
        lengths = output_length(input_length, kernel_size, pools)
        if min(lengths) < 1:
            raise ValueError(f"input_length {input_length} is too short for kernel {kernel_size} and pools "
                             f"{tuple(pools)}: the blocks leave lengths {lengths}")
        self.in_channels, self.input_length = in_channels, input_length
        layers: list[nn.Module] = []
        for i, (c_in, c_out, pool) in enumerate(zip((in_channels, *channels[:-1]), channels, pools)):
            layers += [nn.Conv1d(c_in, c_out, kernel_size), nn.ReLU(inplace=True)]
            if pool > 1:  # the table's size-1 poolings leave the length as it is
                layers.append(nn.MaxPool1d(pool))
            if i in dropout_after:
                layers.append(nn.Dropout(dropout))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(channels[-1] * lengths[-1], hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, num_classes),
        )
        # Keras' defaults, as the table was built with: Glorot-uniform weights, zero biases.
        # (PyTorch's smaller default init leaves this deep, unnormalised stack slow to start.)
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        if x.dim() != 3 or x.shape[1:] != (self.in_channels, self.input_length):
            raise ValueError(f"expected (B, {self.input_length}) or (B, {self.in_channels}, {self.input_length}), "
                             f"got {tuple(x.shape)}")
        return self.head(self.features(x))
