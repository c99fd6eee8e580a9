"""Triton low-rank multimodal fusion (LMF): out = sum_r w_r prod_m (x~_m W_m[r]) + b.

Inputs are packed with their constants, [1, x_0, 1, x_1, ...] (:func:`pack_with_ones`),
and the factors concatenated along their input axis into one (rank, S, h) tensor, so one
kernel serves any number of modalities; x~_m W_m[r] is then a matmul over the packed
columns of modality m, whose constant row needs no special case.

- forward, fully fused: grid (B blocks, h blocks); for every rank and modality the
  projection tile is a tensor-core matmul, multiplied across modalities and rank-reduced
  with w_r in float32 registers. Nothing of size (M, rank, B, h) exists in memory.
- backward, fused part: grid (B blocks, M); for modality m the kernel recomputes every
  projection tile and writes grad_proj[m, r] = w_r * g * prod_{l != m} (x~_l W_l[r]), and
  the per-row sums of g * prod_m (x~_m W_m[r]) that give grad_weights. This materialises
  (M, rank, B, h) in the input dtype and costs M times the forward's projections.
- backward, not fused: grad_x_m and grad_factors[m] contract grad_proj[m] with W_m and x~_m
  by torch.einsum (cuBLAS); grad_bias is grad.sum(0).

dtypes: see :mod:`._fusion`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _dispatch
from ..ops import low_rank_fusion as _reference
from . import DEVICE_TYPES
from ._fusion import KERNEL_DTYPES, autotune_configs, dot_precision, matmul_tile, pack_with_ones

_CONFIGS = autotune_configs([
    triton.Config({"BLOCK_B": b, "BLOCK_H": h, "BLOCK_K": k}, num_warps=w)
    for b, h, k, w in [(32, 32, 32, 4), (64, 64, 32, 4), (64, 128, 32, 8), (128, 64, 32, 8), (128, 128, 32, 8)]
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


@triton.autotune(configs=_CONFIGS, key=["B", "H", "S", "R"])
@triton.jit
def _forward_kernel(
    xt_ptr, table_ptr, f_ptr, weights_ptr, bias_ptr, out_ptr,
    B, H, S, R, num_modalities,
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


@triton.autotune(configs=_CONFIGS, key=["B", "H", "S", "R"])
@triton.jit
def _grad_proj_kernel(
    xt_ptr, table_ptr, f_ptr, weights_ptr, g_ptr, gp_ptr, gw_rows_ptr,
    B, H, S, R, num_modalities,
    stride_xb, stride_fr, stride_fs, stride_fh, stride_w, stride_gb, stride_gh,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    own_m = tl.program_id(1)
    row_mask = rows < B
    for r in range(R):
        weight = tl.load(weights_ptr + r * stride_w).to(tl.float32)
        # Whole rows of h per program keep the grad_weights reduction free of the tiling.
        row_sums = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            col_mask = cols < H
            mask = row_mask[:, None] & col_mask[None, :]
            g_ptrs = g_ptr + rows.to(tl.int64)[:, None] * stride_gb + cols[None, :] * stride_gh
            others = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
            own = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            for m in range(num_modalities):
                proj = _projection(xt_ptr, stride_xb, table_ptr, f_ptr, stride_fr, stride_fs, stride_fh,
                                   m, r, rows, cols, row_mask, col_mask, PRECISION, BLOCK_K)
                others *= tl.where(m == own_m, 1.0, proj)
                own = tl.where(m == own_m, proj, own)
            row_sums += tl.sum(others * own, axis=1)
            gp = gp_ptr + ((own_m * R + r) * B + rows.to(tl.int64))[:, None] * H + cols[None, :]
            tl.store(gp, (weight * others).to(gp_ptr.dtype.element_ty), mask=mask)
        if own_m == 0:
            tl.store(gw_rows_ptr + rows.to(tl.int64) * R + r, row_sums, mask=row_mask)


def _pack(xs, factors):
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
        B, H, S, R, len(xs),
        packed.stride(0), *packed_factors.stride(), weights.stride(0), out.stride(0),
        PRECISION=dot_precision(bias.dtype),
    )
    return out


def _backward(grad, xs, factors, weights, bias):
    if bias.dtype not in KERNEL_DTYPES:
        return _reference._backward(grad, xs, factors, weights, bias)
    packed, table, offsets, packed_factors = _pack(xs, factors)
    (B, S), (R, _, H) = packed.shape, packed_factors.shape
    grad_proj = torch.empty((len(xs), R, B, H), dtype=grad.dtype, device=grad.device)
    grad_weight_rows = torch.empty((B, R), dtype=torch.float32, device=grad.device)
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), len(xs))  # noqa: E731
    _grad_proj_kernel[grid](
        packed, table, packed_factors, weights, grad, grad_proj, grad_weight_rows,
        B, H, S, R, len(xs),
        packed.stride(0), *packed_factors.stride(), weights.stride(0), grad.stride(0), grad.stride(1),
        PRECISION=dot_precision(bias.dtype),
    )
    grad_xs, grad_factors = [], []
    for m, (x, w, start) in enumerate(zip(xs, factors, offsets)):
        grad_xs.append(torch.einsum("rbh,rnh->bn", grad_proj[m], w[:, 1:]))
        x_tilde = packed[:, start : start + x.shape[1] + 1]
        grad_factors.append(torch.einsum("bn,rbh->rnh", x_tilde, grad_proj[m]))
    return grad_xs + grad_factors + [grad_weight_rows.sum(0).to(weights.dtype), grad.sum(0)]


_dispatch.register_kernel("low_rank_fusion", "triton", forward=_forward, backward=_backward, device_types=DEVICE_TYPES)
