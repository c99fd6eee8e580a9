"""Triton low-rank multimodal fusion (LMF): out = sum_r w_r prod_m (x~_m W_m[r]) + b.

- forward, fully fused: grid (B blocks, h blocks); for every rank and modality the
  projection tile is a tensor-core matmul, multiplied across modalities and rank-reduced
  with w_r in float32 registers. Nothing of size (M, rank, B, h) exists in memory. Inputs
  are packed with their constants, [1, x_0, 1, x_1, ...] (:func:`pack_with_ones`), and the
  factors concatenated along their input axis into one (rank, S, h) tensor, so one kernel
  serves any number of modalities; x~_m W_m[r] is then a matmul over the packed columns of
  modality m, whose constant row needs no special case.
- backward, each product formed once: with P_m = x~_m W_m as (B, rank*h), column r*h + j
  holding (x~_m W_m[r])[:, j], and grad_proj[m] = w_r * g * prod_{l != m} P_l (B, rank*h),
  1. P_m: one cuBLAS GEMM per modality, x_m (B, n_m) @ W_m[:, 1:] as (n_m, rank*h), the
     constant row W_m[:, 0] added as addmm's bias rather than materialising [1, x_m];
  2. one pointwise Triton kernel, grid (B blocks, rank), reads g, w and every P_m and writes
     grad_proj[m] for every m, rounded to the input dtype as the reference's grad_proj is,
     and the per-row sums sum_h g * prod_m P_m[r] that give grad_weights (products in float32
     registers);
  3. per modality, grad_x_m = grad_proj[m] @ (W_m[:, 1:] as (n_m, rank*h))^T, one GEMM, and
     grad_W_m[r] = x~_m^T grad_proj[m][:, r], one batched GEMM over the ranks written in
     place into the (rank, n_m + 1, h) result, its constant row the column sums of
     grad_proj[m]. grad_bias is grad.sum(0).
  Memory: P and grad_proj are materialised, 2 * M * B * rank * h values in the input dtype
  (50 MB in bfloat16 at B = 4096, M = 3, rank = 8, h = 256), plus one parameter-sized copy
  of the factors in the (n_m + 1, rank*h) layout. Fusing the gradients instead, as the
  forward is, makes every gradient program recompute the projections it needs: several
  times the forward's FLOPs, which the roofline model put (before this design) at 0.05x eager in float32 and
  0.17x in bfloat16 at the GPU shape, against GEMMs that form each product once.

dtypes: see :mod:`._fusion`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _dispatch
from ..ops import low_rank_fusion as _reference
from . import DEVICE_TYPES
from ._fusion import KERNEL_DTYPES, autotune_configs, batch_bucket, dot_precision, matmul_tile, pack_with_ones

# Every config compiles without register spills for sm_90 in every dtype at the benchmark's
# GPU shape, with Triton 3.6's and 3.9's ptxas (python -m benchmarks.compile_report); 64 x 64
# at 4 warps and larger tiles at 8 spill in float32, whose dots run on CUDA cores.
_CONFIGS = autotune_configs([
    triton.Config({"BLOCK_B": b, "BLOCK_H": h, "BLOCK_K": k}, num_warps=w)
    for b, h, k, w in [(32, 32, 32, 4), (32, 64, 32, 4), (64, 32, 32, 4), (64, 64, 32, 8), (64, 128, 32, 16)]
])
# The backward's pointwise kernel, (rows, h) tiles: spill-free as above; 64 x 64 at 4 warps
# spills in float32 with Triton 3.6's ptxas.
_GRAD_PROJ_CONFIGS = autotune_configs([
    triton.Config({"BLOCK_B": b, "BLOCK_H": h}, num_warps=w)
    for b, h, w in [(32, 128, 4), (64, 64, 8), (64, 128, 8), (128, 64, 8)]
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


@triton.autotune(configs=_GRAD_PROJ_CONFIGS, key=["B_BUCKET", "H", "R", "num_modalities"])
@triton.jit(do_not_specialize=["B_BUCKET"])
def _grad_proj_kernel(
    p_ptr, g_ptr, weights_ptr, gp_ptr, gw_rows_ptr,
    B, B_BUCKET, H, R, num_modalities,
    stride_pm, stride_pb, stride_gb, stride_gh, stride_w,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """From the projections P (M, B, R*H), column r*H + h holding x~_m W_m[r] at h, and g (B, H):
    grad_proj[m][:, r*H + h] = w_r * g[:, h] * prod_{l != m} P_l[:, r*H + h] for every m, into
    gp (M, B, R*H) in its dtype, and gw_rows[b, r] = sum_h g[b, h] * prod_m P_m[b, r*H + h]
    (float32), whose column sums are grad_weights. Grid (B blocks, R): a program walks every
    h block of its rank, so the row sums need no atomics and are deterministic. Products are
    formed in float32 registers; NaN and inf propagate as in the reference."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    r = tl.program_id(1)
    row_mask = rows < B
    weight = tl.load(weights_ptr + r * stride_w).to(tl.float32)
    row_sums = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        mask = row_mask[:, None] & (cols < H)[None, :]
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_gb + cols[None, :] * stride_gh,
                    mask=mask, other=0.0).to(tl.float32)
        offsets = rows.to(tl.int64)[:, None] * stride_pb + (r * H + cols)[None, :]
        fused = g
        for m in range(num_modalities):
            fused *= tl.load(p_ptr + m * stride_pm + offsets, mask=mask, other=0.0).to(tl.float32)
        row_sums += tl.sum(fused, axis=1)
        # M - 1 loads per modality rather than dividing the full product by P_m, which a zero
        # projection would turn into NaN; the re-reads of this tile hit the caches.
        for m in range(num_modalities):
            others = weight * g
            for l in range(num_modalities):
                others *= tl.load(p_ptr + l * stride_pm + offsets, mask=mask & (l != m), other=1.0).to(tl.float32)
            tl.store(gp_ptr + m * stride_pm + offsets, others.to(gp_ptr.dtype.element_ty), mask=mask)
    tl.store(gw_rows_ptr + rows.to(tl.int64) * R + r, row_sums, mask=row_mask)


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
    (B, H), R, M = grad.shape, weights.shape[0], len(xs)
    # Every factor laid out as (n_m + 1, R*H), column r*H + h: one copy (parameter-sized) for
    # all modalities, after which each one's constant row and W_m[:, 1:] are plain matrices.
    flat = torch.cat([w.permute(1, 0, 2) for w in factors]).view(-1, R * H)
    flat = flat.split([x.shape[1] + 1 for x in xs])
    # P_m = x_m W_m[:, 1:] + W_m[:, 0], all ranks in one GEMM per modality; the constant row
    # is addmm's bias rather than a materialised [1, x_m].
    projections = torch.empty((M, B, R * H), dtype=grad.dtype, device=grad.device)
    for m, x in enumerate(xs):
        torch.addmm(flat[m][0], x, flat[m][1:], out=projections[m])
    grad_proj = torch.empty_like(projections)
    grad_weight_rows = torch.empty((B, R), dtype=torch.float32, device=grad.device)
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), R)  # noqa: E731
    _grad_proj_kernel[grid](projections, grad, weights, grad_proj, grad_weight_rows,
                            B, batch_bucket(B), H, R, M,
                            projections.stride(0), projections.stride(1), grad.stride(0), grad.stride(1),
                            weights.stride(0))
    grad_xs, grad_factors = [], []
    for m, x in enumerate(xs):
        # grad_x_m = grad_proj[m] (B, R*H) @ (W_m[:, 1:] as (n_m, R*H))^T.
        grad_xs.append(torch.mm(grad_proj[m], flat[m][1:].t()))
        # grad_W_m[r] = x~_m^T grad_proj[m][:, r], written in place into the (R, n_m + 1, h)
        # result: the constant row is grad_proj's column sums, the rest one batched GEMM whose
        # x_m^T operand is broadcast over the ranks (batch stride 0, not copied).
        per_rank = grad_proj[m].view(B, R, H).transpose(0, 1)
        grad_factor = torch.empty((R, x.shape[1] + 1, H), dtype=grad.dtype, device=grad.device)
        torch.sum(per_rank, dim=1, out=grad_factor[:, 0])
        torch.bmm(x.t().expand(R, -1, -1), per_rank, out=grad_factor[:, 1:])
        grad_factors.append(grad_factor)
    return grad_xs + grad_factors + [grad_weight_rows.sum(0).to(weights.dtype), grad.sum(0)]


_dispatch.register_kernel("low_rank_fusion", "triton", forward=_forward, backward=_backward, device_types=DEVICE_TYPES)
