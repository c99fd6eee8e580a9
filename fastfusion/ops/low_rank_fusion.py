"""Low-rank multimodal fusion, LMF (Liu et al., ACL 2018).

Each modality gets a constant 1 prepended, x~_m = [1; x_m], and rank-r factors
W_m (r, n_m + 1, h):

    out = sum_r w_r prod_m (x~_m W_m[r]) + b              (..., h)

This is the official layout (factors with the constant row first, fusion weights w (1, r),
bias b (1, h)), so checkpoints of the reference implementation load directly. It equals
tensor fusion with W = sum_r w_r (x)_m W_m[r] without ever forming that tensor.
"""

from __future__ import annotations

from collections import Counter

import torch

from .. import _custom_op
from .._dispatch import compute_dtype
from .._validation import check_like, check_modality_tensors, check_same_count, check_shape, check_tensor
from ._common import flatten_leading, product

# The public function(s), exported by fastfusion, and their references, by fastfusion.reference.
__all__ = ["low_rank_fusion", "low_rank_fusion_reference"]


def _rank_projections(xs, factors) -> list[torch.Tensor]:
    """x~_m W_m[r] for every modality: (r, B, h) each; the constant row is added, not
    concatenated, to avoid copying x."""
    return [torch.matmul(x, w[:, 1:]) + w[:, :1] for x, w in zip(xs, factors)]


def _forward(xs, factors, weights, bias) -> torch.Tensor:
    """Plain-PyTorch LMF on (B, n_m) inputs, weights (r,), bias (h,) -> (B, h); differentiable."""
    fused = product(_rank_projections(xs, factors))
    return torch.einsum("r,rbh->bh", weights, fused) + bias


def _backward(grad, xs, factors, weights, bias) -> list[torch.Tensor]:
    """Gradients [*xs, *factors, weights, bias]."""
    projections = _rank_projections(xs, factors)
    grad_weights = torch.einsum("bh,rbh->r", grad, product(projections))
    weighted = weights[:, None, None] * grad  # (r, B, h)
    grad_xs, grad_factors = [], []
    for m, (x, w) in enumerate(zip(xs, factors)):
        grad_proj = product([weighted] + [p for k, p in enumerate(projections) if k != m])
        grad_xs.append(torch.einsum("rbh,rnh->bn", grad_proj, w[:, 1:]))
        grad_factors.append(torch.cat([grad_proj.sum(1, keepdim=True), torch.einsum("bn,rbh->rnh", x, grad_proj)], dim=1))
    return grad_xs + grad_factors + [grad_weights, grad.sum(0)]


def _flops(args: dict) -> Counter:
    # Per modality (B, n_m) @ (r, n_m, h), the constant row being added, not multiplied;
    # then the rank-weighted sum, an (r) . (r, B, h) contraction.
    xs, factors = args["xs"], args["factors"]
    batch, (rank, _, hidden) = xs[0][0], factors[0]
    return Counter(contraction=2 * batch * rank * hidden * (sum(x[1] for x in xs) + 1))


def _backward_flops(args: dict) -> Counter:
    xs, factors = args["xs"], args["factors"]
    batch, (rank, _, hidden) = xs[0][0], factors[0]
    return Counter(contraction=2 * batch * rank * hidden * (2 * sum(x[1] for x in xs) + 1))


SPEC = _custom_op.register(_custom_op.OpSpec(
    name="low_rank_fusion",
    args="Tensor[] xs, Tensor[] factors, Tensor weights, Tensor bias",
    forward=_forward,
    backward=_backward,
    fake=lambda xs, factors, weights, bias: xs[0].new_empty((xs[0].shape[0], bias.shape[0])),
    # Residuals: the projections x~_m W_m[r] for all ranks, (B, r*h) per modality, in the compute dtype.
    residuals=lambda xs, factors, weights, bias: [
        x.new_empty((x.shape[0], weights.shape[0] * bias.shape[0]), dtype=compute_dtype(x.dtype)) for x in xs
    ],
    differentiable=("xs", "factors", "weights", "bias"),
    flops=_flops,
    backward_flops=_backward_flops,
    autocast="lower",
    cpp_saves_residuals=True,
))


def low_rank_fusion(xs, factors, weights, bias, *, backend: str | None = None) -> torch.Tensor:
    """Low-rank multimodal fusion; see the module docstring for the math.

    xs: list of M >= 2 floating tensors (..., n_m) with the same leading shape;
    factors[m]: (rank, n_m + 1, h); weights: (rank,) or (1, rank); bias: (h,) or (1, h).
    Returns (..., h).
    """
    xs = check_modality_tensors("xs", xs)
    factors = check_same_count("factors", factors, "xs", len(xs))
    check_tensor("weights", weights)
    check_tensor("bias", bias)
    rank, hidden = weights.shape[-1], bias.shape[-1]
    if weights.shape not in ((rank,), (1, rank)):
        raise ValueError(f"weights must have shape (rank,) or (1, rank), got {tuple(weights.shape)}")
    if bias.shape not in ((hidden,), (1, hidden)):
        raise ValueError(f"bias must have shape (h,) or (1, h), got {tuple(bias.shape)}")
    for m, (x, w) in enumerate(zip(xs, factors)):
        check_tensor(f"factors[{m}]", w, min_ndim=3)
        check_shape(f"factors[{m}]", w, (rank, x.shape[-1] + 1, hidden))
        check_like(f"factors[{m}]", w, "xs[0]", xs[0])
    check_like("weights", weights, "xs[0]", xs[0])
    check_like("bias", bias, "xs[0]", xs[0])
    out = _custom_op.call(
        "low_rank_fusion", backend, [flatten_leading(x) for x in xs], factors, weights.reshape(rank), bias.reshape(hidden)
    )
    return out.reshape(tuple(xs[0].shape[:-1]) + (hidden,))


def low_rank_fusion_reference(xs, factors, weights, bias) -> torch.Tensor:
    """Plain-PyTorch :func:`low_rank_fusion` (autograd, no custom op)."""
    return low_rank_fusion(xs, factors, weights, bias, backend="eager")


def _benchmark_case(s, randn):
    """Modalities, Xavier-scaled factors, and rank weights and a bias of small scale."""
    dims, rank, h = s["n"], s["rank"], s["h"]
    xs = tuple(randn(s["B"], n) for n in dims)
    factors = tuple(randn(rank, n + 1, h, scale=(2 / (n + 1 + h)) ** 0.5) for n in dims)
    args = xs + factors + (randn(rank, scale=rank**-0.5), randn(h, scale=0.1))
    m = len(dims)
    return args, (), lambda f, b, *a: f(list(a[:m]), list(a[m : 2 * m]), a[2 * m], a[2 * m + 1])


_custom_op.declare_benchmark(_custom_op.Benchmark(
    op="low_rank_fusion", variant=None, function=low_rank_fusion, reference=low_rank_fusion_reference,
    shapes={
        "cuda": dict(B=4096, n=(512, 1024, 768), rank=8, h=256),
        "cpu": dict(B=1024, n=(32, 32, 64), rank=4, h=64),
        "cpu-quick": dict(B=256, n=(32, 32, 64), rank=4, h=64),
        "tiny": dict(B=4, n=(3, 4, 5), rank=2, h=6),
    },
    build=_benchmark_case,
))
