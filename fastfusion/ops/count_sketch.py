"""Count sketch: a random signed projection of R^n onto R^d.

With a hash h: [n] -> [d] and signs s: [n] -> {+1, -1},

    C(x)_j = sum_{i : h(i) = j} s(i) x_i          x (..., n) -> (..., d)

C is linear, so its backward is its adjoint, a gather: dx_i = s(i) g_{h(i)}.
"""

from __future__ import annotations

import torch

from .. import _dispatch
from .._validation import check_hash, check_positive_int, check_sign, check_tensor
from ._common import once_differentiable


def count_sketch_reference(x: torch.Tensor, hash: torch.Tensor, sign: torch.Tensor, out_dim: int) -> torch.Tensor:
    """Plain PyTorch (a scatter-add), differentiable by autograd.

    x: (..., n) floating; hash: (n,) int32/int64 in [0, out_dim); sign: (n,) of +1/-1 in
    any real dtype. Returns (..., out_dim) in x's dtype.
    """
    out = x.new_zeros(x.shape[:-1] + (out_dim,))
    return out.index_add_(-1, hash, x * sign.to(x.dtype))


def count_sketch_backward_reference(grad: torch.Tensor, hash: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """The adjoint of the count sketch: grad (..., d) -> (..., n), dx_i = s(i) grad_{h(i)}."""
    return grad.index_select(-1, hash) * sign.to(grad.dtype)


@torch.library.custom_op("fastfusion::count_sketch", mutates_args=())
def _count_sketch_op(x: torch.Tensor, hash: torch.Tensor, sign: torch.Tensor, out_dim: int, backend: str) -> torch.Tensor:
    return _dispatch.run_forward("count_sketch", backend, x, hash, sign, out_dim)


@_count_sketch_op.register_fake
def _(x, hash, sign, out_dim, backend):
    return x.new_empty(x.shape[:-1] + (out_dim,))


@torch.library.custom_op("fastfusion::count_sketch_backward", mutates_args=())
def _count_sketch_backward_op(grad: torch.Tensor, hash: torch.Tensor, sign: torch.Tensor, backend: str) -> torch.Tensor:
    return _dispatch.run_backward("count_sketch", backend, grad, hash, sign)


@_count_sketch_backward_op.register_fake
def _(grad, hash, sign, backend):
    return grad.new_empty(grad.shape[:-1] + hash.shape)


def _setup_context(ctx, inputs, output):
    x, hash, sign, _, backend = inputs
    ctx.backend = _dispatch.backend_for("count_sketch", x, backend)  # what the forward ran
    ctx.save_for_backward(hash, sign)


def _backward(ctx, grad):
    hash, sign = ctx.saved_tensors
    return _count_sketch_backward_op(grad.contiguous(), hash, sign, ctx.backend), None, None, None, None


_count_sketch_op.register_autograd(_backward, setup_context=_setup_context)
once_differentiable("count_sketch", _count_sketch_backward_op)

_dispatch.register_kernel(
    "count_sketch",
    "torch",
    forward=count_sketch_reference,
    backward=count_sketch_backward_reference,
)


def check_sketch_args(index: str, x: torch.Tensor, hash, sign, out_dim: int, *, values: bool = True) -> None:
    """Checks hash and sign of one modality (``index`` is e.g. "" or "[1]") against x."""
    n = x.shape[-1]
    check_hash(f"hash{index}", hash, n, out_dim, x, values=values)
    check_sign(f"sign{index}", sign, n, x, values=values)


def count_sketch(
    x: torch.Tensor,
    hash: torch.Tensor,
    sign: torch.Tensor,
    out_dim: int,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Count sketch of the last dimension of ``x``.

    x: (..., n) floating; hash: (n,) int32/int64 with values in [0, out_dim);
    sign: (n,) of +1/-1 (any integer or floating dtype). Returns (..., out_dim) in x's dtype.
    """
    check_tensor("x", x, batched=True)
    out_dim = check_positive_int("out_dim", out_dim)
    check_sketch_args("", x, hash, sign, out_dim)
    name = _dispatch.requested_backend(backend)
    if _dispatch.runs_reference(name):
        return count_sketch_reference(x, hash, sign, out_dim)
    return _count_sketch_op(x, hash, sign, out_dim, name)
