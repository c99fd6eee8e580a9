"""AVT-CA: Audio-Video Transformer fusion with Cross Attention (Venkatraman et al. 2024).

    audio (B, F, L) ─ conv blocks, stage 1 ─┐   IT    ┌─ stage 2 ─┐    CT: exchange,  ┌─ max ─┐
                                            ├ trans- ─┤           ├─── then multi- ───┤       + ─ linear
    frames (B, 3, T, H, W) ─ frame encoder ─┘ former  └─ stage 2 ─┘    head attention └─ max ─┘
      per frame: stem, channel + spatial attention, local feature extractor, inverted
      residual stages, global pooling; then temporal conv blocks, stage 1

- Convolution blocks: kernel 3, batch norm, ReLU; the audio ones end in max pooling, the
  video (temporal) ones do not ("the video output is processed through two similar
  convolutional blocks but without max pooling").
- Frame encoder (EfficientFace-style): a strided stem; the first inverted-residual stage
  re-weighted by channel and spatial attention, plus a local feature extractor that gives
  each quadrant of the face its own filters; two more inverted-residual stages; a 1 x 1
  convolution and global average pooling give one vector per frame.
- IT, intermediate transformer fusion, after stage 1 (the paper's Algorithm 6): audio
  queries read video and video queries read audio, each through a block with batch norm
  on both inputs, attention, dropout, batch norm, MLP and batch norm; each stream adds
  its block's output (X_audio = h_AV + A_conv).
- CT, cross attention, after stage 2: each modality attends to the other, added to its
  stream (the paper's "self-attention blocks ... allowing each modality to attend to the
  other"), then a multi-head attention over each stream (Algorithm 10's
  crossAttention(X'_audio, e, n_heads)).
- Max pooling over time of each modality ("pooled using max pooling"), the two summed
  ("combined by addition"), then a linear classifier (the softmax is in the loss).

Direction of the attentions: a stream's queries come from the stream that receives the
result, since attention returns one vector per query and the result is added to that
stream (audio and video have different lengths). The paper's prose names the other
direction ("the audio output acts as the key, and the video output serves as the query"
for the block whose output "is added back to the original audio output"), which only
type-checks when both streams have one length; its Algorithm 10 passes
selfAttention(X_visual, X_audio) for the audio stream, as we do (context, then query).

Every attention uses ``torch.nn.functional.scaled_dot_product_attention``.

Ablations (``ABLATIONS``), the paper's rows: IT-k is the model with only the
intermediate transformer fusion, CT-k the model with only the cross attention, k heads;
the full AVT-CA (``FULL``) is IT-4 + CT-4. Defaults are the paper's sizes (EfficientFace
stages 29-116-232-464, 4-8-4 blocks, 1024-d frames; audio conv 64-128-256-128; temporal
conv 64-64-128-128); :mod:`models.zoo` has the CPU size.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# The paper's ablation rows: IT-k keeps only the intermediate transformer fusion, CT-k
# only the cross attention, with k heads; the full model is IT-4 + CT-4.
ABLATIONS = {
    "it-1": {"transformer_fusion": True, "cross_attention": False, "num_heads": 1},
    "it-4": {"transformer_fusion": True, "cross_attention": False, "num_heads": 4},
    "ct-1": {"transformer_fusion": False, "cross_attention": True, "num_heads": 1},
    "ct-4": {"transformer_fusion": False, "cross_attention": True, "num_heads": 4},
}
FULL = {"transformer_fusion": True, "cross_attention": True, "num_heads": 4}


def _conv1d_block(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    """Convolution (kernel 3, same length), batch norm, ReLU; for audio, max pooling by 2
    (ceil mode, so a short clip keeps one step)."""
    layers = [nn.Conv1d(c_in, c_out, 3, padding=1), nn.BatchNorm1d(c_out), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool1d(2, ceil_mode=True))
    return nn.Sequential(*layers)


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


class TokenBatchNorm(nn.BatchNorm1d):
    """Batch norm of (B, L, C) tokens over the batch and the L positions, per channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class TransformerFusionBlock(nn.Module):
    """The paper's transformer block (its Algorithms 6 and 7), queries x (B, Lq, dim)
    reading a context (B, Lk, context_dim) of the other modality:

        attn = MHA(BN(x), BN(context));  out = attn + BN(MLP(BN(dropout(attn))))
        MLP  = dropout(fc2(dropout(GELU(fc1(.)))))

    BN is batch norm over the batch and positions (:class:`TokenBatchNorm`). The block
    returns ``out`` without x: the caller adds it to its stream, as the paper adds h_AV to
    the audio convolution output. (B, Lq, dim) out.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, dropout: float = 0.0, mlp_ratio: int = 2):
        super().__init__()
        self.norm_query, self.norm_context = TokenBatchNorm(dim), TokenBatchNorm(context_dim)
        self.attention = MultiHeadAttention(dim, context_dim, num_heads, dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm_attention, self.norm_mlp = TokenBatchNorm(dim), TokenBatchNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_ratio * dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        attended = self.attention(self.norm_query(x), self.norm_context(context))
        return attended + self.norm_mlp(self.mlp(self.norm_attention(self.dropout(attended))))


class AVTCA(nn.Module):
    """AVT-CA. forward(audio (B, F, L) or (B, 1, F, L), frames (B, 3, T, H, W)) -> (B, num_classes).

    ``transformer_fusion`` and ``cross_attention`` switch the two fusion stages (the
    ablations' IT and CT); ``num_heads`` is every attention's head count."""

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
        transformer_fusion: bool = True,
        cross_attention: bool = True,
        dropout: float = 0.1,
    ):
        super().__init__()
        if len(audio_channels) != 4 or len(temporal_channels) != 4:
            raise ValueError("audio_channels and temporal_channels need 4 entries: two blocks per stage")
        if audio_channels[-1] != temporal_channels[-1]:
            raise ValueError(
                f"audio and video end in the same width to attend to each other and be summed, "
                f"got {audio_channels[-1]} and {temporal_channels[-1]}"
            )
        if not (transformer_fusion or cross_attention):
            raise ValueError("AVT-CA needs transformer_fusion, cross_attention or both (the ablations keep one)")
        a, t = audio_channels, temporal_channels
        self.audio_stage1 = nn.Sequential(_conv1d_block(audio_in, a[0], pool=True), _conv1d_block(a[0], a[1], pool=True))
        self.audio_stage2 = nn.Sequential(_conv1d_block(a[1], a[2], pool=True), _conv1d_block(a[2], a[3], pool=True))
        self.frame_encoder = FrameEncoder(stage_channels, stage_repeats, frame_dim)
        self.video_stage1 = nn.Sequential(_conv1d_block(frame_dim, t[0]), _conv1d_block(t[0], t[1]))
        self.video_stage2 = nn.Sequential(_conv1d_block(t[1], t[2]), _conv1d_block(t[2], t[3]))
        # IT: intermediate transformer fusion, after stage 1.
        self.fuse_audio = TransformerFusionBlock(a[1], t[1], num_heads, dropout) if transformer_fusion else None
        self.fuse_video = TransformerFusionBlock(t[1], a[1], num_heads, dropout) if transformer_fusion else None
        # CT: after stage 2, each modality attends to the other, then multi-head attention over each stream.
        dim = a[3]
        late = (lambda: MultiHeadAttention(dim, dim, num_heads, dropout)) if cross_attention else (lambda: None)
        self.exchange_audio, self.exchange_video = late(), late()
        self.late_audio, self.late_video = late(), late()
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, audio: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        if audio.dim() == 4:
            audio = audio.squeeze(1)
        batch, _, num_frames = frames.shape[:3]
        per_frame = self.frame_encoder(frames.transpose(1, 2).flatten(0, 1))  # (B T, frame_dim)
        video = self.video_stage1(per_frame.unflatten(0, (batch, num_frames)).transpose(1, 2))
        audio = self.audio_stage1(audio)
        a, v = audio.transpose(1, 2), video.transpose(1, 2)  # (B, L, C) tokens
        if self.fuse_audio is not None:
            a, v = a + self.fuse_audio(a, v), v + self.fuse_video(v, a)
        a = self.audio_stage2(a.transpose(1, 2)).transpose(1, 2)
        v = self.video_stage2(v.transpose(1, 2)).transpose(1, 2)
        if self.exchange_audio is not None:
            a, v = a + self.exchange_audio(a, v), v + self.exchange_video(v, a)
            a, v = self.late_audio(a, a), self.late_video(v, v)
        return self.classifier(a.amax(1) + v.amax(1))
