"""Fusion heads of the CBGP seed paper, switchable by name, and the audio-video classifier
that puts them on top of the two CNN encoders.

Every head maps the audio and video embeddings (B, n_a), (B, n_v) to class scores (B, C)
that ``nn.CrossEntropyLoss`` takes. The multiplicative heads share one shape: a fastfusion
operator builds a fused vector, one linear layer classifies it, so the operator is the only
thing that differs between them:

========  =====================================================================
early     concatenation [a; v], linear classifier
late      a classifier per modality; the decision is the average of their class
          probabilities (returned as log-probabilities)
hybrid    the early head's and both unimodal classifiers' probabilities, averaged
mfb       factorized bilinear pooling, MFB (fastfusion.FactorizedBilinearPooling)
cbp       compact bilinear pooling (fastfusion.CompactBilinearPooling)
cbgp      gated compact bilinear pooling (fastfusion.GatedCompactBilinearPooling)
lmf       low-rank multimodal fusion (fastfusion.LowRankFusion)
tfn       tensor fusion (fastfusion.TensorFusion)
========  =====================================================================

The first three are additive in the two modalities: each class score is an audio term
plus a video term, which cannot express an interaction such as an XOR of one audio and one
video attribute. The other five are multiplicative and can (see :mod:`models.datasets.data`).
MFB and CBP(G) end in signed square root and L2 normalisation (rescaled, see
:class:`OperatorFusion`); LMF and TFN feed their affine output straight to the classifier
(with a ReLU between them, as in TFN's post-fusion network, Adam drove TFN's wide layer
into dead units and the head to chance on the synthetic data).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

import fastfusion

HEAD_NAMES = ("early", "late", "hybrid", "mfb", "cbp", "cbgp", "lmf", "tfn")
ADDITIVE_HEADS = ("early", "late", "hybrid")

# The fastfusion op that each multiplicative head runs, for reports of the backend in use.
HEAD_OPS = {"mfb": "factorized_bilinear", "cbp": "compact_bilinear", "cbgp": "compact_bilinear",
            "lmf": "low_rank_fusion", "tfn": "tensor_fusion"}


def _average_decisions(logits: list[torch.Tensor]) -> torch.Tensor:
    """log of the mean of the softmax probabilities: cross-entropy on it is the NLL of the
    averaged decision, since log_softmax leaves log-probabilities unchanged."""
    log_probs = torch.stack([torch.log_softmax(z, dim=-1) for z in logits])
    return torch.logsumexp(log_probs, dim=0) - math.log(len(logits))


class EarlyFusion(nn.Module):
    def __init__(self, in_dims: tuple[int, int], num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(sum(in_dims), num_classes)

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.cat([audio, video], dim=-1))


class LateFusion(nn.Module):
    def __init__(self, in_dims: tuple[int, int], num_classes: int):
        super().__init__()
        self.audio_classifier = nn.Linear(in_dims[0], num_classes)
        self.video_classifier = nn.Linear(in_dims[1], num_classes)

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        return _average_decisions([self.audio_classifier(audio), self.video_classifier(video)])


class HybridFusion(nn.Module):
    def __init__(self, in_dims: tuple[int, int], num_classes: int):
        super().__init__()
        self.early = EarlyFusion(in_dims, num_classes)
        self.late = LateFusion(in_dims, num_classes)

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        return _average_decisions([
            self.early(audio, video), self.late.audio_classifier(audio), self.late.video_classifier(video),
        ])


class OperatorFusion(nn.Module):
    """A fastfusion operator producing a fused vector of ``fused_dim``, then a linear classifier.

    A signed-sqrt + L2 normalised vector (MFB, CBP, CBGP) has entries of about
    1 / sqrt(fused_dim), so its initial logits are sqrt(fused_dim) times smaller than the
    other heads' and Adam needs thousands of steps just to grow the classifier. Scaling it
    by sqrt(fused_dim), to unit root-mean-square entries, starts every head at the same
    logit scale; it is a constant, so the normalised direction is all that is learnt.
    """

    def __init__(self, fusion: nn.Module, fused_dim: int, num_classes: int):
        super().__init__()
        self.fusion = fusion
        self.scale = math.sqrt(fused_dim) if getattr(fusion, "normalize", False) else 1.0
        self.classifier = nn.Linear(fused_dim, num_classes)

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.scale * self.fusion(audio, video))


def make_head(name: str, in_dims: tuple[int, int], num_classes: int, **options) -> nn.Module:
    """The fusion head ``name`` (one of :data:`HEAD_NAMES`). ``options`` go to the fastfusion
    module: ``out_dim`` for all five operators, ``factor``/``dropout`` (mfb), ``gate`` (cbgp),
    ``rank`` (lmf), ``seed`` (cbp, cbgp)."""
    in_dims = tuple(in_dims)
    additive: dict[str, Callable[..., nn.Module]] = {"early": EarlyFusion, "late": LateFusion, "hybrid": HybridFusion}
    if name in additive:
        if options:
            raise TypeError(f"the {name} head takes no options, got {sorted(options)}")
        return additive[name](in_dims, num_classes)
    # Defaults: MFB's own (o = 1000, k = 5); d = 16000, the compact bilinear papers' usual
    # sketch size; LMF's rank 4 and TFN's 128-wide post-fusion layer.
    operators: dict[str, tuple[Callable[..., nn.Module], dict]] = {
        "mfb": (fastfusion.FactorizedBilinearPooling, {"out_dim": 1000, "factor": 5}),
        "cbp": (fastfusion.CompactBilinearPooling, {"out_dim": 16000}),
        "cbgp": (fastfusion.GatedCompactBilinearPooling, {"out_dim": 16000, "gate": "softmax"}),
        "lmf": (fastfusion.LowRankFusion, {"out_dim": 128, "rank": 4}),
        "tfn": (fastfusion.TensorFusion, {"out_dim": 128}),
    }
    if name not in operators:
        raise ValueError(f"unknown fusion head {name!r}; choose from {HEAD_NAMES}")
    module, defaults = operators[name]
    kwargs = {**defaults, **options}
    return OperatorFusion(module(list(in_dims), **kwargs), kwargs["out_dim"], num_classes)


class AudioVideoClassifier(nn.Module):
    """Audio encoder + video encoder + fusion head: forward(audio, video) -> (B, C) class scores."""

    def __init__(self, audio_encoder: nn.Module, video_encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.audio_encoder = audio_encoder
        self.video_encoder = video_encoder
        self.head = head

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        return self.head(self.audio_encoder(audio), self.video_encoder(video))
