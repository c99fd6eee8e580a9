"""Cross-modal attention fusion trained with an emotion-constrained triplet loss, the
review seed's system.

Model: the CBGP paper's CNN encoders (:mod:`models.backbones`) without their pooling give
one token per position of their last feature maps (audio: frequency x time cells; video:
time x height x width cells), projected to a common width. Audio tokens attend to video
tokens and video tokens to audio tokens (AVT-CA's transformer blocks,
:class:`models.avt_ca.TransformerFusionBlock`, each added to its stream); the two token
means are concatenated and classified.

Loss, our reading of "emotion-constrained triplet loss" for two modalities: the anchor is
one modality's embedding of a clip, the positive the *other* modality's embedding of a
clip with the same emotion, the negative the other modality's embedding of a clip with a
different emotion. Triplets are mined in the batch, batch-hard (Hermans et al. 2017):
per anchor the farthest positive and the closest negative. The loss is applied both ways
(audio anchors, video anchors) on the unimodal embeddings (token means before cross
attention), L2-normalised, with Euclidean distance:

    L_tri = mean over anchors of max(0, d(a, p_hard) - d(a, n_hard) + margin)

so audio and video of one emotion meet in one region of a shared space before they are
fused; the total loss is cross-entropy + ``triplet_weight`` * (L_tri(a->v) + L_tri(v->a)) / 2.

Training protocol: ``forward(audio, video)`` returns logits; ``forward(audio, video,
target=labels)`` returns that total loss (``has_training_loss``), so a training loop calls
the model through DDP either way.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .avt_ca import TransformerFusionBlock
from .backbones import AudioCNN, VideoCNN


def emotion_triplet_loss(
    anchor: torch.Tensor, other: torch.Tensor, labels: torch.Tensor, margin: float = 0.2
) -> torch.Tensor:
    """Batch-hard cross-modal triplet loss of anchors (B, D) against the other modality's
    embeddings (B, D) of the same B clips. Anchors with no negative in the batch (every
    clip of one emotion) are skipped; with none left the loss is 0 (still in the graph).
    """
    a = F.normalize(anchor, dim=-1)
    o = F.normalize(other, dim=-1)
    # ||a - o||^2 = 2 - 2 a.o for unit vectors; the clamp keeps sqrt's gradient finite when
    # an anchor coincides with its positive.
    distance = (2.0 - 2.0 * a @ o.T).clamp_min(1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    hardest_positive = distance.masked_fill(~same, float("-inf")).amax(1)
    hardest_negative = distance.masked_fill(same, float("inf")).amin(1)
    valid = (~same).any(1)
    if not valid.any():
        return distance.sum() * 0.0
    return F.relu(hardest_positive - hardest_negative + margin)[valid].mean()


class CrossAttentionTriplet(nn.Module):
    """forward(audio (B, 1, F, W), video (B, 3, T, H, W)) -> (B, num_classes) logits, or
    with ``target`` the training loss. Defaults are the CBGP encoders' paper sizes."""

    has_training_loss = True

    def __init__(
        self,
        num_classes: int,
        *,
        audio_channels: Sequence[int] = (32, 64, 128, 256),
        video_channels: Sequence[int] = (64, 128, 256, 512),
        dim: int = 128,
        num_heads: int = 4,
        dropout: float = 0.1,
        triplet_weight: float = 0.5,
        margin: float = 0.2,
    ):
        super().__init__()
        # The encoders' convolution stacks only: their global pooling would leave nothing to attend over.
        self.audio_features = AudioCNN(audio_channels).features
        self.video_features = VideoCNN(video_channels).features
        self.audio_tokens = nn.Linear(audio_channels[-1], dim)
        self.video_tokens = nn.Linear(video_channels[-1], dim)
        self.audio_fusion = TransformerFusionBlock(dim, dim, num_heads, dropout)
        self.video_fusion = TransformerFusionBlock(dim, dim, num_heads, dropout)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * dim, num_classes)
        self.triplet_weight, self.margin = triplet_weight, margin

    def tokens(self, audio: torch.Tensor, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N_a, dim) audio and (B, N_v, dim) video tokens."""
        a = self.audio_features(audio).flatten(2).transpose(1, 2)
        v = self.video_features(video).flatten(2).transpose(1, 2)
        return self.audio_tokens(a), self.video_tokens(v)

    def forward(self, audio: torch.Tensor, video: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        a, v = self.tokens(audio, video)
        fused = torch.cat([(a + self.audio_fusion(a, v)).mean(1), (v + self.video_fusion(v, a)).mean(1)], dim=-1)
        logits = self.classifier(self.dropout(fused))
        if target is None:
            return logits
        audio_embedding, video_embedding = a.mean(1), v.mean(1)
        triplet = 0.5 * (emotion_triplet_loss(audio_embedding, video_embedding, target, self.margin)
                         + emotion_triplet_loss(video_embedding, audio_embedding, target, self.margin))
        return F.cross_entropy(logits, target) + self.triplet_weight * triplet
