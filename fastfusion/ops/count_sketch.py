"""Count sketch: a random signed projection of R^n onto R^d.

With a hash h: [n] -> [d] and signs s: [n] -> {+1, -1},

    C(x)_j = sum_{i : h(i) = j} s(i) x_i          x (..., n) -> (..., d)

C is linear, so its backward is its adjoint, a gather: dx_i = s(i) g_{h(i)}.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from .. import _custom_op
from .._validation import check_hash, check_positive_int, check_sign, check_tensor
from ..flops import no_flops

# The public function(s), exported by fastfusion, and their references, by fastfusion.reference.
__all__ = ["count_sketch", "count_sketch_reference"]


def count_sketch_reference(x: torch.Tensor, hash: torch.Tensor, sign: torch.Tensor, out_dim: int) -> torch.Tensor:
    """Plain PyTorch (a scatter-add), differentiable by autograd.

    x: (..., n) floating; hash: (n,) int32/int64 in [0, out_dim); sign: (n,) of +1/-1 in
    any real dtype. Returns (..., out_dim) in x's dtype.
    """
    out = x.new_zeros(x.shape[:-1] + (out_dim,))
    return out.index_add_(-1, hash, x * sign.to(x.dtype))


def count_sketch_adjoint(grad: torch.Tensor, hash: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """The adjoint of the count sketch: grad (..., d) -> (..., n), dx_i = s(i) grad_{h(i)}."""
    return grad.index_select(-1, hash) * sign.to(grad.dtype)


SPEC = _custom_op.register(_custom_op.OpSpec(
    name="count_sketch",
    args="Tensor x, Tensor hash, Tensor sign, SymInt out_dim",
    forward=count_sketch_reference,
    backward=count_sketch_adjoint,
    fake=lambda x, hash, sign, out_dim: x.new_empty(x.shape[:-1] + (out_dim,)),
    differentiable=("x",),
    flops=lambda args: Counter(scatter_add=math.prod(args["x"])),
    backward_flops=no_flops,  # dx_i = s(i) g_h(i), a gather
    saved=("hash", "sign"),  # the adjoint needs no x
    backward_fake=lambda grad, hash, sign: grad.new_empty(grad.shape[:-1] + hash.shape),
))


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
    return _custom_op.call("count_sketch", backend, x, hash, sign, out_dim)
