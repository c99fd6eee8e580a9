"""nn.Modules holding each operator's parameters and hash/sign buffers.

Every module's forward takes one tensor per modality. Hashes and signs are persistent
buffers drawn from a private ``torch.Generator`` seeded by ``seed`` on the CPU, so they are
identical on every device and in every process, travel with ``state_dict`` and move with
``.to()``; the global RNG is never touched. They are checked once when built or loaded,
so the forward pass does not re-read them.

A module's state_dict also records the constructor arguments that decide what its tensors
mean, and ``load_state_dict`` refuses a state_dict saved with other values, naming the
argument and both values. Every incoming tensor is checked (shape; dtype and values of
hashes and signs) before anything is copied, so a refused load leaves the module as it was.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ._validation import check_hash, check_positive_int, check_shape, check_sign
from .ops.compact_bilinear import check_algorithm, sketch_and_pool
from .ops.factorized_bilinear import factorized_bilinear
from .ops.low_rank_fusion import low_rank_fusion
from .ops.signed_sqrt_l2 import DEFAULT_EPS
from .ops.tensor_fusion import tensor_fusion

_POOLS = (None, "sum", "mean")

# Where a module records its defining arguments: its entry in the state_dict's metadata.
_RECORD_KEY = "fastfusion"


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


class _FusionModule(nn.Module):
    """Records the arguments named in ``_DEFINING`` in its state_dict and checks a load in
    full before copying anything.

    ``_DEFINING`` lists the constructor arguments that, with the tensors, decide what
    forward computes in eval mode; a state_dict saved with other values is refused. The
    record lives in the state_dict's metadata (torch's per-module ``_metadata``, which
    holds each module's version) rather than in an entry of its own, so the keys stay the
    parameters and buffers and every value stays a tensor: safetensors, code that iterates
    the values, and strict loading into an older fastfusion keep working. It survives
    torch.save/torch.load(weights_only=True) and consume_prefix_in_state_dict_if_present;
    a state_dict rebuilt as a plain dict loses it and loads like one saved before the record.
    """

    _DEFINING: tuple[str, ...] = ()

    def _record(self) -> dict:
        return {field: getattr(self, field) for field in self._DEFINING}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:  # a destination passed by the caller may have none
            metadata.setdefault(prefix[:-1], {})[_RECORD_KEY] = self._record()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        # Raise rather than append to error_msgs: torch would still copy every other tensor
        # and load the submodules (gate_proj, proj_x, factors) after this call, leaving a
        # module that is neither the old one nor the saved one.
        self._check_loadable(state_dict, prefix, local_metadata.get(_RECORD_KEY))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def _check_loadable(self, state_dict, prefix: str, record: dict | None) -> None:
        """Raise unless every entry of ``state_dict`` for this module and its submodules
        may replace the tensor it names, and ``record`` matches this module's arguments."""
        # A state_dict without a record (saved before the record existed, or rebuilt as a
        # plain dict) is accepted once its tensors pass their checks: refusing it would
        # strand every checkpoint written so far, and only mix-ups of equal shapes and
        # in-range hashes, which it could not tell apart when saved either, go unseen.
        # A field the record lacks likewise predates that field.
        if record is not None:
            mismatches = [
                f"{prefix}{field}: the state_dict was saved with {record[field]!r}, this module has {value!r}"
                for field, value in self._record().items()
                if field in record and record[field] != value
            ]
            if mismatches:
                raise ValueError("; ".join(mismatches))
        for name, current in self.state_dict(keep_vars=True).items():
            key = prefix + name
            if key in state_dict:
                value = state_dict[key]
                label = f"state_dict[{key!r}]"
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"{label} must be a torch.Tensor, got {type(value).__name__}")
                self._check_loaded_tensor(label, name, value, current)

    def _check_loaded_tensor(self, label: str, name: str, value: torch.Tensor, current: torch.Tensor) -> None:
        """Raise unless ``value`` may replace ``current``, the tensor ``name`` of this module."""
        check_shape(label, value, current.shape)


class CompactBilinearPooling(_FusionModule):
    """Compact bilinear pooling of M >= 2 modalities (tensor sketch, Gao et al. 2016).

    forward(x_1, ..., x_M): each (..., n_m). With ``pool`` None the sketch is taken per
    position and the output is (..., out_dim); with pool "sum" or "mean" the inputs are
    (B, T, n_m) and T is pooled in the frequency domain, giving (B, out_dim). With
    ``normalize`` the output goes through signed square root and L2 normalisation.
    ``algorithm`` ("auto", "fft" or "gram") is :func:`fastfusion.compact_bilinear`'s.

    A state_dict must match ``in_dims``, ``out_dim``, ``pool`` and ``normalize``. ``seed``
    only picks the hashes and signs drawn here, which a loaded state_dict replaces.
    """

    _DEFINING = ("in_dims", "out_dim", "pool", "normalize")

    def __init__(
        self,
        in_dims: Sequence[int],
        out_dim: int,
        *,
        pool: str | None = None,
        normalize: bool = True,
        seed: int = 0,
        algorithm: str = "auto",
    ):
        super().__init__()
        self.in_dims = _check_in_dims(in_dims)
        self.out_dim = check_positive_int("out_dim", out_dim)
        if pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, got {pool!r}")
        self.pool = pool
        self.normalize = normalize
        self.seed = seed
        self.algorithm = check_algorithm(algorithm, len(self.in_dims))
        for m, (hash, sign) in enumerate(draw_hashes_and_signs(self.in_dims, self.out_dim, seed)):
            self.register_buffer(f"hash_{m}", hash)
            self.register_buffer(f"sign_{m}", sign)

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
            gate, self.normalize, DEFAULT_EPS, None, self.algorithm, check_values=False,
        )

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self._sketch(xs)

    def extra_repr(self) -> str:
        return (
            f"in_dims={self.in_dims}, out_dim={self.out_dim}, pool={self.pool}, normalize={self.normalize}, "
            f"seed={self.seed}, algorithm={self.algorithm}"
        )

    def _check_loaded_tensor(self, label, name, value, current):
        # copy_ would turn a float or int16 hash, or a sign of 1.5, into a valid-looking
        # buffer: the dtype and values are checked as given. The incoming tensor is its own
        # device reference (copying moves it); a meta tensor has no values to read.
        values = not value.is_meta
        if name.startswith("hash_"):
            check_hash(label, value, len(current), self.out_dim, value, values=values)
        elif name.startswith("sign_"):
            check_sign(label, value, len(current), value, values=values)
        else:
            super()._check_loaded_tensor(label, name, value, current)


class GatedCompactBilinearPooling(CompactBilinearPooling):
    """Gated compact bilinear pooling, CBGP.

    The gate is g = act(W_G [x_1; ...; x_M] + b_G), of shape (..., out_dim), computed from
    the concatenated inputs (each averaged over T when pooling, so the gate's scale does
    not grow with T) with act = softmax over out_dim (the paper's) or sigmoid; the output
    is signed_sqrt_l2(g * CBP(x_1, ..., x_M)). This is our reading of the paper's
    G = softmax(W_G [a; v] + b_G) applied elementwise to the compact bilinear vector. A
    state_dict must also match ``gate``.
    """

    _GATES = ("softmax", "sigmoid")
    _DEFINING = CompactBilinearPooling._DEFINING + ("gate",)

    def __init__(
        self,
        in_dims: Sequence[int],
        out_dim: int,
        *,
        gate: str = "softmax",
        pool: str | None = None,
        normalize: bool = True,
        seed: int = 0,
        algorithm: str = "auto",
    ):
        super().__init__(in_dims, out_dim, pool=pool, normalize=normalize, seed=seed, algorithm=algorithm)
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


class FactorizedBilinearPooling(_FusionModule):
    """Factorized bilinear pooling, MFB (Yu et al. 2017), of two modalities.

    forward(x, y): x (..., n_x), y (..., n_y) -> (..., out_dim). Two projections to
    out_dim * factor, their product (with dropout during training, as in the original),
    sum pooling over groups of ``factor``, then signed square root and L2 normalisation.

    A state_dict must match ``in_dims``, ``out_dim``, ``factor`` and ``normalize`` (the
    projections' shapes only fix out_dim * factor); ``dropout`` acts in training only.
    """

    _DEFINING = ("in_dims", "out_dim", "factor", "normalize")

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


class LowRankFusion(_FusionModule):
    """Low-rank multimodal fusion, LMF (Liu et al. 2018), of M >= 2 modalities.

    forward(x_1, ..., x_M): each (..., n_m) -> (..., out_dim). Parameters in the official
    layout: ``factors[m]`` (rank, n_m + 1, out_dim), ``fusion_weights`` (1, rank),
    ``fusion_bias`` (1, out_dim); all registered, all trained. Xavier-normal initialisation
    and a zero bias, as the official code. A state_dict must match ``in_dims``, ``out_dim``
    and ``rank``.
    """

    _DEFINING = ("in_dims", "out_dim", "rank")

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


class TensorFusion(_FusionModule):
    """Tensor fusion, TFN (Zadeh et al. 2017), of M >= 2 modalities.

    forward(x_1, ..., x_M): each (..., n_m) -> (..., out_dim): a linear layer on the
    modality-0-major flattened outer product of the [1; x_m]. ``weight`` is
    (out_dim, prod_m (n_m + 1)), initialised like nn.Linear. A state_dict must match
    ``in_dims`` (whose order the weight's shape does not fix) and ``out_dim``.
    """

    _DEFINING = ("in_dims", "out_dim")

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
