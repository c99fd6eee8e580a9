"""Triton low-rank multimodal fusion (LMF): out = sum_r w_r prod_m (x~_m W_m[r]) + b.

- forward, fully fused: grid (B blocks, h blocks); for every rank and modality the
  projection tile is a tensor-core matmul, multiplied across modalities and rank-reduced
  with w_r in float32 registers. Nothing of size (M, rank, B, h) exists in memory. Each x_m
  is read in place, through its own pointer argument at its own strides (any strides: no
  packed or contiguous copy of the inputs is made), and the factors as one (rank, S, h)
  tensor, S = sum_m (n_m + 1), a view of one copy of all of them (``_flat_factors``, made
  once per version of the factors and shared with the backward); x~_m W_m[r] is the matmul
  x_m W_m[r, 1:] plus the constant row W_m[r, 0], added as a bias. When autograd records
  the call (``save_residuals``) the kernel also stores every projection tile it computes:
  the op's residuals P_m (below), in compute_dtype (float32 for half inputs). The stores
  are B * rank * h values per modality against the tile's 2 * n_m FLOPs each, so the
  kernel stays compute-bound (roofline model at the benchmark shape). Reading x_m in place
  rather than packing [1, x_0, 1, x_1, ...] saves two launches and an input-sized write
  and re-read per call (model, H100, bf16 forward: 0.067 -> 0.044 ms, the floor).
- backward, each product formed once, in two fused GEMM kernels: with P_m = x~_m W_m as
  (B, rank*h), column r*h + j holding (x~_m W_m[r])[:, j], and
  grad_proj[m] = w_r * g * prod_{l != m} P_l (B, rank*h),
  1. P_m: the forward's residuals, or, when it saved none, one cuBLAS GEMM per modality,
     x_m (B, n_m) @ W_m[:, 1:] as (n_m, rank*h), the constant row W_m[:, 0] added as addmm's
     bias rather than materialising [1, x_m];
  2. ``_grad_input_kernel``: grad_x_m = grad_proj[m] @ (W_m[:, 1:] as (n_m, rank*h))^T for
     every modality in one launch, grid (B blocks, column tiles of all x_m);
  3. ``_grad_factor_kernel``: grad_W_m[r] = x~_m^T grad_proj[m][:, r] for every modality in
     one launch, grid (column tiles of all x_m, rank*h blocks), x_m read in place, the
     constant row the column sums of grad_proj[m] in the same programs.
  Each program forms the grad_proj[m] tiles it multiplies in registers from g, w and the
  P_l, rounded to the input dtype as the reference's grad_proj is, so grad_proj never exists
  in memory; the programs of x_0's first column tile also form the per-row sums
  sum_h g * prod_m P_m[r] that give grad_weights (float32, no atomics: deterministic).
  grad_bias is grad.sum(0). The elementwise products are recomputed once per column tile
  (n_m / BLOCK_N times), work the tensor cores' GEMM hides, against a write and re-read of
  grad_proj (M * B * rank * h values) and 6 launches more for the unfused form (roofline
  model, H100, bf16 forward+backward: 0.276 -> 0.182 ms with packed inputs, 0.159 ms with
  the in-place reads).
  Memory: P (the residuals, kept from the forward to the backward, M * B * rank * h values
  in the compute dtype: 100 MB at B = 4096, M = 3, rank = 8, h = 256), the cached
  parameter-sized copy of the factors in the (S, rank*h) layout; nothing input-sized.
  Pointer slots: custom-op outputs may not alias, so the residuals and gradients are M
  separate tensors, and the kernels take one pointer each for them and for the inputs, up
  to ``_MAX_SAVED`` = 4 modalities per launch; more run in groups of four, one launch of
  each kernel per group. The forward's groups hand their product of projections on in a
  (B, rank*h) float32 buffer (M > 4 only), and the backward stacks the residuals for its
  products over all modalities (see ``_forward``, ``_backward``).
  Fusing the gradients as the forward is, each gradient program recomputing the
  projections x~_l W_l it needs, costs several times the forward's FLOPs, which the
  roofline model put (before this design) at 0.05x eager in float32 and 0.17x in bfloat16
  at the GPU shape; here only the cheap elementwise products are recomputed.

dtypes: see :mod:`._common`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _dispatch
from .._dispatch import compute_dtype
from .._tensor_cache import TensorCache
from . import DEVICE_TYPES, _common
from ._common import (
    KERNEL_DTYPES,
    autotune_configs,
    batch_bucket,
    dot,
    dot_flops,
    dot_precision,
    matmul_tile,
    modality_dims,
    padded,
)

# Every config compiles without register spills for sm_90 in every dtype and mode at the
# benchmark's GPU shape, with Triton 3.9 and with Triton 3.6 (the GPU image's), as
# python -m benchmarks.compile_report shows. Where the two disagree: 32 x 64 at 4 warps
# spills 8 B in float32 when saving at 3 stages with 3.9 (so 2); 32 x 32 with BLOCK_K = 32
# spills 16-32 B in half precision at 4 warps with 3.6 (at 2 stages with 3.9; at 2 warps in
# float32 with 3.6), so its K steps are 16.
_CONFIGS = autotune_configs([
    triton.Config({"BLOCK_B": b, "BLOCK_H": h, "BLOCK_K": k}, num_warps=w, num_stages=st)
    for b, h, k, w, st in [(32, 32, 16, 4, 3), (32, 64, 32, 4, 2), (64, 32, 32, 8, 3), (64, 64, 32, 16, 3)]
])
# The fused backward's GEMMs (module docstring): no spills for sm_90 in any dtype with
# Triton 3.9 or 3.6 (python -m benchmarks.compile_report; for sm_80, 64 x 64 at 4 warps
# and 128 x 64 at 8 of grad_W spill in float32):
# (BLOCK_B, BLOCK_N, BLOCK_K) tiles of grad_x and (BLOCK_N, BLOCK_C, BLOCK_B) tiles of grad_W.
_GRAD_INPUT_CONFIGS = autotune_configs([
    triton.Config({"BLOCK_B": b, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
    for b, n, k, w in [(64, 64, 32, 4), (64, 128, 32, 8), (128, 64, 32, 8), (128, 128, 32, 8)]
])
_GRAD_FACTOR_CONFIGS = autotune_configs([
    triton.Config({"BLOCK_N": n, "BLOCK_C": c, "BLOCK_B": b}, num_warps=w)
    for n, c, b, w in [(64, 64, 32, 4), (64, 128, 32, 8), (128, 64, 32, 8), (128, 128, 32, 8)]
])


@triton.jit
def _select(m, p0, p1, p2, p3):
    """The m-th of p0..p3, p0 for m >= 4: a constexpr m picks it when compiling, a runtime m
    branches (then the four must have one type)."""
    p = p0
    if m == 1:
        p = p1
    elif m == 2:
        p = p2
    elif m == 3:
        p = p3
    return p


@triton.jit
def _column_stride(m, s0, s1, s2, s3, UNIT_N: tl.constexpr):
    """The column stride of input m (runtime m) as _select's branches can merge it, an int64
    (Triton passes a stride of 1 as a constant); with UNIT_N, the constant 1, which keeps the
    loads of rows of x contiguous to the compiler (vectorised)."""
    stride = 1
    if not UNIT_N:
        stride = _select(m, tl.cast(s0, tl.int64), tl.cast(s1, tl.int64), tl.cast(s2, tl.int64),
                         tl.cast(s3, tl.int64))
    return stride


def _forward_flops(args, constexprs, programs):
    # Per program and rank, one (BLOCK_B, BLOCK_H) projection per modality of the group, over
    # its n_m columns padded to BLOCK_K steps (the constant row is added, not multiplied).
    c = constexprs
    dims = modality_dims(args)[c["first"] : c["first"] + c["GROUP"]]
    per_rank = sum(2 * c["BLOCK_B"] * c["BLOCK_H"] * padded(d - 1, c["BLOCK_K"]) for d in dims)
    return {"x0_ptr": programs * args["R"] * per_rank}


@triton.autotune(configs=_CONFIGS, key=["B_BUCKET", "H", "S", "R", "GROUP", "FIRST", "LAST", "SAVE", "UNIT_N"])
@dot_flops(_forward_flops)
@triton.jit(do_not_specialize=["B_BUCKET"])
def _forward_kernel(
    x0_ptr, x1_ptr, x2_ptr, x3_ptr, table_ptr, f_ptr, weights_ptr, bias_ptr, out_ptr, partial_ptr,
    res0_ptr, res1_ptr, res2_ptr, res3_ptr,
    B, B_BUCKET, H, S, R, first,
    stride_x0b, stride_x0n, stride_x1b, stride_x1n, stride_x2b, stride_x2n, stride_x3b, stride_x3n,
    stride_fr, stride_fs, stride_fh, stride_w, stride_ob, stride_resb,
    GROUP: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, SAVE: tl.constexpr, UNIT_N: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The product over modalities first..first+GROUP-1 (x_(first+i) at x_i, (B, n) with its
    own strides) of x~_m W_m[r] = x_m W_m[r, 1:] + W_m[r, 0], per rank, on a (BLOCK_B, BLOCK_H)
    tile. FIRST: the product starts at 1, else at partial (B, R*H) float32, column r*H + h;
    LAST: out = sum_r w_r * product + bias (B, H), else the product goes to partial. With
    SAVE every projection tile also goes to residual i (res0..res3, (B, R*H), column r*H + h),
    in that tensor's dtype. UNIT_N: every x_i has unit column stride."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask, col_mask = rows < B, cols < H
    mask = row_mask[:, None] & col_mask[None, :]
    # Offsets into (B, R*H) row-major tensors (partial and the residuals share R*H).
    rh = rows.to(tl.int64)[:, None] * stride_resb + cols[None, :]
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for r in range(R):
        if FIRST:
            fused = tl.full((BLOCK_B, BLOCK_H), 1.0, dtype=tl.float32)
        else:
            fused = tl.load(partial_ptr + rh + r * H, mask=mask, other=1.0)
        for i in range(GROUP):
            offset = tl.load(table_ptr + 3 * (first + i))
            dim = tl.load(table_ptr + 3 * (first + i) + 1) - 1
            factor = f_ptr + r * stride_fr + offset * stride_fs  # W_m[r], its constant row first
            projection = matmul_tile(
                _select(i, x0_ptr, x1_ptr, x2_ptr, x3_ptr),
                _select(i, tl.cast(stride_x0b, tl.int64), tl.cast(stride_x1b, tl.int64),
                        tl.cast(stride_x2b, tl.int64), tl.cast(stride_x3b, tl.int64)),
                _column_stride(i, stride_x0n, stride_x1n, stride_x2n, stride_x3n, UNIT_N),
                factor + stride_fs, stride_fs, stride_fh, rows, cols, row_mask, col_mask, 0, dim, PRECISION, BLOCK_K,
            )
            projection += tl.load(factor + cols * stride_fh, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            if SAVE:
                res = _select(i, res0_ptr, res1_ptr, res2_ptr, res3_ptr)
                tl.store(res + rh + r * H, projection.to(res.dtype.element_ty), mask=mask)
            fused *= projection
        if LAST:
            acc += tl.load(weights_ptr + r * stride_w).to(tl.float32) * fused
        else:
            tl.store(partial_ptr + rh + r * H, fused, mask=mask)
    if LAST:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rows.to(tl.int64)[:, None] * stride_ob + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _modality_tile(t, table_ptr, first, last, BLOCK_N: tl.constexpr):
    """The modality m and first column n0 of x_m of tile t, the tiles of x_first's n_first
    columns in BLOCK_N steps coming first, then x_(first+1)'s, ... up to x_(last-1)'s; and
    m's row offset in the flat factors (_flat_layout) and n_m."""
    m = first
    start = 0
    end = 0
    for l in range(first, last):
        tiles = tl.cdiv(tl.load(table_ptr + 3 * l + 1) - 1, BLOCK_N)
        m = tl.where(t >= end, l, m)
        start = tl.where(t >= end, end, start)
        end += tiles
    offset = tl.load(table_ptr + 3 * m)
    return m, (t - start) * BLOCK_N, offset, tl.load(table_ptr + 3 * m + 1) - 1


@triton.jit
def _grad_projection(p0_ptr, p1_ptr, p2_ptr, p3_ptr, stride_pm, stride_pb, g, weight, m, rows, cols, mask,
                     num_modalities):
    """(grad_proj[m], g * prod_{l != m} P_l) on (rows, cols) of the (B, R*H) layout, float32,
    grad_proj[m] = weight * g * prod_{l != m} P_l; g and weight (broadcastable) given.
    P_l, column r*H + h holding x~_l W_l[r] at h, is at select(l, p0..p3) + l * stride_pm: up
    to four separate tensors (the forward's residuals, stride_pm = 0) or one (M, B, R*H)
    tensor passed as every p (any M). NaN and inf propagate as in the reference: the product
    skips P_m by masking its load, not by dividing by it."""
    offsets = rows.to(tl.int64)[:, None] * stride_pb + cols[None, :]
    others = g
    for l in range(num_modalities):
        p_ptr = _select(l, p0_ptr, p1_ptr, p2_ptr, p3_ptr) + l * stride_pm
        # tl.where rather than mask & (l != m): the interpreter rejects the latter's mask when
        # m is a tensor (Triton 3.9).
        others *= tl.load(p_ptr + offsets, mask=tl.where(l != m, mask, False), other=1.0).to(tl.float32)
    return weight * others, others


def _grad_input_flops(args, constexprs, programs):
    # Per program one (BLOCK_B, BLOCK_N) tile over R * H, padded to BLOCK_K per rank.
    c = constexprs
    return {"g_ptr": programs * 2 * c["BLOCK_B"] * c["BLOCK_N"] * c["R"] * padded(c["H"], c["BLOCK_K"])}


@triton.autotune(configs=_GRAD_INPUT_CONFIGS, key=["B_BUCKET", "H", "S", "R", "num_modalities"])
@dot_flops(_grad_input_flops)
@triton.jit(do_not_specialize=["B_BUCKET"])
def _grad_input_kernel(
    p0_ptr, p1_ptr, p2_ptr, p3_ptr, g_ptr, weights_ptr, table_ptr, f_ptr,
    dx0_ptr, dx1_ptr, dx2_ptr, dx3_ptr, gw_rows_ptr,
    B, B_BUCKET, H, S, R, num_modalities, first,
    stride_pm, stride_pb, stride_gb, stride_gh, stride_w, stride_fs,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_x_m = grad_proj[m] @ (W_m[:, 1:] as (n_m, R*H))^T for every m, grad_proj[m] formed
    per (BLOCK_B, BLOCK_K) tile in registers from g (B, H), w and the projections P_l
    (B, R*H; see _grad_projection) and rounded to g's dtype, as the reference's is. Grid
    (B blocks, column tiles of modalities first..first+3, _modality_tile), dx_i holding
    grad_x_(first+i); the factors are the flat
    (S, R*H) layout. The programs of x_0's first column tile also store
    gw_rows[b, r] = sum_h g[b, h] * prod_m P_m[b, r*H + h] (float32), whose column sums are
    grad_weights."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    m, n0, offset, dim = _modality_tile(tl.program_id(1), table_ptr, first, tl.minimum(first + 4, num_modalities),
                                        BLOCK_N)
    n = n0 + tl.arange(0, BLOCK_N)
    row_mask, n_mask = rows < B, n < dim
    weight_sums = (m == 0) & (n0 == 0)
    # W_m[:, 1:] transposed, (BLOCK_K, BLOCK_N) tiles: flat row offset + 1 + n.
    f_cols = f_ptr + (offset + 1 + n).to(tl.int64)[None, :] * stride_fs
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for r in range(R):
        weight = tl.load(weights_ptr + r * stride_w).to(tl.float32)
        row_sums = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_K):
            h = h0 + tl.arange(0, BLOCK_K)
            h_mask = h < H
            mask = row_mask[:, None] & h_mask[None, :]
            g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_gb + h[None, :] * stride_gh,
                        mask=mask, other=0.0)
            grad_proj, others = _grad_projection(p0_ptr, p1_ptr, p2_ptr, p3_ptr, stride_pm, stride_pb,
                                                 g.to(tl.float32), weight, m, rows, r * H + h, mask, num_modalities)
            if weight_sums:
                own = _select(m, p0_ptr, p1_ptr, p2_ptr, p3_ptr) + rows.to(tl.int64)[:, None] * stride_pb
                own = tl.load(own + (r * H + h)[None, :], mask=mask, other=0.0).to(tl.float32)
                row_sums += tl.sum(others * own, axis=1)
            f = tl.load(f_cols + (r * H + h)[:, None], mask=h_mask[:, None] & n_mask[None, :], other=0.0)
            acc = dot(grad_proj.to(g.dtype), f, acc, PRECISION)
        if weight_sums:
            tl.store(gw_rows_ptr + rows.to(tl.int64) * R + r, row_sums, mask=row_mask)
    dx = _select(m - first, dx0_ptr, dx1_ptr, dx2_ptr, dx3_ptr) + rows.to(tl.int64)[:, None] * dim + n[None, :]
    tl.store(dx, acc.to(dx0_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def _grad_factor_flops(args, constexprs, programs):
    # Per program one (BLOCK_N, BLOCK_C) tile over the batch, padded to BLOCK_B.
    c = constexprs
    return {"x0_ptr": programs * 2 * c["BLOCK_N"] * c["BLOCK_C"] * padded(c["B"], c["BLOCK_B"])}


@triton.autotune(configs=_GRAD_FACTOR_CONFIGS, key=["B_BUCKET", "H", "S", "R", "num_modalities", "UNIT_N"])
@dot_flops(_grad_factor_flops)
@triton.jit(do_not_specialize=["B_BUCKET"])
def _grad_factor_kernel(
    x0_ptr, x1_ptr, x2_ptr, x3_ptr, p0_ptr, p1_ptr, p2_ptr, p3_ptr, g_ptr, weights_ptr, table_ptr,
    dw0_ptr, dw1_ptr, dw2_ptr, dw3_ptr,
    B, B_BUCKET, H, S, R, num_modalities, first,
    stride_x0b, stride_x0n, stride_x1b, stride_x1n, stride_x2b, stride_x2n, stride_x3b, stride_x3n,
    stride_pm, stride_pb, stride_gb, stride_gh, stride_w,
    UNIT_N: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """grad_W_m[r, 1 + i, h] = sum_b x_m[b, i] grad_proj[m][b, r*H + h] for every m, one GEMM
    over the batch per (BLOCK_N, BLOCK_C) tile, grad_proj[m] formed in registers as in
    _grad_input_kernel; the programs of each modality's first column tile also store the
    constant row, grad_W_m[r, 0, h] = sum_b grad_proj[m][b, r*H + h]. x_i holds x_(first+i),
    (B, n) with its own strides (UNIT_N: all of unit column stride); dw_i holds
    grad_W_(first+i), (R, n + 1, H) contiguous.
    Grid (column tiles of modalities first..first+3, R*H blocks)."""
    m, n0, _flat_offset, dim = _modality_tile(tl.program_id(0), table_ptr, first,
                                              tl.minimum(first + 4, num_modalities), BLOCK_N)
    n = n0 + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n_mask, col_mask = n < dim, cols < R * H
    ranks, h = cols // H, cols % H
    weight = tl.load(weights_ptr + ranks * stride_w, mask=col_mask, other=0.0).to(tl.float32)
    # x_m's row stride as an int64 tensor: Triton passes a stride of 1 as a constant, which
    # the runtime branches of _select cannot merge with the others.
    slot = m - first
    stride_xb = _select(slot, tl.cast(stride_x0b, tl.int64), tl.cast(stride_x1b, tl.int64),
                        tl.cast(stride_x2b, tl.int64), tl.cast(stride_x3b, tl.int64))
    stride_xn = _column_stride(slot, stride_x0n, stride_x1n, stride_x2n, stride_x3n, UNIT_N)
    x_cols = _select(slot, x0_ptr, x1_ptr, x2_ptr, x3_ptr) + n.to(tl.int64)[:, None] * stride_xn
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    constant = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        mask = row_mask[:, None] & col_mask[None, :]
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_gb + h[None, :] * stride_gh, mask=mask, other=0.0)
        grad_proj = _grad_projection(p0_ptr, p1_ptr, p2_ptr, p3_ptr, stride_pm, stride_pb,
                                     g.to(tl.float32), weight[None, :], m, rows, cols, mask, num_modalities)[0]
        grad_proj = grad_proj.to(g.dtype)
        if n0 == 0:
            constant += tl.sum(grad_proj.to(tl.float32), axis=0)
        xt = tl.load(x_cols + rows.to(tl.int64)[None, :] * stride_xb, mask=n_mask[:, None] & row_mask[None, :],
                     other=0.0)
        acc = dot(xt, grad_proj, acc, PRECISION)
    # (R, n_m + 1, H) contiguous: row 1 + i of rank r at (r * (n_m + 1) + 1 + i) * H + h.
    dw = _select(slot, dw0_ptr, dw1_ptr, dw2_ptr, dw3_ptr) + ranks.to(tl.int64) * (dim + 1) * H + h
    tl.store(dw[None, :] + ((1 + n) * H)[:, None], acc.to(dw0_ptr.dtype.element_ty),
             mask=n_mask[:, None] & col_mask[None, :])
    if n0 == 0:
        tl.store(dw, constant.to(dw0_ptr.dtype.element_ty), mask=col_mask)


def _flat_layout(factors) -> torch.Tensor:
    """Every factor laid out as (S, R*H), S = sum_m (n_m + 1): row s, column r*H + h holds
    W_m[r, s - offset_m, h] for the modality m owning row s, offset_m = sum_{l < m} (n_l + 1).
    One copy for all modalities, after which each one's constant row and W_m[:, 1:] are
    plain matrices and the forward reads it as (R, S, H) through a strided view."""
    R, _, H = factors[0].shape
    return torch.cat([w.permute(1, 0, 2) for w in factors]).view(-1, R * H)


# The copy is made once per version of the factors and shared by the forward and the
# backward, so a training step copies the parameters once (a device-to-device copy, no sync).
# It stays cached while the factors live: one parameter-sized buffer. Reading the factors in
# place would need one pointer argument per modality (a fixed maximum M) or a device table of
# their addresses, a host-to-device copy whenever they move.
_FLAT_FACTORS: TensorCache[torch.Tensor] = TensorCache()


def _flat_factors(factors) -> torch.Tensor:
    if factors[0].is_cuda and torch.cuda.is_current_stream_capturing():
        # A CUDA graph replays without Python: it must copy the factors itself, which change
        # in place between training steps.
        return _flat_layout(factors)
    return _FLAT_FACTORS.get(factors, lambda: _flat_layout(factors))


# The kernels take up to this many modalities per launch, one pointer argument for each
# input, residual and gradient (custom-op outputs may not alias, so they cannot be views of
# one buffer); LMF is used with 2 or 3. More run in groups of this many, one launch each.
_MAX_SAVED = 4


def _recompute_projections(xs, flat, outs):
    """P_m = x_m W_m[:, 1:] + W_m[:, 0] into outs[m] (B, R*H) for every m, all ranks in one
    GEMM per modality; the constant row is addmm's bias rather than a materialised [1, x_m]."""
    for m, x in enumerate(xs):
        torch.addmm(flat[m][0], x, flat[m][1:], out=outs[m])


def _slots(tensors, group, fill):
    """tensors[group] padded to _MAX_SAVED with ``fill``, a tensor of their type the kernels
    never select through the padding (_select's branches must agree on the pointer type)."""
    return (list(tensors[group]) + [fill] * _MAX_SAVED)[:_MAX_SAVED]


def _x_strides(xs):
    """(stride_b, stride_n) of each x (B, n), flattened: the kernels read x_m in place, at any
    strides, with no packed or contiguous copy."""
    return [s for x in xs for s in x.stride()]


def _unit_columns(xs) -> bool:
    """Whether every x has unit column stride (the kernels' UNIT_N)."""
    return all(x.stride(1) == 1 for x in xs)


def _modality_table(xs):
    """The (offset, n_m + 1, -) table of :func:`pack_with_ones` for xs, cached per layout:
    the factors' row offsets in the flat layout and the modalities' widths."""
    return _common._modality_layout(tuple(x.shape[1] + 1 for x in xs), xs[0].device)[0]


def _forward(xs, factors, weights, bias, save_residuals):
    """(out (B, H), residuals): the residuals are the projections P_m = x~_m W_m, (B, R*H) with
    column r*H + h holding (x~_m W_m[r])[:, h], in compute_dtype(x.dtype), one per modality,
    when ``save_residuals``, else []. One launch per group of _MAX_SAVED modalities, the
    groups before the last handing on their product of projections in a (B, R*H) float32
    buffer (only for M > _MAX_SAVED)."""
    (B, _), (R, _, H), M = xs[0].shape, factors[0].shape, len(xs)
    table = _modality_table(xs)
    S = sum(x.shape[1] + 1 for x in xs)
    packed_factors = _flat_factors(factors).view(S, R, H).permute(1, 0, 2)  # (R, S, H)
    out = torch.empty((B, H), dtype=bias.dtype, device=bias.device)
    residuals = []
    if save_residuals:
        residuals = [torch.empty((B, R * H), dtype=compute_dtype(bias.dtype), device=bias.device) for _ in xs]
    partial = out if M <= _MAX_SAVED else torch.empty((B, R * H), dtype=torch.float32, device=bias.device)
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(H, meta["BLOCK_H"]))  # noqa: E731
    for first in range(0, M, _MAX_SAVED):
        group = slice(first, first + _MAX_SAVED)
        _forward_kernel[grid](
            *_slots(xs, group, xs[first]), table, packed_factors, weights, bias, out, partial,
            *_slots(residuals, group, residuals[first]) if residuals else [out] * _MAX_SAVED,
            B, batch_bucket(B), H, S, R, first,
            *_x_strides(_slots(xs, group, xs[first])),
            *packed_factors.stride(), weights.stride(0), out.stride(0), R * H,
            GROUP=len(xs[group]), FIRST=first == 0, LAST=first + _MAX_SAVED >= M, SAVE=bool(residuals),
            UNIT_N=_unit_columns(xs[group]),
            PRECISION=dot_precision(bias.dtype),
        )
    return out, residuals


def _column_tiles(dims, block):
    """The tiles of _modality_tile over modalities of n_m = dims."""
    return sum(triton.cdiv(n, block) for n in dims)


def _backward(grad, residuals, xs, factors, weights, bias):
    """Gradients [*xs, *factors, weights, bias] from the forward's residuals, or, when they
    are [], from recomputed projections."""
    (B, H), R, M = grad.shape, weights.shape[0], len(xs)
    flat = _flat_factors(factors)
    if residuals and M <= _MAX_SAVED:
        slots, stride_pm = _slots(residuals, slice(None), residuals[0]), 0
    else:
        # Without residuals the projections are recomputed; above _MAX_SAVED modalities the
        # saved ones are stacked (a copy), the kernels having pointers for only four tensors.
        if residuals:
            projections = torch.stack(residuals)
        else:
            projections = torch.empty((M, B, R * H), dtype=grad.dtype, device=grad.device)
            _recompute_projections(xs, flat.split([x.shape[1] + 1 for x in xs]), projections)
        slots, stride_pm = [projections] * _MAX_SAVED, projections.stride(0)
    table, S = _modality_table(xs), flat.shape[0]
    grad_xs = [torch.empty((B, x.shape[1]), dtype=grad.dtype, device=grad.device) for x in xs]
    grad_factors = [torch.empty((R, x.shape[1] + 1, H), dtype=grad.dtype, device=grad.device) for x in xs]
    grad_weight_rows = torch.empty((B, R), dtype=torch.float32, device=grad.device)
    precision = dot_precision(grad.dtype)
    # The kernels write the gradients of up to four modalities, first..first+3, one pointer
    # each (outputs may not alias, so no views of one buffer): one launch of each per group.
    for first in range(0, M, _MAX_SAVED):
        group = slice(first, first + _MAX_SAVED)
        x_slots = _slots(xs, group, xs[first])
        dims = [x.shape[1] for x in xs[group]]
        _grad_input_kernel[lambda meta, dims=dims: (triton.cdiv(B, meta["BLOCK_B"]), _column_tiles(dims, meta["BLOCK_N"]))](
            *slots, grad, weights, table, flat, *_slots(grad_xs, group, grad_xs[first]), grad_weight_rows,
            B, batch_bucket(B), H, S, R, M, first,
            stride_pm, R * H, grad.stride(0), grad.stride(1), weights.stride(0), flat.stride(0),
            PRECISION=precision,
        )
        _grad_factor_kernel[lambda meta, dims=dims: (_column_tiles(dims, meta["BLOCK_N"]), triton.cdiv(R * H, meta["BLOCK_C"]))](
            *x_slots, *slots, grad, weights, table, *_slots(grad_factors, group, grad_factors[first]),
            B, batch_bucket(B), H, S, R, M, first,
            *_x_strides(x_slots), stride_pm, R * H, grad.stride(0), grad.stride(1), weights.stride(0),
            UNIT_N=_unit_columns(xs[group]), PRECISION=precision,
        )
    return grad_xs + grad_factors + [grad_weight_rows.sum(0).to(weights.dtype), grad.sum(0)]


_dispatch.register_kernel(
    "low_rank_fusion", "triton", forward=_forward, backward=_backward, device_types=DEVICE_TYPES, saves_residuals=True,
    dtypes=KERNEL_DTYPES,
)
