"""AVT-CA: Audio-Video Transformer fusion with Cross Attention (Venkatraman et al. 2024).

    audio (B, F, L) ─ conv blocks, stage 1 ─┐            ┌─ stage 2 ─ self-attn* ─ cross-attn ─ mean ─┐
                                            ├ transformer┤                                            + ─ linear
    frames (B, 3, T, H, W) ─ frame encoder ─┘  fusion    └─ stage 2 ─ self-attn* ─ cross-attn ─ mean ─┘
      per frame: stem, channel + spatial attention, local feature extractor, inverted
      residual stages, global pooling; then temporal conv blocks, stage 1

- Frame encoder (EfficientFace-style): a strided stem; the first inverted-residual stage
  re-weighted by channel and spatial attention, plus a local feature extractor that gives
  each quadrant of the face its own filters; two more inverted-residual stages; a 1 x 1
  convolution and global average pooling give one vector per frame.
- Transformer fusion, after stage 1: two blocks, audio queries attending to video and
  video queries attending to audio (pre-norm cross-attention and MLP, residual).
- Self-attention exchange (*): one multi-head self-attention whose weights both modalities
  share, applied to each, after stage 2.
- Multi-head cross attention: audio attends to video and video to audio once more.
- Pooling and sum: the mean over time of each modality, summed, then a linear classifier.

Every attention uses ``torch.nn.functional.scaled_dot_product_attention``.

Ablations (``ABLATIONS``), our reading of the paper's IT-k / CT-k rows: IT is the
intermediate-transformer baseline (no final cross attention), CT the full model with it,
k the number of attention heads. Defaults are the paper's sizes (EfficientFace stages
29-116-232-464, 4-8-4 blocks, 1024-d frames; audio conv 64-128-256-128; temporal conv
64-64-128-128); :mod:`models.zoo` has the CPU size.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ABLATIONS = {
    "it-1": {"cross_attention": False, "num_heads": 1},
    "it-4": {"cross_attention": False, "num_heads": 4},
    "ct-1": {"cross_attention": True, "num_heads": 1},
    "ct-4": {"cross_attention": True, "num_heads": 4},
}


def _conv1d_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(c_in, c_out, 3, padding=1), nn.BatchNorm1d(c_out), nn.ReLU(inplace=True))


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class ChannelSpatialAttention(nn.Module):
    """x * channel weights (a bottleneck MLP on average- and max-pooled channels) * spatial
    weights (a 7 x 7 convolution over the channel mean and max), both sigmoids."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.channel_mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )
        self.spatial_conv = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = torch.sigmoid(self.channel_mlp(x.mean(dim=(2, 3))) + self.channel_mlp(x.amax(dim=(2, 3))))
        x = x * channel[:, :, None, None]
        spatial = torch.sigmoid(self.spatial_conv(torch.stack([x.mean(1), x.amax(1)], dim=1)))
        return x * spatial


class LocalFeatureExtractor(nn.Module):
    """Each quadrant of the map gets its own stride-2 depthwise-separable convolution, so the
    four face regions learn separate filters; the outputs are tiled back together."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.quadrants = nn.ModuleList(
            nn.Sequential(_conv_bn_relu(c_in, c_in, 3, stride=2, groups=c_in), _conv_bn_relu(c_in, c_out, 1))
            for _ in range(4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % 4 or w % 4:
            raise ValueError(f"the local feature extractor needs a map size divisible by 4, got {h} x {w}")
        top, bottom = x.split(h // 2, dim=2)
        parts = [p for half in (top, bottom) for p in half.split(w // 2, dim=3)]
        out = [net(p) for net, p in zip(self.quadrants, parts)]
        return torch.cat([torch.cat(out[:2], dim=3), torch.cat(out[2:], dim=3)], dim=2)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1 x 1 expansion, 3 x 3 depthwise (stride), linear 1 x 1 projection;
    an identity shortcut when the shape is unchanged."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int = 4):
        super().__init__()
        hidden = c_in * expansion
        self.block = nn.Sequential(
            _conv_bn_relu(c_in, hidden, 1),
            _conv_bn_relu(hidden, hidden, 3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.shortcut = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.shortcut else self.block(x)


class FrameEncoder(nn.Module):
    """(N, 3, H, W) face frames -> (N, out_dim); H and W divisible by 16 (the local feature
    extractor splits the stride-4 map into quadrants)."""

    def __init__(self, stage_channels: Sequence[int], stage_repeats: Sequence[int], out_dim: int):
        super().__init__()
        if len(stage_channels) != 4 or len(stage_repeats) != 3:
            raise ValueError("stage_channels needs 4 entries (stem + 3 stages), stage_repeats 3")
        self.stem = nn.Sequential(
            _conv_bn_relu(3, stage_channels[0], 3, stride=2), nn.MaxPool2d(3, stride=2, padding=1)
        )
        stages = []
        for c_in, c_out, repeats in zip(stage_channels[:-1], stage_channels[1:], stage_repeats):
            blocks = [InvertedResidual(c_in, c_out, 2)]
            blocks += [InvertedResidual(c_out, c_out, 1) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*blocks))
        self.stage2, self.stage3, self.stage4 = stages
        self.attention = ChannelSpatialAttention(stage_channels[1])
        self.local = LocalFeatureExtractor(stage_channels[0], stage_channels[1])
        self.head = _conv_bn_relu(stage_channels[-1], out_dim, 1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.stem(frames)
        x = self.attention(self.stage2(x)) + self.local(x)
        return self.head(self.stage4(self.stage3(x))).mean(dim=(2, 3))


class MultiHeadAttention(nn.Module):
    """Queries (B, Lq, query_dim) attend to a context (B, Lk, context_dim) -> (B, Lq, query_dim)."""

    def __init__(self, query_dim: int, context_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if query_dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the query dimension ({query_dim})")
        self.num_heads, self.dropout = num_heads, dropout
        self.to_query = nn.Linear(query_dim, query_dim)
        self.to_key_value = nn.Linear(context_dim, 2 * query_dim)
        self.out = nn.Linear(query_dim, query_dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, heads, L, D / heads)
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        key, value = self.to_key_value(context).chunk(2, dim=-1)
        attended = F.scaled_dot_product_attention(
            heads(self.to_query(query)), heads(key), heads(value), dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(attended.transpose(1, 2).flatten(2))


class TransformerFusionBlock(nn.Module):
    """Pre-norm transformer block whose attention reads the other modality:
    x + attn(LN(x), LN(context)), then + MLP(LN(.))."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, dropout: float = 0.0, mlp_ratio: int = 2):
        super().__init__()
        self.norm_query, self.norm_context = nn.LayerNorm(dim), nn.LayerNorm(context_dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.attention = MultiHeadAttention(dim, context_dim, num_heads, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm_query(x), self.norm_context(context))
        return x + self.mlp(self.norm_mlp(x))


class AVTCA(nn.Module):
    """AVT-CA. forward(audio (B, F, L) or (B, 1, F, L), frames (B, 3, T, H, W)) -> (B, num_classes)."""

    def __init__(
        self,
        num_classes: int,
        *,
        audio_in: int = 128,
        audio_channels: Sequence[int] = (64, 128, 256, 128),
        stage_channels: Sequence[int] = (29, 116, 232, 464),
        stage_repeats: Sequence[int] = (4, 8, 4),
        frame_dim: int = 1024,
        temporal_channels: Sequence[int] = (64, 64, 128, 128),
        num_heads: int = 4,
        cross_attention: bool = True,
        dropout: float = 0.1,
    ):
        super().__init__()
        if len(audio_channels) != 4 or len(temporal_channels) != 4:
            raise ValueError("audio_channels and temporal_channels need 4 entries: two blocks per stage")
        if audio_channels[-1] != temporal_channels[-1]:
            raise ValueError(
                f"audio and video end in the same width to share attention and be summed, "
                f"got {audio_channels[-1]} and {temporal_channels[-1]}"
            )
        a, t = audio_channels, temporal_channels
        self.audio_stage1 = nn.Sequential(_conv1d_block(audio_in, a[0]), _conv1d_block(a[0], a[1]))
        self.audio_stage2 = nn.Sequential(_conv1d_block(a[1], a[2]), _conv1d_block(a[2], a[3]))
        self.frame_encoder = FrameEncoder(stage_channels, stage_repeats, frame_dim)
        self.video_stage1 = nn.Sequential(_conv1d_block(frame_dim, t[0]), _conv1d_block(t[0], t[1]))
        self.video_stage2 = nn.Sequential(_conv1d_block(t[1], t[2]), _conv1d_block(t[2], t[3]))
        self.fuse_audio = TransformerFusionBlock(a[1], t[1], num_heads, dropout)
        self.fuse_video = TransformerFusionBlock(t[1], a[1], num_heads, dropout)
        dim = a[3]
        self.self_attention = MultiHeadAttention(dim, dim, num_heads, dropout)
        self.cross_audio = MultiHeadAttention(dim, dim, num_heads, dropout) if cross_attention else None
        self.cross_video = MultiHeadAttention(dim, dim, num_heads, dropout) if cross_attention else None
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, audio: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        if audio.dim() == 4:
            audio = audio.squeeze(1)
        batch, _, num_frames = frames.shape[:3]
        per_frame = self.frame_encoder(frames.transpose(1, 2).flatten(0, 1))  # (B T, frame_dim)
        video = self.video_stage1(per_frame.unflatten(0, (batch, num_frames)).transpose(1, 2))
        audio = self.audio_stage1(audio)
        a, v = audio.transpose(1, 2), video.transpose(1, 2)  # (B, L, C) tokens
        a, v = self.fuse_audio(a, v), self.fuse_video(v, a)
        a = self.audio_stage2(a.transpose(1, 2)).transpose(1, 2)
        v = self.video_stage2(v.transpose(1, 2)).transpose(1, 2)
        a, v = a + self.self_attention(a, a), v + self.self_attention(v, v)
        if self.cross_audio is not None:
            a, v = a + self.cross_audio(a, v), v + self.cross_video(v, a)
        return self.classifier(a.mean(1) + v.mean(1))
