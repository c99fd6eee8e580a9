"""Cross-modal attention fusion trained with an emotion-constrained triplet loss, the
review seed's system.

Model: the CBGP paper's CNN encoders (:mod:`models.nets.backbones`) without their pooling give
one token per position of their last feature maps (audio: frequency x time cells; video:
time x height x width cells), projected to a common width. Audio tokens attend to video
tokens and video tokens to audio tokens (AVT-CA's transformer blocks,
:class:`models.nets.avt_ca.TransformerFusionBlock`, each added to its stream); the two token
means are concatenated and classified.

Loss, our reading of "emotion-constrained triplet loss" for two modalities: the anchor is
one modality's embedding of a clip, the positive the *other* modality's embedding of a
clip with the same emotion, the negative the other modality's embedding of a clip with a
different emotion. Triplets are mined in the batch, batch-hard (Hermans et al. 2017):
per anchor the farthest positive and the closest negative. The loss is applied both ways
(audio anchors, video anchors) on the unimodal embeddings (token means before cross
attention), L2-normalised, with Euclidean distance d:

    L_tri = mean over anchors i of max(0, d(a_i, p_hard) - d(a_i, n_hard) + margin)

The emotion constraint. The review states it without a formula: "an additional
constraint is introduced that organizes emotions based on their similarities. Similar
emotions (like happiness and surprise) are grouped closer together while opposing
emotions (like happiness and sadness) are kept farther apart." We place each emotion on
the valence / arousal plane (:data:`VALENCE_AROUSAL`), take D(c, c') as the distance of
two emotions there divided by the largest such distance among the classes (so D lies in
[0, 1]), and ask every anchor to rank the other modality's clips of other emotions by D:
for anchor i and negatives j, k with D(y_i, y_j) < D(y_i, y_k),

    L_emo = mean over such (i, j, k) of max(0, d(a_i, o_j) - d(a_i, o_k) + margin (D(y_i, y_k) - D(y_i, y_j)))

so a happy anchor must lie nearer the surprised clips than the sad ones, by a margin that
grows with how far apart the two emotions are. The loss is L_tri + L_emo; the model's
training loss is cross-entropy + ``triplet_weight`` times the mean of the two directions,
so audio and video of one emotion meet in one region of a shared space, laid out like the
emotions themselves, before they are fused.

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

# (valence, arousal) of each emotion, both in [-1, 1]: a coarse placement on Russell's
# circumplex of affect (valence: unpleasant to pleasant; arousal: deactivated to
# activated), our reading, not measured ratings. Happiness and surprise share the
# pleasant, activated quadrant; sadness sits opposite happiness.
VALENCE_AROUSAL = {
    "neutral": (0.0, 0.0),
    "calm": (0.6, -0.6),
    "happy": (0.8, 0.5),
    "surprised": (0.4, 0.8),
    "angry": (-0.6, 0.7),
    "fearful": (-0.7, 0.6),
    "disgust": (-0.7, 0.2),
    "sad": (-0.7, -0.5),
}
# The corpora's other spellings (CREMA-D: anger, fear; CMU-MOSEI: surprise).
_SYNONYMS = {"anger": "angry", "fear": "fearful", "surprise": "surprised", "happiness": "happy",
             "sadness": "sad", "disgusted": "disgust"}


def _sentiment(name: str) -> float | None:
    try:
        return float(name)
    except ValueError:
        return None


def _valence_arousal(name: str) -> tuple[float, float]:
    key = _SYNONYMS.get(name.lower(), name.lower())
    if key not in VALENCE_AROUSAL:
        raise ValueError(f"class_names: no valence / arousal place for {name!r}; "
                         f"known: {sorted(VALENCE_AROUSAL) + sorted(_SYNONYMS)}, or all numbers (sentiment)")
    return VALENCE_AROUSAL[key]


def emotion_distance(class_names: Sequence[str]) -> torch.Tensor:
    """(C, C) distances of the classes' emotions on the valence / arousal plane, divided by
    the largest, so the farthest pair is 1. Names are matched case-insensitively, with
    the corpora's synonyms (anger, fear, surprise, ...). Classes named by numbers are
    sentiment scores (CMU-MOSEI's -3 ... 3), which are valence: they lie on the valence axis."""
    scores = [_sentiment(name) for name in class_names]
    if all(score is not None for score in scores):
        points = [(score, 0.0) for score in scores]
    else:
        points = [_valence_arousal(name) for name in class_names]
    distance = torch.cdist(torch.tensor(points, dtype=torch.float64), torch.tensor(points, dtype=torch.float64))
    if len(points) < 2 or distance.max() == 0:
        raise ValueError(f"class_names needs at least two distinct emotions, got {tuple(class_names)}")
    return (distance / distance.max()).float()


def emotion_triplet_loss(
    anchor: torch.Tensor,
    other: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.2,
    emotion_distance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-modal triplet loss of anchors (B, D) against the other modality's embeddings
    (B, D) of the same B clips: batch-hard L_tri, plus, given the (C, C)
    ``emotion_distance`` of the classes, the ranking term L_emo (module docstring).
    Anchors with no negative in the batch are skipped, and so are anchors with no pair of
    negatives of unequal emotion distance in L_emo; with nothing left a term is 0 (still in
    the graph)."""
    a = F.normalize(anchor, dim=-1)
    o = F.normalize(other, dim=-1)
    # ||a - o||^2 = 2 - 2 a.o for unit vectors; the clamp keeps sqrt's gradient finite when
    # an anchor coincides with its positive.
    distance = (2.0 - 2.0 * a @ o.T).clamp_min(1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    hardest_positive = distance.masked_fill(~same, float("-inf")).amax(1)
    hardest_negative = distance.masked_fill(same, float("inf")).amin(1)
    valid = (~same).any(1)
    loss = F.relu(hardest_positive - hardest_negative + margin)[valid].mean() if valid.any() else distance.sum() * 0.0
    if emotion_distance is None:
        return loss
    gap = emotion_distance.to(distance)[labels[:, None], labels[None, :]]  # (B, B): D(y_i, y_j)
    # (i, j, k): j and k are negatives of i, and j's emotion is nearer to i's than k's.
    ranked = (~same)[:, :, None] & (~same)[:, None, :] & (gap[:, :, None] < gap[:, None, :])
    if not ranked.any():
        return loss + distance.sum() * 0.0
    hinge = distance[:, :, None] - distance[:, None, :] + margin * (gap[:, None, :] - gap[:, :, None])
    return loss + F.relu(hinge[ranked]).mean()


class CrossAttentionTriplet(nn.Module):
    """forward(audio (B, 1, F, W), video (B, 3, T, H, W)) -> (B, len(class_names)) logits,
    or with ``target`` the training loss. ``class_names`` place the classes' emotions for
    the loss's constraint. Defaults are the CBGP encoders' paper sizes."""

    has_training_loss = True

    def __init__(
        self,
        class_names: Sequence[str],
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
        self.classifier = nn.Linear(2 * dim, len(class_names))
        self.register_buffer("emotion_distance", emotion_distance(class_names), persistent=False)
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
        triplet = 0.5 * (
            emotion_triplet_loss(audio_embedding, video_embedding, target, self.margin, self.emotion_distance)
            + emotion_triplet_loss(video_embedding, audio_embedding, target, self.margin, self.emotion_distance))
        return F.cross_entropy(logits, target) + self.triplet_weight * triplet
