"""Count sketch: a random signed projection of R^n onto R^d.

With a hash h: [n] -> [d] and signs s: [n] -> {+1, -1},

    C(x)_j = sum_{i : h(i) = j} s(i) x_i          x (..., n) -> (..., d)

C is linear, so its backward is its adjoint, a gather: dx_i = s(i) g_{h(i)}.
"""

from __future__ import annotations

import math
import warnings
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


def _benchmark_case(s, randn):
    """x (B, n), and the hash and sign drawn as the modules draw them (seed 0)."""
    from ..modules import draw_hashes_and_signs  # modules imports the ops: imported on use

    [(hash, sign)] = draw_hashes_and_signs([s["n"]], s["d"], seed=0)
    return (randn(s["B"], s["n"]),), (hash, sign), lambda f, b, x: f(x, b[0], b[1], s["d"])


def _eager_variants(buffers, sizes, dtype: torch.dtype) -> dict:
    """The plain-PyTorch ways to count-sketch: the scatter-add (the reference), a sparse and a
    dense matmul with the (n, d) sketch matrix, each with the reference's signature."""
    hash, sign = buffers
    n, out_dim = hash.numel(), sizes["d"]
    if hash.device.type == "meta":  # sparse tensors have no meta kernels: the dense ways only
        sketch = torch.empty(n, out_dim, dtype=dtype, device="meta")
        return {"index_add": count_sketch_reference, "dense_mm": lambda x, hash, sign, out_dim: x @ sketch}
    rows = torch.arange(n, device=hash.device)
    # (d, n) so that the sparse operand comes first, the layout torch.sparse.mm differentiates.
    sketch_t = torch.sparse_coo_tensor(
        torch.stack([hash, rows]), sign.to(dtype), (out_dim, n), check_invariants=True
    ).coalesce()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        sketch_t_csr = sketch_t.to_sparse_csr()
    sketch = sketch_t.to_dense().t().contiguous()
    return {
        "index_add": count_sketch_reference,
        "sparse_mm": lambda x, hash, sign, out_dim: torch.sparse.mm(sketch_t_csr, x.t()).t(),
        "dense_mm": lambda x, hash, sign, out_dim: x @ sketch,
    }


_custom_op.declare_benchmark(_custom_op.Benchmark(
    op="count_sketch", variant=None, function=count_sketch, reference=count_sketch_reference,
    shapes={
        "cuda": dict(B=8192, n=2048, d=16384),
        "cpu": dict(B=1024, n=1024, d=8192),
        "cpu-quick": dict(B=256, n=512, d=4096),
        "tiny": dict(B=4, n=16, d=32),
    },
    build=_benchmark_case,
    eager_variants=_eager_variants,
))
