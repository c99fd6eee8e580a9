"""The CNN/MFA seed system: hand-crafted audio and video vectors
(:mod:`models.features.handcrafted`), fused by Marginal Fisher Analysis (:mod:`models.features.mfa`), then
classified by a 1D-CNN (:mod:`models.nets.cnn1d`, the paper's layer table).

The table's convolutions need an input of 162 steps (161 to 187 give its 32-wide
flatten), but MFA gives at most as many components as the hand-crafted vectors have
features (33 audio + 29 video), so the fused vector (B, n_components) is zero-padded at
its end to the classifier's ``input_length``: every layer, shape and parameter of the
table stays as printed, and the padded steps carry no information of their own.

MFA is fitted in closed form on the training set, not by gradient descent, so the model
is used in two steps::

    model = MFACNN({"audio": 33, "video": 29}, num_classes=8)
    model.prepare(train_set)        # fits MFA on every training item; no gradients
    ...train as usual...            # only the 1D-CNN learns

The fitted projection lives in buffers: it is saved in, and restored from, the state dict.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..features.mfa import MFAFusion
from .cnn1d import Conv1DClassifier


class MFACNN(nn.Module):
    """forward(*vectors) with one (B, d_m) tensor per entry of ``in_dims`` (in its order)
    -> (B, num_classes) logits. ``mfa`` options go to :class:`~models.features.mfa.MFAFusion`
    (``k_intrinsic``, ``k_penalty``, ``regularization``), ``cnn`` options to
    :class:`~models.nets.cnn1d.Conv1DClassifier`."""

    def __init__(self, in_dims: dict[str, int], num_classes: int, *, n_components: int = 32,
                 mfa: dict | None = None, cnn: dict | None = None):
        super().__init__()
        self.modalities, self.in_dims = tuple(in_dims), tuple(in_dims.values())
        total = sum(self.in_dims)
        if not 1 <= n_components <= total:
            raise ValueError(f"n_components must lie in [1, {total}], got {n_components}")
        self.n_components, self.mfa_options = n_components, dict(mfa or {})
        self.register_buffer("center", torch.zeros(total))
        self.register_buffer("projection", torch.zeros(total, n_components))
        self.register_buffer("fitted", torch.tensor(False))
        self.classifier = Conv1DClassifier(num_classes, **(cnn or {}))
        if n_components > self.classifier.input_length:
            raise ValueError(f"n_components ({n_components}) exceeds the 1D-CNN's input_length "
                             f"({self.classifier.input_length})")

    def fit_fusion(self, blocks: Sequence[np.ndarray | torch.Tensor], labels) -> None:
        """Fit MFA on one (n, d_m) block per modality and load it into the buffers. Each
        output component is rescaled to unit variance over the fitting set: MFA fixes a
        direction's scale only through the intrinsic scatter, which says nothing useful
        about the range the CNN sees."""
        blocks = [np.asarray(b, dtype=np.float64) for b in blocks]
        widths = tuple(b.shape[-1] for b in blocks)
        if widths != self.in_dims:
            raise ValueError(f"expected blocks of widths {self.in_dims} for {self.modalities}, got {widths}")
        fusion = MFAFusion(self.n_components, **self.mfa_options).fit(blocks, np.asarray(labels))
        center, projection = fusion.affine()
        spread = fusion.transform(blocks).std(0)
        projection = projection / np.where(spread > 0, spread, 1.0)
        self.center.copy_(torch.from_numpy(center))
        self.projection.copy_(torch.from_numpy(projection))
        self.fitted.fill_(True)

    @torch.no_grad()
    def prepare(self, dataset) -> None:
        """Fit the fusion on every item of a training set (items hold the modalities' vectors and ``label``)."""
        items = [dataset[i] for i in range(len(dataset))]
        blocks = [torch.stack([item[m] for item in items]).numpy() for m in self.modalities]
        self.fit_fusion(blocks, torch.stack([item["label"] for item in items]).numpy())

    def fuse(self, *vectors: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            raise RuntimeError("MFACNN's fusion is not fitted: call prepare(train_set) or fit_fusion first")
        widths = tuple(v.shape[-1] for v in vectors)
        if widths != self.in_dims:
            raise ValueError(f"expected inputs of widths {self.in_dims} for {self.modalities}, got {widths}")
        x = torch.cat(vectors, dim=-1)
        return (x - self.center.to(x.dtype)) @ self.projection.to(x.dtype)

    def forward(self, *vectors: torch.Tensor) -> torch.Tensor:
        fused = self.fuse(*vectors)
        return self.classifier(F.pad(fused, (0, self.classifier.input_length - self.n_components)))
