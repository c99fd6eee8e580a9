"""nn.Modules holding each operator's parameters and hash/sign buffers.

Every module's forward takes one tensor per modality. Hashes and signs are persistent
buffers drawn from a private ``torch.Generator`` seeded by ``seed`` on the CPU, so they are
identical on every device and in every process, travel with ``state_dict`` and move with
``.to()``; the global RNG is never touched. They are checked once when built or loaded,
so the forward pass does not re-read them.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ._validation import check_hash, check_positive_int, check_sign
from .ops.compact_bilinear import sketch_and_pool
from .ops.factorized_bilinear import factorized_bilinear
from .ops.signed_sqrt_l2 import DEFAULT_EPS
from .ops.low_rank_fusion import low_rank_fusion
from .ops.tensor_fusion import tensor_fusion

_POOLS = (None, "sum", "mean")


def _check_in_dims(in_dims: Sequence[int], minimum: int = 2) -> tuple[int, ...]:
    if isinstance(in_dims, int) or not isinstance(in_dims, (list, tuple)):
        raise TypeError(f"in_dims must be a list or tuple of ints, one per modality, got {type(in_dims).__name__}")
    if len(in_dims) < minimum:
        raise ValueError(f"in_dims must list at least {minimum} modalities, got {len(in_dims)}")
    return tuple(check_positive_int(f"in_dims[{m}]", n) for m, n in enumerate(in_dims))


def _check_forward_count(xs, count: int) -> None:
    if len(xs) != count:
        raise ValueError(f"forward expects {count} tensors, one per modality, got {len(xs)}")


def draw_hashes_and_signs(in_dims: Sequence[int], out_dim: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(hash int64 in [0, out_dim), sign int8 of +1/-1) per modality, from a CPU generator
    seeded with ``seed``: the same on every machine, device and process."""
    generator = torch.Generator().manual_seed(seed)
    drawn = []
    for n in in_dims:
        hash = torch.randint(out_dim, (n,), generator=generator, dtype=torch.int64)
        sign = (torch.randint(2, (n,), generator=generator, dtype=torch.int8) * 2 - 1).to(torch.int8)
        drawn.append((hash, sign))
    return drawn


class CompactBilinearPooling(nn.Module):
    """Compact bilinear pooling of M >= 2 modalities (tensor sketch, Gao et al. 2016).

    forward(x_1, ..., x_M): each (..., n_m). With ``pool`` None the sketch is taken per
    position and the output is (..., out_dim); with pool "sum" or "mean" the inputs are
    (B, T, n_m) and T is pooled in the frequency domain, giving (B, out_dim). With
    ``normalize`` the output goes through signed square root and L2 normalisation.
    """

    def __init__(self, in_dims: Sequence[int], out_dim: int, *, pool: str | None = None, normalize: bool = True, seed: int = 0):
        super().__init__()
        self.in_dims = _check_in_dims(in_dims)
        self.out_dim = check_positive_int("out_dim", out_dim)
        if pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, got {pool!r}")
        self.pool = pool
        self.normalize = normalize
        self.seed = seed
        for m, (hash, sign) in enumerate(draw_hashes_and_signs(self.in_dims, self.out_dim, seed)):
            self.register_buffer(f"hash_{m}", hash)
            self.register_buffer(f"sign_{m}", sign)
        self.register_load_state_dict_post_hook(_check_loaded_sketch)

    @property
    def hashes(self) -> list[torch.Tensor]:
        return [getattr(self, f"hash_{m}") for m in range(len(self.in_dims))]

    @property
    def signs(self) -> list[torch.Tensor]:
        return [getattr(self, f"sign_{m}") for m in range(len(self.in_dims))]

    def _pool_dim(self, xs) -> int | None:
        _check_forward_count(xs, len(self.in_dims))
        if self.pool is None:
            return None
        if xs[0].dim() != 3:
            raise ValueError(f"pool={self.pool!r} needs inputs shaped (B, T, n_m), got {tuple(xs[0].shape)} for modality 0")
        return 1

    def _sketch(self, xs, gate=None) -> torch.Tensor:
        return sketch_and_pool(
            list(xs), self.hashes, self.signs, self.out_dim, self._pool_dim(xs), self.pool or "sum",
            gate, self.normalize, DEFAULT_EPS, None, check_values=False,
        )

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self._sketch(xs)

    def extra_repr(self) -> str:
        return f"in_dims={self.in_dims}, out_dim={self.out_dim}, pool={self.pool}, normalize={self.normalize}, seed={self.seed}"


def _check_loaded_sketch(module: CompactBilinearPooling, incompatible_keys) -> None:
    for m, (hash, sign) in enumerate(zip(module.hashes, module.signs)):
        check_hash(f"loaded buffer hash_{m}", hash, module.in_dims[m], module.out_dim, hash)
        check_sign(f"loaded buffer sign_{m}", sign, module.in_dims[m], sign)


class GatedCompactBilinearPooling(CompactBilinearPooling):
    """Gated compact bilinear pooling, CBGP.

    The gate is g = act(W_G [x_1; ...; x_M] + b_G), of shape (..., out_dim), computed from
    the concatenated inputs (each averaged over T when pooling, so the gate's scale does
    not grow with T) with act = softmax over out_dim (the paper's) or sigmoid; the output
    is signed_sqrt_l2(g * CBP(x_1, ..., x_M)). This is our reading of the paper's
    G = softmax(W_G [a; v] + b_G) applied elementwise to the compact bilinear vector.
    """

    _GATES = ("softmax", "sigmoid")

    def __init__(
        self,
        in_dims: Sequence[int],
        out_dim: int,
        *,
        gate: str = "softmax",
        pool: str | None = None,
        normalize: bool = True,
        seed: int = 0,
    ):
        super().__init__(in_dims, out_dim, pool=pool, normalize=normalize, seed=seed)
        if gate not in self._GATES:
            raise ValueError(f"gate must be one of {self._GATES}, got {gate!r}")
        self.gate = gate
        self.gate_proj = nn.Linear(sum(self.in_dims), self.out_dim)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        pool_dim = self._pool_dim(xs)
        summary = torch.cat([x if pool_dim is None else x.mean(pool_dim) for x in xs], dim=-1)
        logits = self.gate_proj(summary)
        gate = torch.softmax(logits, dim=-1) if self.gate == "softmax" else torch.sigmoid(logits)
        return self._sketch(xs, gate)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gate={self.gate}"


class FactorizedBilinearPooling(nn.Module):
    """Factorized bilinear pooling, MFB (Yu et al. 2017), of two modalities.

    forward(x, y): x (..., n_x), y (..., n_y) -> (..., out_dim). Two projections to
    out_dim * factor, their product (with dropout during training, as in the original),
    sum pooling over groups of ``factor``, then signed square root and L2 normalisation.
    """

    def __init__(self, in_dims: Sequence[int], out_dim: int = 1000, *, factor: int = 5, dropout: float = 0.1, normalize: bool = True):
        super().__init__()
        self.in_dims = _check_in_dims(in_dims)
        if len(self.in_dims) != 2:
            raise ValueError(f"in_dims must list exactly 2 modalities for MFB, got {len(self.in_dims)}")
        self.out_dim = check_positive_int("out_dim", out_dim)
        self.factor = check_positive_int("factor", factor)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.dropout = dropout
        self.normalize = normalize
        self.proj_x = nn.Linear(self.in_dims[0], out_dim * factor)
        self.proj_y = nn.Linear(self.in_dims[1], out_dim * factor)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.training and self.dropout > 0:
            keep = 1.0 - self.dropout
            mask = torch.empty(x.shape[:-1] + (self.out_dim * self.factor,), device=x.device, dtype=x.dtype)
            mask.bernoulli_(keep).div_(keep)
        return factorized_bilinear(
            x, y, self.proj_x.weight, self.proj_x.bias, self.proj_y.weight, self.proj_y.bias,
            self.factor, self.normalize, dropout_mask=mask,
        )

    def extra_repr(self) -> str:
        return f"in_dims={self.in_dims}, out_dim={self.out_dim}, factor={self.factor}, dropout={self.dropout}, normalize={self.normalize}"


class LowRankFusion(nn.Module):
    """Low-rank multimodal fusion, LMF (Liu et al. 2018), of M >= 2 modalities.

    forward(x_1, ..., x_M): each (..., n_m) -> (..., out_dim). Parameters in the official
    layout: ``factors[m]`` (rank, n_m + 1, out_dim), ``fusion_weights`` (1, rank),
    ``fusion_bias`` (1, out_dim); all registered, all trained. Xavier-normal initialisation
    and a zero bias, as the official code.
    """

    def __init__(self, in_dims: Sequence[int], out_dim: int, *, rank: int = 4):
        super().__init__()
        self.in_dims = _check_in_dims(in_dims)
        self.out_dim = check_positive_int("out_dim", out_dim)
        self.rank = check_positive_int("rank", rank)
        self.factors = nn.ParameterList(
            nn.Parameter(nn.init.xavier_normal_(torch.empty(rank, n + 1, out_dim))) for n in self.in_dims
        )
        self.fusion_weights = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, rank)))
        self.fusion_bias = nn.Parameter(torch.zeros(1, out_dim))

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        _check_forward_count(xs, len(self.in_dims))
        return low_rank_fusion(list(xs), list(self.factors), self.fusion_weights, self.fusion_bias)

    def extra_repr(self) -> str:
        return f"in_dims={self.in_dims}, out_dim={self.out_dim}, rank={self.rank}"


class TensorFusion(nn.Module):
    """Tensor fusion, TFN (Zadeh et al. 2017), of M >= 2 modalities.

    forward(x_1, ..., x_M): each (..., n_m) -> (..., out_dim): a linear layer on the
    modality-0-major flattened outer product of the [1; x_m]. ``weight`` is
    (out_dim, prod_m (n_m + 1)), initialised like nn.Linear.
    """

    def __init__(self, in_dims: Sequence[int], out_dim: int):
        super().__init__()
        self.in_dims = _check_in_dims(in_dims)
        self.out_dim = check_positive_int("out_dim", out_dim)
        fused_dim = math.prod(n + 1 for n in self.in_dims)
        reference_layer = nn.Linear(fused_dim, out_dim)
        self.weight = reference_layer.weight
        self.bias = reference_layer.bias

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        _check_forward_count(xs, len(self.in_dims))
        return tensor_fusion(list(xs), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_dims={self.in_dims}, out_dim={self.out_dim}"
