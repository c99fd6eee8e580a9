"""Triton count sketch: forward as a gather through the inverse table of the hash, backward as
a gather through the hash itself. Neither uses atomics, so both are deterministic: bucket j
sums its inputs in ascending input order, every call.

The inverse (CSR) table of a hash h: [n] -> [d] is
    offsets (d + 1,) int32   inputs of bucket j are perm[offsets[j] : offsets[j + 1]]
    perm    (n,)     int32   input indices sorted by bucket (stable: ascending within a bucket)
    sign    (n,)     float32 the signs in perm's order
It is built with torch ops (argsort, an integer scatter-add, cumsum; no host sync) and cached
per (hash, sign) tensor pair, so a module's buffers are inverted once, not per call
(``inverse_table``).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .. import _dispatch
from .._tensor_cache import TensorCache
from . import DEVICE_TYPES
from ._common import dot_flops, no_dots, tl_compute_dtype

_BLOCK_ROWS = 8
_BLOCK_BUCKETS = 128
_BLOCK_INPUTS = 128


@dataclasses.dataclass(frozen=True)
class InverseTable:
    offsets: torch.Tensor
    perm: torch.Tensor
    sign: torch.Tensor


# The inverse of a module's hash/sign buffers is built once, not per call; see TensorCache for
# when an entry is rebuilt.
_TABLES: TensorCache[InverseTable] = TensorCache()


def _build_inverse_table(hash: torch.Tensor, sign: torch.Tensor, out_dim: int) -> InverseTable:
    hash = hash.long()
    perm = torch.argsort(hash, stable=True)
    # Bucket sizes by an integer scatter-add (exact, so deterministic) rather than bincount,
    # whose output length depends on the values: this builds on the meta device too.
    ones = torch.ones_like(hash, dtype=torch.int32)
    counts = torch.zeros(out_dim, dtype=torch.int32, device=hash.device).index_add_(0, hash, ones)
    offsets = torch.zeros(out_dim + 1, dtype=torch.int32, device=hash.device)
    offsets[1:] = counts.cumsum(0)
    return InverseTable(offsets, perm.to(torch.int32), sign[perm].to(torch.float32))


def inverse_table(hash: torch.Tensor, sign: torch.Tensor, out_dim: int) -> InverseTable:
    """The CSR inverse of ``hash`` with ``sign`` folded in, cached while both tensors live unchanged."""
    return _TABLES.get((hash, sign), lambda: _build_inverse_table(hash, sign, out_dim), out_dim)


@dot_flops(no_dots)
@triton.jit
def _gather_sketch_kernel(
    x_ptr, offsets_ptr, perm_ptr, sign_ptr, out_ptr,
    rows, inner, out_dim,
    stride_x_outer, stride_x_inner, stride_x_col, stride_out_row,
    ACC: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_BUCKETS: tl.constexpr,
):
    # Row r of x is (r // inner, r % inner) of a (rows // inner, inner, n) view, so (B, T, n)
    # inputs of any strides are read in place. A 1-D grid, bucket blocks fastest, keeps one
    # row block's programs adjacent in time so its rows are gathered from L2, not DRAM.
    pid = tl.program_id(0)
    bucket_blocks = tl.cdiv(out_dim, BLOCK_BUCKETS)
    r = (pid // bucket_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    j = (pid % bucket_blocks) * BLOCK_BUCKETS + tl.arange(0, BLOCK_BUCKETS)
    row_ok = r < rows
    bucket_ok = j < out_dim
    start = tl.load(offsets_ptr + j, mask=bucket_ok, other=0)
    count = tl.load(offsets_ptr + j + 1, mask=bucket_ok, other=0) - start
    r64 = r.to(tl.int64)
    x_rows = x_ptr + (r64 // inner) * stride_x_outer + (r64 % inner) * stride_x_inner
    acc = tl.zeros((BLOCK_ROWS, BLOCK_BUCKETS), dtype=ACC)
    # The loop runs to this block's fullest bucket: no host sync for a global maximum, and
    # blocks of light buckets finish early.
    for k in range(0, tl.max(count, axis=0)):
        live = k < count
        src = tl.load(perm_ptr + start + k, mask=live, other=0)
        s = tl.load(sign_ptr + start + k, mask=live, other=0.0)
        v = tl.load(x_rows[:, None] + src[None, :].to(tl.int64) * stride_x_col, mask=row_ok[:, None] & live[None, :], other=0.0)
        acc += v.to(ACC) * s[None, :].to(ACC)
    out = out_ptr + r64[:, None] * stride_out_row + j[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & bucket_ok[None, :])


@dot_flops(no_dots)
@triton.jit
def _gather_adjoint_kernel(
    g_ptr, hash_ptr, sign_ptr, out_ptr,
    rows, n,
    stride_g_row, stride_g_col, stride_out_row,
    ACC: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_INPUTS: tl.constexpr,
):
    pid = tl.program_id(0)
    input_blocks = tl.cdiv(n, BLOCK_INPUTS)
    r = (pid // input_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    i = (pid % input_blocks) * BLOCK_INPUTS + tl.arange(0, BLOCK_INPUTS)
    row_ok = r < rows
    input_ok = i < n
    h = tl.load(hash_ptr + i, mask=input_ok, other=0).to(tl.int64)
    s = tl.load(sign_ptr + i, mask=input_ok, other=0)
    r64 = r.to(tl.int64)
    mask = row_ok[:, None] & input_ok[None, :]
    v = tl.load(g_ptr + r64[:, None] * stride_g_row + h[None, :] * stride_g_col, mask=mask, other=0.0).to(ACC)
    # s is +-1, so the only rounding is the final cast. (The product is exact in any dtype, but
    # Triton's interpreter computes bfloat16 arithmetic wrongly, hence ACC.)
    out = v * s[None, :].to(ACC)
    tl.store(out_ptr + r64[:, None] * stride_out_row + i[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def sketch_into(out: torch.Tensor, x: torch.Tensor, table: InverseTable) -> None:
    """out (R, d) row-major <- count sketch of x, x (A, T, n) of any strides with R = A * T."""
    rows, out_dim = out.shape
    grid = (triton.cdiv(rows, _BLOCK_ROWS) * triton.cdiv(out_dim, _BLOCK_BUCKETS),)
    _gather_sketch_kernel[grid](
        x, table.offsets, table.perm, table.sign, out,
        rows, x.shape[1], out_dim,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0),
        ACC=tl_compute_dtype(x.dtype), BLOCK_ROWS=_BLOCK_ROWS, BLOCK_BUCKETS=_BLOCK_BUCKETS,
    )


def adjoint_into(out: torch.Tensor, grad: torch.Tensor, hash: torch.Tensor, sign: torch.Tensor) -> None:
    """out (R, n) row-major <- s(i) grad[:, h(i)], grad (R, d) of any strides."""
    rows, n = out.shape
    grid = (triton.cdiv(rows, _BLOCK_ROWS) * triton.cdiv(n, _BLOCK_INPUTS),)
    _gather_adjoint_kernel[grid](
        grad, hash.contiguous(), sign.contiguous(), out,
        rows, n,
        grad.stride(0), grad.stride(1), out.stride(0),
        ACC=tl_compute_dtype(grad.dtype), BLOCK_ROWS=_BLOCK_ROWS, BLOCK_INPUTS=_BLOCK_INPUTS,
    )


def _forward(x: torch.Tensor, hash: torch.Tensor, sign: torch.Tensor, out_dim: int) -> torch.Tensor:
    flat = x.reshape(-1, 1, x.shape[-1])  # a view whenever the leading dims collapse
    out = x.new_empty(x.shape[:-1] + (out_dim,))
    sketch_into(out.view(-1, out_dim), flat, inverse_table(hash, sign, out_dim))
    return out


def _backward(grad: torch.Tensor, hash: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    out = grad.new_empty(grad.shape[:-1] + hash.shape)
    adjoint_into(out.view(-1, hash.shape[0]), grad.reshape(-1, grad.shape[-1]), hash, sign)
    return out


_dispatch.register_kernel("count_sketch", "triton", forward=_forward, backward=_backward, device_types=DEVICE_TYPES)
