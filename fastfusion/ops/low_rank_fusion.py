"""Low-rank multimodal fusion, LMF (Liu et al., ACL 2018).

Each modality gets a constant 1 prepended, x~_m = [1; x_m], and rank-r factors
W_m (r, n_m + 1, h):

    out = sum_r w_r prod_m (x~_m W_m[r]) + b              (..., h)

This is the official layout (factors with the constant row first, fusion weights w (1, r),
bias b (1, h)), so checkpoints of the reference implementation load directly. It equals
tensor fusion with W = sum_r w_r (x)_m W_m[r] without ever forming that tensor.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from .. import _dispatch
from .._validation import check_like, check_modality_tensors, check_same_count, check_shape, check_tensor
from ._common import autocast_dtype, cast_all, compute_dtype, flatten_leading, mark_residuals, once_differentiable, product


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


# Residuals (backends that save them): the projections x~_m W_m[r] for all ranks, (B, r*h)
# per modality, in the compute dtype.
@torch.library.custom_op("fastfusion::low_rank_fusion", mutates_args=())
def _low_rank_fusion_op(
    xs: List[torch.Tensor], factors: List[torch.Tensor], weights: torch.Tensor, bias: torch.Tensor, save_residuals: bool, backend: str
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    return _dispatch.run_forward_saving("low_rank_fusion", backend, save_residuals, xs, factors, weights, bias)


@_low_rank_fusion_op.register_fake
def _(xs, factors, weights, bias, save_residuals, backend):
    batch, width = xs[0].shape[0], weights.shape[0] * bias.shape[0]
    residuals = []
    if _dispatch.residuals_saved("low_rank_fusion", backend, save_residuals, xs, factors, weights, bias):
        residuals = [x.new_empty((batch, width), dtype=compute_dtype(x.dtype)) for x in xs]
    return xs[0].new_empty((batch, bias.shape[0])), residuals


@torch.library.custom_op("fastfusion::low_rank_fusion_backward", mutates_args=())
def _low_rank_fusion_backward_op(
    grad: torch.Tensor,
    residuals: List[torch.Tensor],
    xs: List[torch.Tensor],
    factors: List[torch.Tensor],
    weights: torch.Tensor,
    bias: torch.Tensor,
    backend: str,
) -> List[torch.Tensor]:
    return _dispatch.run_backward_saving("low_rank_fusion", backend, grad, residuals, xs, factors, weights, bias)


@_low_rank_fusion_backward_op.register_fake
def _(grad, residuals, xs, factors, weights, bias, backend):
    return [t.new_empty(t.shape) for t in (*xs, *factors, weights, bias)]


def _setup_context(ctx, inputs, output):
    xs, factors, weights, bias, _, backend = inputs
    ctx.backend = _dispatch.backend_for("low_rank_fusion", xs[0], backend)  # what the forward ran
    residuals = output[1]
    mark_residuals(ctx, residuals)
    ctx.num_modalities = len(xs)
    ctx.save_for_backward(*xs, *factors, weights, bias, *residuals)


def _autograd_backward(ctx, grad, _grad_residuals):
    if grad is None:  # the output's gradient is undefined: so are the inputs'
        return [None] * ctx.num_modalities, [None] * ctx.num_modalities, None, None, None, None
    m, saved = ctx.num_modalities, ctx.saved_tensors
    xs, factors, (weights, bias), residuals = saved[:m], saved[m : 2 * m], saved[2 * m : 2 * m + 2], saved[2 * m + 2 :]
    grads = _low_rank_fusion_backward_op(grad.contiguous(), list(residuals), list(xs), list(factors), weights, bias, ctx.backend)
    return list(grads[:m]), list(grads[m : 2 * m]), grads[2 * m], grads[2 * m + 1], None, None


_low_rank_fusion_op.register_autograd(_autograd_backward, setup_context=_setup_context)
once_differentiable("low_rank_fusion", _low_rank_fusion_backward_op)

_dispatch.register_kernel("low_rank_fusion", "torch", forward=_forward, backward=_backward)


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
    lowered = autocast_dtype(xs[0].device.type)
    if lowered is not None:
        with torch.autocast(xs[0].device.type, enabled=False):
            return low_rank_fusion(cast_all(xs, lowered), cast_all(factors, lowered), weights.to(lowered), bias.to(lowered), backend=backend)
    name = _dispatch.requested_backend(backend)
    args = ([flatten_leading(x) for x in xs], factors, weights.reshape(rank), bias.reshape(hidden))
    if _dispatch.runs_reference(name):
        out = _forward(*args)
    else:
        save = _dispatch.wants_residuals(*xs, *factors, weights, bias)
        out = _low_rank_fusion_op(*args, save, name)[0]
    return out.reshape(tuple(xs[0].shape[:-1]) + (hidden,))


def low_rank_fusion_reference(xs, factors, weights, bias) -> torch.Tensor:
    """Plain-PyTorch :func:`low_rank_fusion` (autograd, no custom op)."""
    return low_rank_fusion(xs, factors, weights, bias, backend="eager")
