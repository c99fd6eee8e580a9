"""Weighted decision-level fusion of per-modality models.

Each modality has its own model; their decisions are combined with weights w_m >= 0,
sum 1, either given (seed 004's video 0.55, audio 0.38, text 0.07; here in the models'
order, which for the builders is audio, video, text: ``[0.38, 0.55, 0.07]``; the CLI takes
them by name, ``--fusion-weights video=0.55 audio=0.38 text=0.07``) or learned:

- classification: p(c) = sum_m w_m softmax(z_m)(c); ``forward`` returns log p, so
  ``nn.CrossEntropyLoss`` / argmax apply to it as to logits;
- regression: y = sum_m w_m y_m.

Decision-level fusion trains every modality's model on its own objective, so the training
loss (``forward(*inputs, target=...)``, ``has_training_loss``) is the sum of the
per-modality losses; no modality learns to lean on another. Learned weights, w =
softmax(theta), add the fused decision's loss computed on *detached* per-modality outputs:
the weights follow the models' quality and the models do not bend to the weights. They
are fitted on the training data, where every model looks better than on held-out data;
weights fitted on a validation set (or given) are the safer choice when models overfit
unequally.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

TASKS = ("classification", "regression")


class WeightedDecisionFusion(nn.Module):
    """forward(*inputs) with one input per model, in ``models``' order -> fused
    log-probabilities (B, C), or fused scores (B,) for regression; with ``target`` the
    training loss. ``weights``: None for equal weights, else one non-negative number per
    model, in ``models``' order (normalised to sum 1); ``learn_weights`` makes them
    trainable, starting there."""

    has_training_loss = True

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None, *,
                 learn_weights: bool = False, task: str = "classification"):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        count = len(models)
        if count < 2:
            raise ValueError(f"decision fusion needs at least two models, got {count}")
        initial = torch.full((count,), 1.0 / count) if weights is None else torch.tensor(weights, dtype=torch.float32)
        if initial.shape != (count,) or (initial < 0).any() or initial.sum() <= 0:
            raise ValueError(f"weights need one non-negative value per model ({count}), not all zero; got {weights}")
        initial = initial / initial.sum()
        if learn_weights and (initial == 0).any():
            raise ValueError("learned weights start from positive values (softmax never reaches 0)")
        self.models = nn.ModuleList(models)
        self.task = task
        if learn_weights:
            self.weight_logits = nn.Parameter(initial.log())
        else:
            self.register_buffer("fixed_weights", initial)
            self.weight_logits = None

    @property
    def weights(self) -> torch.Tensor:
        return self.fixed_weights if self.weight_logits is None else torch.softmax(self.weight_logits, 0)

    def decisions(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Per-model log-probabilities (M, B, C), or scores (M, B) for regression."""
        if len(inputs) != len(self.models):
            raise ValueError(f"forward expects {len(self.models)} inputs, one per model, got {len(inputs)}")
        outputs = [model(x) for model, x in zip(self.models, inputs)]
        if self.task == "classification":
            return torch.stack([torch.log_softmax(z, dim=-1) for z in outputs])
        return torch.stack([y.reshape(len(y)) for y in outputs])

    def combine(self, decisions: torch.Tensor) -> torch.Tensor:
        w = self.weights.to(decisions.dtype)
        if self.task == "classification":
            # log sum_m w_m p_m, stably; a zero weight contributes exp(-inf) = 0.
            return torch.logsumexp(decisions + w.log()[:, None, None], dim=0)
        return torch.einsum("m,mb->b", w, decisions)

    def forward(self, *inputs: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        decisions = self.decisions(*inputs)
        if target is None:
            return self.combine(decisions)
        per_model = self._loss(decisions, target)
        loss = per_model.sum()
        if self.weight_logits is not None:
            loss = loss + self._loss(self.combine(decisions.detach())[None], target)[0]
        return loss

    def _loss(self, decisions: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of each leading-dim decision set: NLL of log-probabilities, or L1 (the
        sentiment loss the LMF paper trains with)."""
        if self.task == "classification":
            return torch.stack([F.nll_loss(d, target) for d in decisions])
        return torch.stack([F.l1_loss(d, target.to(d.dtype)) for d in decisions])

    def extra_repr(self) -> str:
        shown = ", ".join(f"{w:.3f}" for w in self.weights.tolist())
        return f"task={self.task}, weights=({shown}), learned={self.weight_logits is not None}"


def unimodal_classifier(encoder: nn.Module, out_dim: int, num_outputs: int) -> nn.Module:
    """An encoder with a linear decision layer on top: one modality's model, (B, ...) ->
    (B, num_outputs). Decision fusion combines several; ``python -m models.train --model
    unimodal`` trains one alone."""
    return nn.Sequential(encoder, nn.Linear(out_dim, num_outputs))

