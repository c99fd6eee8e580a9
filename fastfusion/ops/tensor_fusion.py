"""Tensor fusion, TFN (Zadeh et al., EMNLP 2017).

Each modality gets a constant 1 prepended, x~_m = [1; x_m], and

    out = W vec(x~_1 (x) x~_2 (x) ... (x) x~_M) + b            (..., h)

with the outer product flattened modality-0-major (the official order: index
i_0 * prod_{m>0}(n_m+1) + ...), W in nn.Linear's layout (h, prod_m (n_m + 1)), so the
official post-fusion layer's weights load directly. The reference materialises the outer
product, (B, prod_m (n_m + 1)) values, which is what fused kernels avoid.
"""

from __future__ import annotations

import math
import string
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _dispatch
from .._validation import check_like, check_modality_tensors, check_shape, check_tensor
from ._common import autocast_dtype, cast_all, compute_dtype, flatten_leading, mark_residuals, once_differentiable


def _with_one(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (1, 0), value=1.0)


def _outer(xs) -> torch.Tensor:
    """vec(x~_1 (x) ... (x) x~_M) for (B, n_m) inputs: (B, prod_m (n_m + 1))."""
    result = _with_one(xs[0])
    for x in xs[1:]:
        result = (result.unsqueeze(-1) * _with_one(x).unsqueeze(-2)).flatten(-2)
    return result


def _forward(xs, weight, bias) -> torch.Tensor:
    """Plain-PyTorch TFN on (B, n_m) inputs -> (B, h); differentiable."""
    return F.linear(_outer(xs), weight, bias)


def _backward(grad, xs, weight, bias) -> list[torch.Tensor]:
    """Gradients [*xs, weight, bias]; the bias gradient is returned even when bias is None."""
    grad_outer = (grad @ weight).unflatten(-1, [x.shape[-1] + 1 for x in xs])
    padded = [_with_one(x) for x in xs]
    letters = string.ascii_letters[1 : len(xs) + 1]  # 'a' is the batch
    grad_xs = []
    for m in range(len(xs)):
        others = [f"a{letters[k]}" for k in range(len(xs)) if k != m]
        spec = f"a{letters},{','.join(others)}->a{letters[m]}"
        contracted = torch.einsum(spec, grad_outer, *[p for k, p in enumerate(padded) if k != m])
        grad_xs.append(contracted[:, 1:])
    return grad_xs + [grad.t() @ _outer(xs), grad.sum(0)]


def _residual_width(dims, hidden: int) -> int:
    """h * P_A: the modalities split into a leading group [0, k) and a trailing one [k, M),
    with P_A, P_B the groups' outer-product sizes and k the first split minimising
    h * P_A + P_B (csrc/cpu/fusion.cpp splits by the same rule)."""
    sizes = [n + 1 for n in dims]
    costs = [(hidden * math.prod(sizes[:k]) + math.prod(sizes[k:]), k) for k in range(1, len(sizes))]
    split = min(costs, key=lambda cost_split: cost_split[0])[1]  # min keeps the first of equals
    return hidden * math.prod(sizes[:split])


# Residuals (backends that save them): Y = u @ W.view(h * P_A, P_B)^T, (B, h * P_A) in the
# compute dtype, u the trailing group's outer product (see _residual_width).
@torch.library.custom_op("fastfusion::tensor_fusion", mutates_args=())
def _tensor_fusion_op(
    xs: List[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor], save_residuals: bool, backend: str
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    return _dispatch.run_forward_saving("tensor_fusion", backend, save_residuals, xs, weight, bias)


@_tensor_fusion_op.register_fake
def _(xs, weight, bias, save_residuals, backend):
    batch, hidden = xs[0].shape[0], weight.shape[0]
    residuals = []
    if _dispatch.residuals_saved("tensor_fusion", backend, save_residuals, xs, weight, bias):
        width = _residual_width([x.shape[1] for x in xs], hidden)
        residuals = [xs[0].new_empty((batch, width), dtype=compute_dtype(xs[0].dtype))]
    return xs[0].new_empty((batch, hidden)), residuals


@torch.library.custom_op("fastfusion::tensor_fusion_backward", mutates_args=())
def _tensor_fusion_backward_op(
    grad: torch.Tensor,
    residuals: List[torch.Tensor],
    xs: List[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    backend: str,
) -> List[torch.Tensor]:
    return _dispatch.run_backward_saving("tensor_fusion", backend, grad, residuals, xs, weight, bias)


@_tensor_fusion_backward_op.register_fake
def _(grad, residuals, xs, weight, bias, backend):
    return [x.new_empty(x.shape) for x in xs] + [weight.new_empty(weight.shape), weight.new_empty(weight.shape[:1])]


def _setup_context(ctx, inputs, output):
    xs, weight, bias, _, backend = inputs
    ctx.backend = _dispatch.backend_for("tensor_fusion", xs[0], backend)  # what the forward ran
    residuals = output[1]
    mark_residuals(ctx, residuals)
    ctx.num_modalities = len(xs)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(*xs, weight, *([bias] if bias is not None else []), *residuals)


def _autograd_backward(ctx, grad, _grad_residuals):
    m = ctx.num_modalities
    if grad is None:  # the output's gradient is undefined: so are the inputs'
        return [None] * m, None, None, None, None
    saved = ctx.saved_tensors
    xs, weight = list(saved[:m]), saved[m]
    bias = saved[m + 1] if ctx.has_bias else None
    residuals = list(saved[m + 1 + ctx.has_bias :])
    grads = _tensor_fusion_backward_op(grad.contiguous(), residuals, xs, weight, bias, ctx.backend)
    return list(grads[:m]), grads[m], grads[m + 1] if ctx.has_bias else None, None, None


_tensor_fusion_op.register_autograd(_autograd_backward, setup_context=_setup_context)
once_differentiable("tensor_fusion", _tensor_fusion_backward_op)

_dispatch.register_kernel("tensor_fusion", "torch", forward=_forward, backward=_backward)


def tensor_fusion(xs, weight, bias, *, backend: str | None = None) -> torch.Tensor:
    """Tensor fusion; see the module docstring for the math.

    xs: list of M >= 2 floating tensors (..., n_m) with the same leading shape;
    weight: (h, prod_m (n_m + 1)); bias: (h,) or None. Returns (..., h).
    """
    xs = check_modality_tensors("xs", xs)
    check_tensor("weight", weight, min_ndim=2)
    fused_dim = 1
    for x in xs:
        fused_dim *= x.shape[-1] + 1
    check_shape("weight", weight, (weight.shape[0], fused_dim))
    check_like("weight", weight, "xs[0]", xs[0])
    if bias is not None:
        check_tensor("bias", bias)
        check_shape("bias", bias, weight.shape[:1])
        check_like("bias", bias, "xs[0]", xs[0])
    lowered = autocast_dtype(xs[0].device.type)
    if lowered is not None:
        with torch.autocast(xs[0].device.type, enabled=False):
            weight, bias = cast_all((weight, bias), lowered)
            return tensor_fusion(cast_all(xs, lowered), weight, bias, backend=backend)
    name = _dispatch.requested_backend(backend)
    args = ([flatten_leading(x) for x in xs], weight, bias)
    if _dispatch.runs_reference(name):
        out = _forward(*args)
    else:
        save = _dispatch.wants_residuals(*xs, weight, bias)
        out = _tensor_fusion_op(*args, save, name)[0]
    return out.reshape(tuple(xs[0].shape[:-1]) + (weight.shape[0],))


def tensor_fusion_reference(xs, weight, bias) -> torch.Tensor:
    """Plain-PyTorch :func:`tensor_fusion` (autograd, no custom op)."""
    return tensor_fusion(xs, weight, bias, backend="eager")
