"""Triton tensor fusion (TFN): out = W vec(x~_0 (x) ... (x) x~_{M-1}) + b, x~_m = [1; x_m].

Nothing of size (B, P), P = prod_m (n_m + 1), is ever written, forward or backward. Every
kernel builds the tile of the flattened outer product it needs in registers from the
packed inputs (:func:`pack_with_ones`): the flat index k decomposes into
i_m = (k // stride_m) % (n_m + 1), one gather per modality, multiplied in float32.

- forward: grid (B blocks, h blocks); for each chunk of k, outer tile @ W[:, k]^T on
  tensor cores, bias in the epilogue.
- dW = g^T outer: grid (h blocks, k blocks), the same outer tile, reduced over B.
- dx_m, all M at once: grid (B blocks,). With the trailing modality L = M - 1 and the flat
  index k = a * (n_L + 1) + i_L, each (B block, j chunk of i_L) tile of G = g W is formed
  once per leading index a by a tensor-core matmul over h, and contracted in registers:
  dx~_L gets G scaled by the leading factors' product, and each leading modality m gets the
  row sum of G x~_L times the other leading factors, at its column i_m(a) (the
  factorisation of the reference's einsums). Cost: the forward's matmul work, with i_L
  padded to the j chunk, plus O(M^2) row operations per (b, a).
- bias gradient: grad.sum(0) in PyTorch.

Any number of modalities M >= 2. Modality sizes are limited to ``MAX_MODALITY_DIM``, and
the dx kernel keeps a (B block, pow2(sum_{m < L} (n_m + 1))) accumulator, so that sum is
limited to ``MAX_LEADING_WIDTH``; larger ones raise.
dtypes: see :mod:`._common`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _dispatch
from . import DEVICE_TYPES
from ._common import (
    KERNEL_DTYPES,
    autotune_configs,
    batch_bucket,
    dot,
    dot_flops,
    dot_precision,
    matmul_tile,
    modality_dims,
    pack_with_ones,
    padded,
)

MAX_MODALITY_DIM = 1023
# The dx kernel accumulates all modalities but the last in one (BLOCK_B, pow2) register tile.
MAX_LEADING_WIDTH = 1024


@triton.jit
def _packed_column(table_ptr, m, k):
    """The packed column holding x~_m[:, i_m(k)] for flat outer-product index (or indices) k."""
    return tl.load(table_ptr + 3 * m) + (k // tl.load(table_ptr + 3 * m + 2)) % tl.load(table_ptr + 3 * m + 1)


@triton.jit
def _outer_tile(xt_ptr, stride_xb, table_ptr, num_modalities, rows, row_mask, k, k_mask):
    """prod over modalities of x~_m[b, i_m(k)], float32, for b in rows and flat indices k;
    positions outside the masks read 1 (the caller zeroes them elsewhere)."""
    tile = tl.full((rows.shape[0], k.shape[0]), 1.0, dtype=tl.float32)
    row_ptrs = xt_ptr + rows.to(tl.int64)[:, None] * stride_xb
    mask = row_mask[:, None] & k_mask[None, :]
    for m in range(num_modalities):
        column = _packed_column(table_ptr, m, k)
        tile *= tl.load(row_ptrs + column[None, :], mask=mask, other=1.0).to(tl.float32)
    return tile


@triton.jit
def _leading_factor(x_rows, row_mask, table_ptr, m, k):
    """(packed column of x~_m[:, i_m(k)], that column of the rows as float32 (BLOCK_B,))."""
    column = _packed_column(table_ptr, m, k)
    return column, tl.load(x_rows + column, mask=row_mask, other=0.0).to(tl.float32)


# Three block sizes (named per kernel) and the warp count. Every config compiles without
# register spills for sm_90 in every dtype at the benchmark's GPU shape, with Triton 3.6's
# and 3.9's ptxas (python -m benchmarks.compile_report).
_SIZES = [(64, 64, 32, 8), (64, 128, 32, 8), (128, 128, 32, 8), (128, 64, 32, 8)]
# The dx kernel: (BLOCK_B, BLOCK_H, BLOCK_J, warps). BLOCK_J pads the trailing modality's
# n + 1 (65 at the benchmark's shape: 16 wastes the least); BLOCK_B = 32 gives 128 programs
# at B = 4096, about one per SM. It also holds a (BLOCK_B, LEAD_PAD) float32 accumulator:
# smaller h tiles (32, 64 with BLOCK_J = 16) and 64 x 64 x 32 spill in float32.
_GRAD_INPUT_SIZES = [(32, 128, 16, 4), (32, 128, 16, 8), (64, 128, 16, 8), (32, 64, 32, 4)]


def _configs(names, sizes=_SIZES):
    return autotune_configs([triton.Config(dict(zip(names, s[:3])), num_warps=s[3]) for s in sizes])


def _forward_flops(args, constexprs, programs):
    # Per program, one (BLOCK_B, BLOCK_K) @ (BLOCK_K, BLOCK_H) dot per BLOCK_K chunk of P.
    c = constexprs
    return {"w_ptr": programs * triton.cdiv(args["P"], c["BLOCK_K"]) * 2 * c["BLOCK_B"] * c["BLOCK_K"] * c["BLOCK_H"]}


@triton.autotune(configs=_configs(("BLOCK_B", "BLOCK_H", "BLOCK_K")), key=["B_BUCKET", "H", "P"])
@dot_flops(_forward_flops)
@triton.jit(do_not_specialize=["B_BUCKET"])
def _forward_kernel(
    xt_ptr, table_ptr, w_ptr, bias_ptr, out_ptr,
    B, B_BUCKET, H, P, num_modalities,
    stride_xb, stride_wh, stride_wk, stride_ob,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask, col_mask = rows < B, cols < H
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wh
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, P, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < P
        outer = _outer_tile(xt_ptr, stride_xb, table_ptr, num_modalities, rows, row_mask, k, k_mask)
        w = tl.load(w_cols + k[:, None] * stride_wk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = dot(outer.to(w.dtype), w, acc, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_ob + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _grad_weight_flops(args, constexprs, programs):
    # Per program, one (BLOCK_H, BLOCK_B) @ (BLOCK_B, BLOCK_K) dot per BLOCK_B chunk of the batch.
    c = constexprs
    return {"g_ptr": programs * triton.cdiv(args["B"], c["BLOCK_B"]) * 2 * c["BLOCK_H"] * c["BLOCK_B"] * c["BLOCK_K"]}


@triton.autotune(configs=_configs(("BLOCK_H", "BLOCK_K", "BLOCK_B")), key=["B_BUCKET", "H", "P"])
@dot_flops(_grad_weight_flops)
@triton.jit(do_not_specialize=["B_BUCKET"])
def _grad_weight_kernel(
    xt_ptr, table_ptr, g_ptr, gw_ptr,
    B, B_BUCKET, H, P, num_modalities,
    stride_xb, stride_gb, stride_gh, stride_gwh,
    PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask, k_mask = cols < H, k < P
    acc = tl.zeros((BLOCK_H, BLOCK_K), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        g_ptrs = g_ptr + rows.to(tl.int64)[None, :] * stride_gb + cols[:, None] * stride_gh
        g = tl.load(g_ptrs, mask=col_mask[:, None] & row_mask[None, :], other=0.0)
        outer = _outer_tile(xt_ptr, stride_xb, table_ptr, num_modalities, rows, row_mask, k, k_mask)
        acc = dot(g, outer.to(g.dtype), acc, PRECISION)
    out = gw_ptr + cols.to(tl.int64)[:, None] * stride_gwh + k[None, :]
    tl.store(out, acc.to(gw_ptr.dtype.element_ty), mask=col_mask[:, None] & k_mask[None, :])


def _grad_input_flops(args, constexprs, programs):
    # One (BLOCK_B, BLOCK_J) tile of g W per leading index a and chunk of the trailing
    # modality's d_L = n_L + 1, over h padded to BLOCK_H; the contractions with the factors
    # are not dots.
    c = constexprs
    last = modality_dims(args)[-1]
    tiles = programs * triton.cdiv(last, c["BLOCK_J"]) * (args["P"] // last)
    return {"w_ptr": tiles * 2 * c["BLOCK_B"] * c["BLOCK_J"] * padded(args["H"], c["BLOCK_H"])}


@triton.autotune(
    configs=_configs(("BLOCK_B", "BLOCK_H", "BLOCK_J"), _GRAD_INPUT_SIZES), key=["B_BUCKET", "H", "P", "LEAD_PAD"]
)
@dot_flops(_grad_input_flops)
@triton.jit(do_not_specialize=["B_BUCKET"])
def _grad_input_kernel(
    xt_ptr, table_ptr, g_ptr, w_ptr, gxt_ptr,
    B, B_BUCKET, H, P, num_modalities,
    stride_xb, stride_gb, stride_gh, stride_wh, stride_wk, stride_gxb,
    PRECISION: tl.constexpr, LEAD_PAD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """All M input gradients of a block of rows, from G = g W formed once.

    With L = M - 1 the trailing modality, k = a * d_L + j (a the leading modalities' flat
    index, j = i_L), c_a[b] = prod_{l < L} x~_l[b, i_l(a)] and c_a^m its factor without
    modality m:
        dx~_L[b, j]      = sum_a G[b, a d_L + j] c_a[b]
        dx~_m[b, i_m(a)] += s_a[b] c_a^m[b],   s_a[b] = sum_j G[b, a d_L + j] x~_L[b, j]   (m < L)
    The (BLOCK_B, BLOCK_J) tile of G is one tensor-core matmul over h; the rest are row
    scalings and row sums on it. The leading modalities' gradients, columns [0, LEAD_PAD)
    of the packed layout, accumulate across the j chunks in registers.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    x_rows = xt_ptr + rows.to(tl.int64) * stride_xb
    out_rows = gxt_ptr + rows.to(tl.int64)[:, None] * stride_gxb
    last = num_modalities - 1
    last_offset = tl.load(table_ptr + 3 * last)  # = the leading modalities' packed width
    last_dim = tl.load(table_ptr + 3 * last + 1)
    lead = tl.arange(0, LEAD_PAD)
    acc_lead = tl.zeros((BLOCK_B, LEAD_PAD), dtype=tl.float32)
    for j0 in range(0, last_dim, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_mask = j < last_dim
        # Columns past d_L read x~_L and W as 0, so they add nothing below.
        x_last = tl.load(x_rows[:, None] + last_offset + j[None, :],
                         mask=row_mask[:, None] & j_mask[None, :], other=0.0).to(tl.float32)
        acc_last = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
        for a in range(0, P // last_dim):
            k0 = a * last_dim
            gw = matmul_tile(g_ptr, stride_gb, stride_gh, w_ptr, stride_wh, stride_wk,
                             rows, k0 + j, row_mask, j_mask, 0, H, PRECISION, BLOCK_H)
            # In float32 whatever the input dtype: rounding first would add an error of the
            # dtype to every term of the sums over a and j.
            s = tl.sum(gw * x_last, axis=1)
            c = tl.full((BLOCK_B,), 1.0, dtype=tl.float32)
            for l in range(last):
                c *= _leading_factor(x_rows, row_mask, table_ptr, l, k0)[1]
            for m in range(last):
                # c_a^m by its own product, not c_a / x~_m, which inputs equal to 0 break: M
                # is small, and the row loads hit L1.
                column = _packed_column(table_ptr, m, k0)
                others = s
                for l in range(last):
                    others *= tl.where(l == m, 1.0, _leading_factor(x_rows, row_mask, table_ptr, l, k0)[1])
                acc_lead += tl.where(lead[None, :] == column, others[:, None], 0.0)
            acc_last += gw * c[:, None]
        tl.store(out_rows + last_offset + j[None, :], acc_last.to(gxt_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & j_mask[None, :])
    tl.store(out_rows + lead[None, :], acc_lead.to(gxt_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (lead < last_offset)[None, :])


def _check_supported(xs) -> None:
    largest = max(x.shape[1] for x in xs)
    if largest > MAX_MODALITY_DIM:
        raise ValueError(
            f"the triton tensor_fusion kernels support modality sizes up to {MAX_MODALITY_DIM}, "
            f"got {largest}; use backend='torch'"
        )
    leading = sum(x.shape[1] + 1 for x in xs[:-1])
    if leading > MAX_LEADING_WIDTH:
        raise ValueError(
            f"the triton tensor_fusion kernels support sum of (n_m + 1) over all modalities but the last "
            f"up to {MAX_LEADING_WIDTH}, got {leading}; use backend='torch'"
        )


def _lead_pad(offsets) -> int:
    """The dx kernel's accumulator width: the leading modalities' packed columns, pow2."""
    return max(16, triton.next_power_of_2(offsets[-1]))


def _forward(xs, weight, bias, split):
    # split: the residual layout of saving kernels; these save none and need no split.
    _check_supported(xs)
    packed, table, offsets, P = pack_with_ones(xs)
    B, H = packed.shape[0], weight.shape[0]
    out = torch.empty((B, H), dtype=weight.dtype, device=weight.device)
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(H, meta["BLOCK_H"]))  # noqa: E731
    _forward_kernel[grid](
        packed, table, weight, bias if bias is not None else weight, out,
        B, batch_bucket(B), H, P, len(xs),
        packed.stride(0), weight.stride(0), weight.stride(1), out.stride(0),
        HAS_BIAS=bias is not None, PRECISION=dot_precision(weight.dtype),
    )
    return out


def _backward(grad, xs, weight, bias, split):
    _check_supported(xs)
    packed, table, offsets, P = pack_with_ones(xs)
    B, H = packed.shape[0], weight.shape[0]
    precision = dot_precision(weight.dtype)
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    grid = lambda meta: (triton.cdiv(H, meta["BLOCK_H"]), triton.cdiv(P, meta["BLOCK_K"]))  # noqa: E731
    _grad_weight_kernel[grid](
        packed, table, grad, grad_weight,
        B, batch_bucket(B), H, P, len(xs),
        packed.stride(0), grad.stride(0), grad.stride(1), grad_weight.stride(0),
        PRECISION=precision,
    )
    grad_packed = torch.empty_like(packed)
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]),)  # noqa: E731
    _grad_input_kernel[grid](
        packed, table, grad, weight, grad_packed,
        B, batch_bucket(B), H, P, len(xs),
        packed.stride(0), grad.stride(0), grad.stride(1), weight.stride(0), weight.stride(1), grad_packed.stride(0),
        PRECISION=precision, LEAD_PAD=_lead_pad(offsets),
    )
    # Column 0 of each modality is the constant's gradient, which has no input. Copies, as
    # a custom op's outputs may not alias one another (views of a B = 1 buffer would).
    grad_xs = [grad_packed[:, s + 1 : s + 1 + x.shape[1]].clone() for s, x in zip(offsets, xs)]
    return grad_xs + [grad_weight, grad.sum(0)]


_dispatch.register_kernel(
    "tensor_fusion", "triton", forward=_forward, backward=_backward, device_types=DEVICE_TYPES, dtypes=KERNEL_DTYPES
)
