"""Factorized bilinear pooling, MFB (Yu et al., ICCV 2017).

    e = (x W_x^T + b_x) * (y W_y^T + b_y)            (..., o*k), times a dropout mask if given
    z_j = sum_{i < k} e_{j*k + i}                     (..., o)   sum pooling of consecutive groups
    out = signed_sqrt_l2(z)                           when ``normalize``

Weights use nn.Linear's layout (o*k, n), and the k entries of one output are adjacent, as
in the original MFB and its ports, so their weights load directly. The original applies
dropout to e; here that is a multiplicative ``dropout_mask`` (0 or 1/(1-p)) so the op
stays deterministic and the mask is reused by the backward.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _dispatch
from .._validation import check_eps, check_like, check_positive_int, check_shape, check_tensor
from ._common import autocast_dtype, cast_all, compute_dtype, flatten_leading, mark_residuals, once_differentiable
from .signed_sqrt_l2 import DEFAULT_EPS, signed_sqrt_l2_backward_reference, signed_sqrt_l2_reference


def _projections(x, y, weight_x, bias_x, weight_y, bias_y):
    return F.linear(x, weight_x, bias_x), F.linear(y, weight_y, bias_y)


def _forward(x, y, weight_x, bias_x, weight_y, bias_y, factor: int, dropout_mask, normalize: bool, eps: float):
    """Plain-PyTorch MFB on (B, n) inputs -> (B, o); differentiable."""
    proj_x, proj_y = _projections(x, y, weight_x, bias_x, weight_y, bias_y)
    expanded = proj_x * proj_y
    if dropout_mask is not None:
        expanded = expanded * dropout_mask
    z = expanded.unflatten(-1, (-1, factor)).sum(-1)
    return signed_sqrt_l2_reference(z, eps) if normalize else z


def _backward(grad, x, y, weight_x, bias_x, weight_y, bias_y, factor: int, dropout_mask, normalize: bool, eps: float):
    """Gradients [x, y, weight_x, bias_x, weight_y, bias_y]; bias gradients are returned
    even when a bias is None (the autograd wrapper drops them)."""
    proj_x, proj_y = _projections(x, y, weight_x, bias_x, weight_y, bias_y)
    if normalize:
        expanded = proj_x * proj_y
        if dropout_mask is not None:
            expanded = expanded * dropout_mask
        grad = signed_sqrt_l2_backward_reference(grad, expanded.unflatten(-1, (-1, factor)).sum(-1), eps)
    grad_expanded = grad.repeat_interleave(factor, dim=-1)
    if dropout_mask is not None:
        grad_expanded = grad_expanded * dropout_mask
    grad_px, grad_py = grad_expanded * proj_y, grad_expanded * proj_x
    return [
        grad_px @ weight_x,
        grad_py @ weight_y,
        grad_px.t() @ x,
        grad_px.sum(0),
        grad_py.t() @ y,
        grad_py.sum(0),
    ]


# Residuals (backends that save them): the projections [x W_x^T + b_x, y W_y^T + b_y], each
# (B, o*k) in the compute dtype.
@torch.library.custom_op("fastfusion::factorized_bilinear", mutates_args=())
def _factorized_bilinear_op(
    x: torch.Tensor,
    y: torch.Tensor,
    weight_x: torch.Tensor,
    bias_x: Optional[torch.Tensor],
    weight_y: torch.Tensor,
    bias_y: Optional[torch.Tensor],
    factor: int,
    dropout_mask: Optional[torch.Tensor],
    normalize: bool,
    eps: float,
    save_residuals: bool,
    backend: str,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    return _dispatch.run_forward_saving(
        "factorized_bilinear", backend, save_residuals, x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, normalize, eps
    )


@_factorized_bilinear_op.register_fake
def _(x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, normalize, eps, save_residuals, backend):
    hidden = weight_x.shape[0]
    residuals = []
    if _dispatch.residuals_saved(
        "factorized_bilinear", backend, save_residuals, x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, normalize, eps
    ):
        residuals = [x.new_empty((x.shape[0], hidden), dtype=compute_dtype(x.dtype)) for _ in range(2)]
    return x.new_empty((x.shape[0], hidden // factor)), residuals


@torch.library.custom_op("fastfusion::factorized_bilinear_backward", mutates_args=())
def _factorized_bilinear_backward_op(
    grad: torch.Tensor,
    residuals: List[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    weight_x: torch.Tensor,
    bias_x: Optional[torch.Tensor],
    weight_y: torch.Tensor,
    bias_y: Optional[torch.Tensor],
    factor: int,
    dropout_mask: Optional[torch.Tensor],
    normalize: bool,
    eps: float,
    backend: str,
) -> List[torch.Tensor]:
    return _dispatch.run_backward_saving(
        "factorized_bilinear", backend, grad, residuals, x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, normalize, eps
    )


@_factorized_bilinear_backward_op.register_fake
def _(grad, residuals, x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, normalize, eps, backend):
    hidden = weight_x.shape[:1]
    return [t.new_empty(t.shape) for t in (x, y, weight_x)] + [x.new_empty(hidden), weight_y.new_empty(weight_y.shape), y.new_empty(hidden)]


def _setup_context(ctx, inputs, output):
    x, y, weight_x, bias_x, weight_y, bias_y, ctx.factor, dropout_mask, ctx.normalize, ctx.eps, _, backend = inputs
    ctx.backend = _dispatch.backend_for("factorized_bilinear", x, backend)  # what the forward ran
    residuals = output[1]
    mark_residuals(ctx, residuals)
    ctx.has_bias = (bias_x is not None, bias_y is not None)
    ctx.has_mask = dropout_mask is not None
    ctx.num_residuals = len(residuals)
    optional = [t for t in (bias_x, bias_y, dropout_mask) if t is not None]
    ctx.save_for_backward(x, y, weight_x, weight_y, *residuals, *optional)


def _autograd_backward(ctx, grad, _grad_residuals):
    if grad is None:  # the output's gradient is undefined: so are the inputs'
        return (None,) * 12
    x, y, weight_x, weight_y, *rest = ctx.saved_tensors
    residuals, optional = rest[: ctx.num_residuals], iter(rest[ctx.num_residuals :])
    bias_x = next(optional) if ctx.has_bias[0] else None
    bias_y = next(optional) if ctx.has_bias[1] else None
    dropout_mask = next(optional) if ctx.has_mask else None
    gx, gy, gwx, gbx, gwy, gby = _factorized_bilinear_backward_op(
        grad.contiguous(), residuals, x, y, weight_x, bias_x, weight_y, bias_y, ctx.factor, dropout_mask, ctx.normalize, ctx.eps, ctx.backend
    )
    gbx = gbx if ctx.has_bias[0] else None
    gby = gby if ctx.has_bias[1] else None
    return gx, gy, gwx, gbx, gwy, gby, None, None, None, None, None, None


_factorized_bilinear_op.register_autograd(_autograd_backward, setup_context=_setup_context)
once_differentiable("factorized_bilinear", _factorized_bilinear_backward_op)

_dispatch.register_kernel("factorized_bilinear", "torch", forward=_forward, backward=_backward)


def factorized_bilinear(
    x: torch.Tensor,
    y: torch.Tensor,
    weight_x: torch.Tensor,
    bias_x: torch.Tensor | None,
    weight_y: torch.Tensor,
    bias_y: torch.Tensor | None,
    factor: int,
    normalize: bool = True,
    *,
    dropout_mask: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
    backend: str | None = None,
) -> torch.Tensor:
    """Factorized bilinear pooling (MFB); see the module docstring for the math.

    x: (..., n_x), y: (..., n_y) with the same leading shape; weight_x: (o*factor, n_x),
    weight_y: (o*factor, n_y); biases (o*factor,) or None; dropout_mask: (..., o*factor)
    or None. Returns (..., o) in x's dtype (under autocast, the autocast dtype).
    """
    check_tensor("x", x, batched=True)
    check_tensor("y", y, batched=True)
    factor = check_positive_int("factor", factor)
    eps = check_eps("eps", eps)
    check_like("y", y, "x", x)
    if y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"y has leading shape {tuple(y.shape[:-1])} but x has {tuple(x.shape[:-1])}; they must match")
    check_tensor("weight_x", weight_x, min_ndim=2)
    check_tensor("weight_y", weight_y, min_ndim=2)
    hidden = weight_x.shape[0]
    if hidden % factor:
        raise ValueError(f"weight_x has {hidden} rows, not a multiple of factor={factor}")
    check_shape("weight_x", weight_x, (hidden, x.shape[-1]))
    check_shape("weight_y", weight_y, (hidden, y.shape[-1]))
    for name, t in (("weight_x", weight_x), ("weight_y", weight_y)):
        check_like(name, t, "x", x)
    for name, t in (("bias_x", bias_x), ("bias_y", bias_y)):
        if t is not None:
            check_tensor(name, t)
            check_shape(name, t, (hidden,))
            check_like(name, t, "x", x)
    if dropout_mask is not None:
        check_tensor("dropout_mask", dropout_mask, batched=True)
        check_shape("dropout_mask", dropout_mask, tuple(x.shape[:-1]) + (hidden,))
        check_like("dropout_mask", dropout_mask, "x", x, dtype=False)
    lowered = autocast_dtype(x.device.type)
    if lowered is not None:
        with torch.autocast(x.device.type, enabled=False):
            x, y, weight_x, bias_x, weight_y, bias_y = cast_all((x, y, weight_x, bias_x, weight_y, bias_y), lowered)
            return factorized_bilinear(
                x, y, weight_x, bias_x, weight_y, bias_y, factor, normalize, dropout_mask=dropout_mask, eps=eps, backend=backend
            )
    if dropout_mask is not None:
        dropout_mask = flatten_leading(dropout_mask.to(x.dtype))
    name = _dispatch.requested_backend(backend)
    args = (flatten_leading(x), flatten_leading(y), weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, normalize, eps)
    if _dispatch.runs_reference(name):
        out = _forward(*args)
    else:
        save = _dispatch.wants_residuals(x, y, weight_x, bias_x, weight_y, bias_y)
        out = _factorized_bilinear_op(*args, save, name)[0]
    return out.reshape(tuple(x.shape[:-1]) + (hidden // factor,))


def factorized_bilinear_reference(
    x, y, weight_x, bias_x, weight_y, bias_y, factor, normalize=True, *, dropout_mask=None, eps=DEFAULT_EPS
) -> torch.Tensor:
    """Plain-PyTorch :func:`factorized_bilinear` (autograd, no custom op)."""
    return factorized_bilinear(
        x, y, weight_x, bias_x, weight_y, bias_y, factor, normalize, dropout_mask=dropout_mask, eps=eps, backend="eager"
    )
