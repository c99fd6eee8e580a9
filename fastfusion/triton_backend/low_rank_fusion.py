"""Triton low-rank multimodal fusion (LMF): out = sum_r w_r prod_m (x~_m W_m[r]) + b.

Inputs are packed with their constants, [1, x_0, 1, x_1, ...] (:func:`pack_with_ones`),
and the factors concatenated along their input axis into one (rank, S, h) tensor, so one
kernel serves any number of modalities; x~_m W_m[r] is then a matmul over the packed
columns of modality m, whose constant row needs no special case.

- forward, fully fused: grid (B blocks, h blocks); for every rank and modality the
  projection tile is a tensor-core matmul, multiplied across modalities and rank-reduced
  with w_r in float32 registers. Nothing of size (M, rank, B, h) exists in memory.
- backward, fully fused but for the bias: grad_proj[m, r] = w_r * g * prod_{l != m} (x~_l W_l[r])
  is formed tile by tile in registers, rounded to the input dtype and at once contracted on
  the tensor cores; nothing of size (M, rank, B, h) exists in memory. Two kernels per
  modality m, each owning its output tile and looping over its reduction axis, so no
  atomics and a deterministic result:
  - grad_x: grid (B blocks, n_m blocks), loops over ranks and h blocks; contracts with
    W_m[r, 1:]. The m = 0 launch also writes the per-row sums of g * prod_m (x~_m W_m[r])
    that give grad_weights.
  - grad_factors: grid (n_m + 1 blocks, h blocks, rank), loops over B blocks; contracts
    with x~_m, whose constant column gives the constant row.
  Like flash-attention's backward this trades memory for recomputation: every program
  recomputes the projections it needs, about cdiv(n_m, BLOCK_N) + cdiv(n_m + 1, BLOCK_N)
  times the forward's projection work for modality m, which is small for LMF's
  modality sizes (sub-network outputs of tens to hundreds). grad_bias is grad.sum(0).

dtypes: see :mod:`._fusion`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _dispatch
from ..ops import low_rank_fusion as _reference
from . import DEVICE_TYPES
from ._fusion import KERNEL_DTYPES, autotune_configs, batch_bucket, dot, dot_precision, matmul_tile, pack_with_ones

# Every config compiles without register spills for sm_90 in every dtype at the benchmark's
# GPU shape, with Triton 3.6's and 3.9's ptxas (python -m benchmarks.compile_report); 64 x 64
# at 4 warps and larger tiles at 8 spill in float32, whose dots run on CUDA cores.
_CONFIGS = autotune_configs([
    triton.Config({"BLOCK_B": b, "BLOCK_H": h, "BLOCK_K": k}, num_warps=w)
    for b, h, k, w in [(32, 32, 32, 4), (32, 64, 32, 4), (64, 32, 32, 4), (64, 64, 32, 8), (64, 128, 32, 16)]
])
# BLOCK_N tiles the gradients' input axis (n_m, or n_m + 1 for the factors). Spill-free as
# above in every modality's launch; (32, 32, 32, 32) spills in some of them at 4 and 8 warps.
_BACKWARD_CONFIGS = autotune_configs([
    triton.Config({"BLOCK_B": b, "BLOCK_H": h, "BLOCK_K": k, "BLOCK_N": n}, num_warps=w)
    for b, h, k, n, w in [(32, 64, 32, 32, 4), (64, 32, 32, 32, 8), (32, 64, 32, 64, 8), (64, 64, 32, 64, 8)]
])


@triton.jit
def _projection(
    xt_ptr, stride_xb, table_ptr, f_ptr, stride_fr, stride_fs, stride_fh,
    m, r, rows, cols, row_mask, col_mask, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """x~_m W_m[r] on (rows, cols), float32."""
    offset = tl.load(table_ptr + 3 * m)
    dim = tl.load(table_ptr + 3 * m + 1)
    return matmul_tile(xt_ptr, stride_xb, 1, f_ptr + r * stride_fr, stride_fs, stride_fh,
                       rows, cols, row_mask, col_mask, offset, offset + dim, PRECISION, BLOCK_K)


@triton.autotune(configs=_CONFIGS, key=["B_BUCKET", "H", "S", "R"])
@triton.jit(do_not_specialize=["B_BUCKET"])
def _forward_kernel(
    xt_ptr, table_ptr, f_ptr, weights_ptr, bias_ptr, out_ptr,
    B, B_BUCKET, H, S, R, num_modalities,
    stride_xb, stride_fr, stride_fs, stride_fh, stride_w, stride_ob,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask, col_mask = rows < B, cols < H
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for r in range(R):
        fused = tl.full((BLOCK_B, BLOCK_H), 1.0, dtype=tl.float32)
        for m in range(num_modalities):
            fused *= _projection(xt_ptr, stride_xb, table_ptr, f_ptr, stride_fr, stride_fs, stride_fh,
                                 m, r, rows, cols, row_mask, col_mask, PRECISION, BLOCK_K)
        acc += tl.load(weights_ptr + r * stride_w).to(tl.float32) * fused
    acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_ob + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _grad_proj_tile(
    xt_ptr, stride_xb, table_ptr, f_ptr, stride_fr, stride_fs, stride_fh, g_ptr, stride_gb, stride_gh,
    own_m, r, num_modalities, rows, cols, row_mask, col_mask, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """g * prod_{l != own_m} x~_l W_l[r] and x~_own_m W_own_m[r] on (rows, cols), float32:
    grad_proj[own_m, r] is w_r times the first, and the sum of their product gives grad_w[r]."""
    g_ptrs = g_ptr + rows.to(tl.int64)[:, None] * stride_gb + cols[None, :] * stride_gh
    others = tl.load(g_ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    own = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    for m in range(num_modalities):
        proj = _projection(xt_ptr, stride_xb, table_ptr, f_ptr, stride_fr, stride_fs, stride_fh,
                           m, r, rows, cols, row_mask, col_mask, PRECISION, BLOCK_K)
        others *= tl.where(m == own_m, 1.0, proj)
        own = tl.where(m == own_m, proj, own)
    return others, own


@triton.autotune(configs=_BACKWARD_CONFIGS, key=["own_m", "B_BUCKET", "H", "S", "R"])
@triton.jit(do_not_specialize=["B_BUCKET"])
def _grad_x_kernel(
    xt_ptr, table_ptr, f_ptr, weights_ptr, g_ptr, gx_ptr, gw_rows_ptr,
    own_m, B, B_BUCKET, H, S, R, num_modalities,
    stride_xb, stride_fr, stride_fs, stride_fh, stride_w, stride_gb, stride_gh,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """grad_x_m[rows, n] = sum_r sum_h grad_proj[m, r][rows, h] W_m[r, 1 + n, h] for one block
    of n, with grad_proj formed tile by tile in registers. The program walks every rank and
    h block itself, so the reduction needs no atomics and is deterministic."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offset = tl.load(table_ptr + 3 * own_m)
    n = tl.load(table_ptr + 3 * own_m + 1) - 1  # this modality's n_m
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, n_mask = rows < B, ns < n
    # Packed column offset + 1 + n holds x_m[:, n]; offset itself is the constant 1.
    f_cols = f_ptr + (offset + 1 + ns)[None, :] * stride_fs
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for r in range(R):
        weight = tl.load(weights_ptr + r * stride_w).to(tl.float32)
        row_sums = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            col_mask = cols < H
            others, own = _grad_proj_tile(xt_ptr, stride_xb, table_ptr, f_ptr, stride_fr, stride_fs, stride_fh,
                                          g_ptr, stride_gb, stride_gh, own_m, r, num_modalities,
                                          rows, cols, row_mask, col_mask, PRECISION, BLOCK_K)
            row_sums += tl.sum(others * own, axis=1)
            w_t = tl.load(f_cols + r * stride_fr + cols[:, None] * stride_fh,
                          mask=col_mask[:, None] & n_mask[None, :], other=0.0)
            # grad_proj is rounded to the input dtype for the tensor-core product, as a
            # materialised grad_proj in that dtype would be.
            acc = dot((weight * others).to(w_t.dtype), w_t, acc, PRECISION)
        # grad_w is independent of the modality and of n: one program column writes it.
        if (own_m == 0) & (tl.program_id(1) == 0):
            tl.store(gw_rows_ptr + rows.to(tl.int64) * R + r, row_sums, mask=row_mask)
    gx = gx_ptr + rows.to(tl.int64)[:, None] * n + ns[None, :]
    tl.store(gx, acc.to(gx_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.autotune(configs=_BACKWARD_CONFIGS, key=["own_m", "B_BUCKET", "H", "S", "R"])
@triton.jit(do_not_specialize=["B_BUCKET"])
def _grad_factors_kernel(
    xt_ptr, table_ptr, f_ptr, weights_ptr, g_ptr, gf_ptr,
    own_m, B, B_BUCKET, H, S, R, num_modalities,
    stride_xb, stride_fr, stride_fs, stride_fh, stride_w, stride_gb, stride_gh,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """grad_W_m[r, k, cols] = sum_b x~_m[b, k] grad_proj[m, r][b, cols] for one block of k
    (the constant row k = 0 included), walking every B block in the program: no atomics."""
    ks = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    r = tl.program_id(2)
    offset = tl.load(table_ptr + 3 * own_m)
    dim = tl.load(table_ptr + 3 * own_m + 1)
    k_mask, col_mask = ks < dim, cols < H
    weight = tl.load(weights_ptr + r * stride_w).to(tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        others, _ = _grad_proj_tile(xt_ptr, stride_xb, table_ptr, f_ptr, stride_fr, stride_fs, stride_fh,
                                    g_ptr, stride_gb, stride_gh, own_m, r, num_modalities,
                                    rows, cols, row_mask, col_mask, PRECISION, BLOCK_K)
        x_t = tl.load(xt_ptr + rows.to(tl.int64)[None, :] * stride_xb + (offset + ks)[:, None],
                      mask=k_mask[:, None] & row_mask[None, :], other=0.0)
        acc = dot(x_t, (weight * others).to(x_t.dtype), acc, PRECISION)
    gf = gf_ptr + (r * dim + ks).to(tl.int64)[:, None] * H + cols[None, :]
    tl.store(gf, acc.to(gf_ptr.dtype.element_ty), mask=k_mask[:, None] & col_mask[None, :])


def _pack(xs, factors):
    # The factors are concatenated on every call: a device-to-device copy of the parameters
    # (rank * S * h values, no sync), which lets one pointer serve any number of modalities.
    # Reading them in place would need one pointer argument per modality (a fixed maximum M)
    # or a device table of their addresses, a host-to-device copy whenever they move.
    packed, table, offsets, _ = pack_with_ones(xs)
    return packed, table, offsets, torch.cat(factors, dim=1)


def _forward(xs, factors, weights, bias):
    if bias.dtype not in KERNEL_DTYPES:
        return _reference._forward(xs, factors, weights, bias)
    packed, table, _, packed_factors = _pack(xs, factors)
    (B, S), (R, _, H) = packed.shape, packed_factors.shape
    out = torch.empty((B, H), dtype=bias.dtype, device=bias.device)
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(H, meta["BLOCK_H"]))  # noqa: E731
    _forward_kernel[grid](
        packed, table, packed_factors, weights, bias, out,
        B, batch_bucket(B), H, S, R, len(xs),
        packed.stride(0), *packed_factors.stride(), weights.stride(0), out.stride(0),
        PRECISION=dot_precision(bias.dtype),
    )
    return out


def _backward(grad, xs, factors, weights, bias):
    if bias.dtype not in KERNEL_DTYPES:
        return _reference._backward(grad, xs, factors, weights, bias)
    packed, table, _, packed_factors = _pack(xs, factors)
    (B, S), (R, _, H) = packed.shape, packed_factors.shape
    grad_weight_rows = torch.empty((B, R), dtype=torch.float32, device=grad.device)
    bucket = batch_bucket(B)
    strides = (packed.stride(0), *packed_factors.stride(), weights.stride(0), grad.stride(0), grad.stride(1))
    # One launch per modality and gradient: each output is its own tensor (a custom op's
    # outputs may not alias), and M is a handful.
    grad_xs, grad_factors = [], []
    for m, x in enumerate(xs):
        n = x.shape[1]
        grad_x = torch.empty((B, n), dtype=grad.dtype, device=grad.device)
        grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), max(1, triton.cdiv(n, meta["BLOCK_N"])))  # noqa: E731
        _grad_x_kernel[grid](packed, table, packed_factors, weights, grad, grad_x, grad_weight_rows,
                             m, B, bucket, H, S, R, len(xs), *strides, PRECISION=dot_precision(bias.dtype))
        grad_factor = torch.empty((R, n + 1, H), dtype=packed_factors.dtype, device=grad.device)
        grid = lambda meta: (triton.cdiv(n + 1, meta["BLOCK_N"]), triton.cdiv(H, meta["BLOCK_H"]), R)  # noqa: E731
        _grad_factors_kernel[grid](packed, table, packed_factors, weights, grad, grad_factor,
                                   m, B, bucket, H, S, R, len(xs), *strides, PRECISION=dot_precision(bias.dtype))
        grad_xs.append(grad_x)
        grad_factors.append(grad_factor)
    return grad_xs + grad_factors + [grad_weight_rows.sum(0).to(weights.dtype), grad.sum(0)]


_dispatch.register_kernel("low_rank_fusion", "triton", forward=_forward, backward=_backward, device_types=DEVICE_TYPES)
