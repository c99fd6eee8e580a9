"""An operational neural network (ONN) on a key frame and a mel spectrogram, the review
seed's (004) account of Aktürk & Keçeli (2024), "Deep operational audio-visual emotion
recognition".

Operational layer (:class:`SelfONN2d`), after the self-organised ONNs of Kiranyaz et al.:
a convolution neuron sums w * x over its receptive field; an operational neuron applies a
non-linear nodal operator to each input first. With the operator a truncated Maclaurin
(Taylor at 0) series, psi(x) = w_1 x + w_2 x^2 + ... + w_Q x^Q, a layer of them is

    y = b + sum_{q=1..Q} W_q * x^q        (* the 2D convolution, x^q elementwise)

x (B, C_in, H, W) -> y (B, C_out, H', W'); each W_q is a learned (C_out, C_in, k, k)
kernel, and Q = 1 is a plain convolution. It is computed as one convolution over the
channel concatenation [x, x^2, ..., x^Q] with a (C_out, Q C_in, k, k) kernel, whose q-th
block of input channels is W_q. Powers of a bounded input stay bounded: every layer's
input lies in [-1, 1] (tanh after each layer; the network's inputs scaled to [-1, 1]).

Network (:class:`OperationalAVNet`), two parallel branches as in the review ("The key
frame image and Mel spectrogram are processed independently in each branch using
operational layers"), then "combined into a single feature vector": per branch, blocks
of operational layer, max pooling by 2 and tanh, then global average pooling; the two
vectors are concatenated, dropped out and classified by a linear layer.

Key-frame selection (:func:`select_key_frames`), one frame per clip. The review lists
LUV colour differences between consecutive frames, brightness, entropy, contrast with
histogram clustering, and the variance of the Laplacian (sharpness). We keep its first
and last steps: (1) a frame's change is its mean absolute difference from the previous
frame (the first frame's, from the second); frames whose change is at least the clip's
median change are kept; (2) of those, the one whose Laplacian has the largest variance
is the key frame. The differences are taken on the frames as the model receives them
(normalised RGB) rather than in LUV, and the brightness, entropy and clustering filters
are left out (our simplification: a change filter, then the sharpest frame).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


class SelfONN2d(nn.Module):
    """Operational 2D layer: y = b + sum_{q=1..Q} W_q * x^q; (B, C_in, H, W) -> (B, C_out, H', W').
    ``kernel_size``, ``stride`` and ``padding`` are those of every W_q's convolution."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, q: int = 3, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        super().__init__()
        if q < 1:
            raise ValueError(f"q (the Maclaurin series' order) must be at least 1, got {q}")
        self.in_channels, self.q = in_channels, q
        self.conv = nn.Conv2d(q * in_channels, out_channels, kernel_size, stride, padding, bias=bias)

    def kernel(self, power: int) -> torch.Tensor:
        """W_power, the (C_out, C_in, k, k) kernel applied to x^power (power in 1..q)."""
        if not 1 <= power <= self.q:
            raise ValueError(f"power must lie in [1, {self.q}], got {power}")
        return self.conv.weight[:, (power - 1) * self.in_channels:power * self.in_channels]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        return self.conv(torch.cat([x**power for power in range(1, self.q + 1)], dim=1))


@torch.no_grad()
def key_frame_indices(video: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) clips -> (B,) index of each clip's key frame (module docstring)."""
    if video.dim() != 5:
        raise ValueError(f"expected video (B, C, T, H, W), got {tuple(video.shape)}")
    if video.shape[2] == 1:
        return torch.zeros(video.shape[0], dtype=torch.long, device=video.device)
    step = (video[:, :, 1:] - video[:, :, :-1]).abs().mean(dim=(1, 3, 4))  # (B, T - 1)
    change = torch.cat([step[:, :1], step], dim=1)  # (B, T)
    keep = change >= change.quantile(0.5, dim=1, keepdim=True)
    grey = video.mean(1).flatten(0, 1)[:, None]  # (B T, 1, H, W)
    laplacian = F.conv2d(grey, _LAPLACIAN.to(grey)[None, None])
    sharpness = laplacian.flatten(1).var(1).view(video.shape[0], -1)  # (B, T)
    return sharpness.masked_fill(~keep, float("-inf")).argmax(1)


def select_key_frames(video: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) clips -> (B, C, H, W), each clip's key frame."""
    index = key_frame_indices(video)
    return video[torch.arange(video.shape[0], device=video.device), :, index]


def _to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Each example min-max scaled to [-1, 1] (a constant example to 0)."""
    low = x.flatten(1).amin(1).view(-1, *[1] * (x.dim() - 1))
    high = x.flatten(1).amax(1).view(-1, *[1] * (x.dim() - 1))
    return (2 * (x - low) / (high - low).clamp_min(1e-12) - 1).clamp(-1, 1)


def operational_branch(in_channels: int, channels: Sequence[int], kernel_size: int, q: int) -> nn.Sequential:
    """Blocks of operational layer (same size), max pooling by 2 and tanh; then global
    average pooling: (B, in_channels, H, W) -> (B, channels[-1])."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip((in_channels, *channels[:-1]), channels):
        layers += [SelfONN2d(c_in, c_out, kernel_size, q=q, padding=kernel_size // 2),
                   nn.MaxPool2d(2, ceil_mode=True), nn.Tanh()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


class OperationalAVNet(nn.Module):
    """forward(audio (B, 1, F, W) mel spectrogram, video (B, 3, T, H, W)) -> (B, num_classes)
    logits: the key frame and the spectrogram through parallel operational branches."""

    def __init__(self, num_classes: int, *, audio_in: int = 1, video_in: int = 3,
                 channels: Sequence[int] = (32, 64, 128), kernel_size: int = 3, q: int = 3, dropout: float = 0.2):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {kernel_size}")
        self.audio_branch = operational_branch(audio_in, channels, kernel_size, q)
        self.video_branch = operational_branch(video_in, channels, kernel_size, q)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * channels[-1], num_classes)

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        if audio.dim() == 3:
            audio = audio.unsqueeze(1)
        frame = select_key_frames(video)
        fused = torch.cat([self.audio_branch(_to_unit_range(audio)), self.video_branch(_to_unit_range(frame))], -1)
        return self.classifier(self.dropout(fused))
