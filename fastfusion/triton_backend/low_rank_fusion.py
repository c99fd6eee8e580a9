"""Triton low-rank multimodal fusion (LMF): out = sum_r w_r prod_m (x~_m W_m[r]) + b.

- forward, fully fused: grid (B blocks, h blocks); for every rank and modality the
  projection tile is a tensor-core matmul, multiplied across modalities and rank-reduced
  with w_r in float32 registers. Nothing of size (M, rank, B, h) exists in memory. Inputs
  are packed with their constants, [1, x_0, 1, x_1, ...] (:func:`pack_with_ones`), and the
  factors read as one (rank, S, h) tensor, a view of one copy of all of them (``_flat_factors``,
  made once per version of the factors and shared with the backward), so one kernel serves
  any number of modalities; x~_m W_m[r] is then a matmul over the packed columns of
  modality m, whose constant row needs no special case. When autograd records the call
  (``save_residuals``) the kernel also stores every projection tile it computes: the op's
  residuals P_m (below), in compute_dtype (float32 for half inputs). The stores are
  B * rank * h values per modality against the tile's 2 * (n_m + 1) FLOPs each, so the
  kernel stays compute-bound (roofline model at the benchmark shape).
- backward, each product formed once: with P_m = x~_m W_m as (B, rank*h), column r*h + j
  holding (x~_m W_m[r])[:, j], and grad_proj[m] = w_r * g * prod_{l != m} P_l (B, rank*h),
  1. P_m: the forward's residuals, or, when it saved none, one cuBLAS GEMM per modality,
     x_m (B, n_m) @ W_m[:, 1:] as (n_m, rank*h), the constant row W_m[:, 0] added as addmm's
     bias rather than materialising [1, x_m];
  2. one pointwise Triton kernel, grid (B blocks, rank), reads g, w and every P_m and writes
     grad_proj[m] for every m, rounded to the input dtype as the reference's grad_proj is,
     and the per-row sums sum_h g * prod_m P_m[r] that give grad_weights (products in float32
     registers);
  3. per modality, grad_x_m = grad_proj[m] @ (W_m[:, 1:] as (n_m, rank*h))^T, one GEMM, and
     grad_W_m[r] = x~_m^T grad_proj[m][:, r], one batched GEMM over the ranks written in
     place into the (rank, n_m + 1, h) result, its constant row the column sums of
     grad_proj[m]. grad_bias is grad.sum(0).
  Memory: P (the residuals, kept from the forward to the backward) and grad_proj are
  materialised, M * B * rank * h values each, P in the compute dtype and grad_proj in the
  input dtype (100 + 50 MB in bfloat16 at B = 4096, M = 3, rank = 8, h = 256), plus the
  cached parameter-sized copy of the factors in the (S, rank*h) layout. Residual pointers:
  custom-op outputs may not alias, so the residuals are M separate tensors and the kernels
  take one pointer each, up to ``_MAX_SAVED``; above it the forward computes them with
  cuBLAS and the backward stacks them (see ``_forward``, ``_backward``).
  Fusing the gradients instead, as the forward is, makes every gradient program recompute
  the projections it needs: several times the forward's FLOPs, which the roofline model put
  (before this design) at 0.05x eager in float32 and 0.17x in bfloat16 at the GPU shape,
  against GEMMs that form each product once.

dtypes: see :mod:`._common`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _dispatch
from .._dispatch import compute_dtype
from .._tensor_cache import TensorCache
from . import DEVICE_TYPES
from ._common import (
    KERNEL_DTYPES,
    autotune_configs,
    batch_bucket,
    dot_flops,
    dot_precision,
    matmul_tile,
    modality_dims,
    no_dots,
    pack_with_ones,
    padded,
)

# Every config compiles without register spills for sm_90 in every dtype and mode (saving the
# projections or not) at the benchmark's GPU shape, with Triton 3.6's and 3.9's ptxas
# (python -m benchmarks.compile_report): when saving, 64 x 32 at 4 warps, 64 x 64 at 8 and
# 32 x 64, 32 x 128, 64 x 128 and 128 x 64 at more warps spill with one ptxas or the other in
# float32, whose dots run on CUDA cores.
_CONFIGS = autotune_configs([
    triton.Config({"BLOCK_B": b, "BLOCK_H": h, "BLOCK_K": k}, num_warps=w)
    for b, h, k, w in [(32, 32, 32, 4), (32, 64, 32, 4), (64, 32, 32, 8), (64, 64, 32, 16)]
])
# The backward's pointwise kernel, (rows, h) tiles: spill-free as above; 64 x 64 at 8 warps
# spills in float16 with Triton 3.6's ptxas.
_GRAD_PROJ_CONFIGS = autotune_configs([
    triton.Config({"BLOCK_B": b, "BLOCK_H": h}, num_warps=w)
    for b, h, w in [(32, 128, 4), (64, 64, 16), (64, 128, 8), (128, 64, 8)]
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


@triton.jit
def _select(m, p0, p1, p2, p3):
    """The m-th of the pointers p0..p3 (a runtime m), p0 for m >= 4."""
    p = p0
    if m == 1:
        p = p1
    elif m == 2:
        p = p2
    elif m == 3:
        p = p3
    return p


def _forward_flops(args, constexprs, programs):
    # Per program and rank, one (BLOCK_B, BLOCK_H) projection per modality, over its
    # n_m + 1 columns padded to BLOCK_K steps.
    c = constexprs
    per_rank = sum(2 * c["BLOCK_B"] * c["BLOCK_H"] * padded(d, c["BLOCK_K"]) for d in modality_dims(args))
    return {"xt_ptr": programs * args["R"] * per_rank}


@triton.autotune(configs=_CONFIGS, key=["B_BUCKET", "H", "S", "R", "SAVE"])
@dot_flops(_forward_flops)
@triton.jit(do_not_specialize=["B_BUCKET"])
def _forward_kernel(
    xt_ptr, table_ptr, f_ptr, weights_ptr, bias_ptr, out_ptr, res0_ptr, res1_ptr, res2_ptr, res3_ptr,
    B, B_BUCKET, H, S, R, num_modalities,
    stride_xb, stride_fr, stride_fs, stride_fh, stride_w, stride_ob, stride_resb,
    SAVE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out (B, H) as in the module docstring; with SAVE (num_modalities <= 4) also every
    projection tile x~_m W_m[r] into residual m (res0..res3, (B, R*H), column r*H + h), in
    that tensor's dtype."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask, col_mask = rows < B, cols < H
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for r in range(R):
        fused = tl.full((BLOCK_B, BLOCK_H), 1.0, dtype=tl.float32)
        for m in range(num_modalities):
            projection = _projection(xt_ptr, stride_xb, table_ptr, f_ptr, stride_fr, stride_fs, stride_fh,
                                     m, r, rows, cols, row_mask, col_mask, PRECISION, BLOCK_K)
            if SAVE:
                res = _select(m, res0_ptr, res1_ptr, res2_ptr, res3_ptr)
                res += rows.to(tl.int64)[:, None] * stride_resb + (r * H + cols)[None, :]
                tl.store(res, projection.to(res.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
            fused *= projection
        acc += tl.load(weights_ptr + r * stride_w).to(tl.float32) * fused
    acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_ob + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.autotune(configs=_GRAD_PROJ_CONFIGS, key=["B_BUCKET", "H", "R", "num_modalities"])
@dot_flops(no_dots)
@triton.jit(do_not_specialize=["B_BUCKET"])
def _grad_proj_kernel(
    p0_ptr, p1_ptr, p2_ptr, p3_ptr, g_ptr, weights_ptr, gp_ptr, gw_rows_ptr,
    B, B_BUCKET, H, R, num_modalities,
    stride_pm, stride_pb, stride_gpm, stride_gb, stride_gh, stride_w,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """From the projections P_m (B, R*H), column r*H + h holding x~_m W_m[r] at h, and g (B, H):
    grad_proj[m][:, r*H + h] = w_r * g[:, h] * prod_{l != m} P_l[:, r*H + h] for every m, into
    gp (M, B, R*H) in its dtype, and gw_rows[b, r] = sum_h g[b, h] * prod_m P_m[b, r*H + h]
    (float32), whose column sums are grad_weights. Grid (B blocks, R): a program walks every
    h block of its rank, so the row sums need no atomics and are deterministic. Products are
    formed in float32 registers; NaN and inf propagate as in the reference.
    P_m is at select(m, p0..p3) + m * stride_pm: up to four separate tensors (the forward's
    residuals, stride_pm = 0) or one (M, B, R*H) tensor passed as every p (any M)."""
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
            p_ptr = _select(m, p0_ptr, p1_ptr, p2_ptr, p3_ptr) + m * stride_pm
            fused *= tl.load(p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        row_sums += tl.sum(fused, axis=1)
        # M - 1 loads per modality rather than dividing the full product by P_m, which a zero
        # projection would turn into NaN; the re-reads of this tile hit the caches.
        for m in range(num_modalities):
            others = weight * g
            for l in range(num_modalities):
                p_ptr = _select(l, p0_ptr, p1_ptr, p2_ptr, p3_ptr) + l * stride_pm
                others *= tl.load(p_ptr + offsets, mask=mask & (l != m), other=1.0).to(tl.float32)
            tl.store(gp_ptr + m * stride_gpm + offsets, others.to(gp_ptr.dtype.element_ty), mask=mask)
    tl.store(gw_rows_ptr + rows.to(tl.int64) * R + r, row_sums, mask=row_mask)


def _flat_layout(factors) -> torch.Tensor:
    """Every factor laid out as (S, R*H), S = sum_m (n_m + 1): row s, column r*H + h holds
    W_m[r, s - offset_m, h] for the modality m owning packed column s. One copy for all
    modalities, after which each one's constant row and W_m[:, 1:] are plain matrices and the
    forward reads it as (R, S, H) through a strided view."""
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


# The forward kernel writes the residuals of up to this many modalities (one pointer argument
# each: custom-op outputs may not alias, so they cannot be views of one buffer); LMF is used
# with 2 or 3. Above it the residuals are computed by cuBLAS after the kernel, as the backward
# would otherwise recompute them.
_MAX_SAVED = 4


def _recompute_projections(xs, flat, outs):
    """P_m = x_m W_m[:, 1:] + W_m[:, 0] into outs[m] (B, R*H) for every m, all ranks in one
    GEMM per modality; the constant row is addmm's bias rather than a materialised [1, x_m]."""
    for m, x in enumerate(xs):
        torch.addmm(flat[m][0], x, flat[m][1:], out=outs[m])


def _forward(xs, factors, weights, bias, save_residuals):
    """(out (B, H), residuals): the residuals are the projections P_m = x~_m W_m, (B, R*H) with
    column r*H + h holding (x~_m W_m[r])[:, h], in compute_dtype(x.dtype), one per modality,
    when ``save_residuals``, else []."""
    packed, table, _, _ = pack_with_ones(xs)
    (B, S), (R, _, H), M = packed.shape, factors[0].shape, len(xs)
    packed_factors = _flat_factors(factors).view(S, R, H).permute(1, 0, 2)  # (R, S, H)
    out = torch.empty((B, H), dtype=bias.dtype, device=bias.device)
    residuals = []
    if save_residuals:
        residuals = [torch.empty((B, R * H), dtype=compute_dtype(bias.dtype), device=bias.device) for _ in xs]
    save = bool(residuals) and M <= _MAX_SAVED
    # Unused pointers are bound to a tensor the kernel does not write through them, of the
    # residuals' dtype when saving: _select's branches must agree on the pointer type.
    slots = residuals + [residuals[0]] * (_MAX_SAVED - M) if save else [out] * _MAX_SAVED
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(H, meta["BLOCK_H"]))  # noqa: E731
    _forward_kernel[grid](
        packed, table, packed_factors, weights, bias, out, *slots,
        B, batch_bucket(B), H, S, R, M,
        packed.stride(0), *packed_factors.stride(), weights.stride(0), out.stride(0), R * H,
        SAVE=save, PRECISION=dot_precision(bias.dtype),
    )
    if residuals and not save:
        # Above _MAX_SAVED modalities: cuBLAS, from operands widened to the residuals' dtype so
        # that they are as exact as the kernel's float32 tiles.
        wide = residuals[0].dtype
        wide_xs = [x.to(wide) for x in xs]
        flat = _flat_layout([w.to(wide) for w in factors]).split([x.shape[1] + 1 for x in xs])
        _recompute_projections(wide_xs, flat, residuals)
    return out, residuals


def _backward(grad, residuals, xs, factors, weights, bias):
    """Gradients [*xs, *factors, weights, bias] from the forward's residuals, or, when they
    are [], from recomputed projections."""
    (B, H), R, M = grad.shape, weights.shape[0], len(xs)
    flat = _flat_factors(factors).split([x.shape[1] + 1 for x in xs])
    if residuals and M <= _MAX_SAVED:
        slots, stride_pm = residuals + [residuals[0]] * (_MAX_SAVED - M), 0
    else:
        # Without residuals the projections are recomputed; above _MAX_SAVED modalities the
        # saved ones are stacked (a copy), the kernel having pointers for only four tensors.
        if residuals:
            projections = torch.stack(residuals)
        else:
            projections = torch.empty((M, B, R * H), dtype=grad.dtype, device=grad.device)
            _recompute_projections(xs, flat, projections)
        slots, stride_pm = [projections] * _MAX_SAVED, projections.stride(0)
    grad_proj = torch.empty((M, B, R * H), dtype=grad.dtype, device=grad.device)
    grad_weight_rows = torch.empty((B, R), dtype=torch.float32, device=grad.device)
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), R)  # noqa: E731
    _grad_proj_kernel[grid](*slots, grad, weights, grad_proj, grad_weight_rows,
                            B, batch_bucket(B), H, R, M,
                            stride_pm, R * H, grad_proj.stride(0), grad.stride(0), grad.stride(1),
                            weights.stride(0))
    # [1, x_0, 1, x_1, ...] (B, S): its columns of modality m are x~_m, so the constant rows of
    # grad_W come out of the same GEMM as the rest, not from M column sums of grad_proj.
    packed, _, offsets, _ = pack_with_ones(xs)
    grad_xs, grad_factors = [], []
    for m, x in enumerate(xs):
        # grad_x_m = grad_proj[m] (B, R*H) @ (W_m[:, 1:] as (n_m, R*H))^T.
        grad_xs.append(torch.mm(grad_proj[m], flat[m][1:].t()))
        # grad_W_m[r] = x~_m^T grad_proj[m][:, r], one batched GEMM over the ranks whose x~_m^T
        # operand is broadcast (batch stride 0, not copied).
        xt = packed[:, offsets[m] : offsets[m] + x.shape[1] + 1]
        grad_factors.append(torch.bmm(xt.t().expand(R, -1, -1), grad_proj[m].view(B, R, H).transpose(0, 1)))
    return grad_xs + grad_factors + [grad_weight_rows.sum(0).to(weights.dtype), grad.sum(0)]


_dispatch.register_kernel(
    "low_rank_fusion", "triton", forward=_forward, backward=_backward, device_types=DEVICE_TYPES, saves_residuals=True,
    dtypes=KERNEL_DTYPES,
)
