"""Triton factorized bilinear pooling (MFB): z_j = sum_{i<k} (x W_x + b_x)_{jk+i} (y W_y + b_y)_{jk+i}
(times the dropout mask), then signed sqrt and L2 normalisation when ``normalize``.

``_kernel`` computes the forward; for each i < k it computes both projections of the
columns j*k + i (a strided set of W rows, so the group sum is a plain register add) as
tensor-core matmuls with the biases in the epilogue.

- forward: multiplies, masks and sums the k products into z in float32 registers. With
  ``normalize`` and o <= ``_MAX_ROW_O`` the grid is (B blocks,) and one program holds whole
  rows of z (BLOCK_O >= o), so the signed sqrt and the row's L2 norm (overflow-safe,
  NaN-propagating, as the reference) are computed in registers and the kernel stores the
  final output: z never reaches memory unless saved (below). Otherwise the grid is
  (B blocks, o blocks).
- forward, saving residuals (autograd records the call): the kernel also stores each
  projection tile as it computes it, the op's two (B, o*k) residuals in float32 for half
  inputs. Without them the (B, o*k) expansion never exists. With ``normalize`` the op's
  third residual is z before the normalisation, (B, o) float32: the whole-row kernel
  stores it from its registers before normalising (under the SAVE constexpr, so a forward
  that saves nothing compiles without the store), and the path below keeps the z it writes.
- forward, normalize with o > ``_MAX_ROW_O``: a row no longer fits one program's
  registers, and the norm spans every o block, so z is written in float32 and normalised
  by the Triton ``signed_sqrt_l2`` epilogue kernel, which reads each row twice (the second
  time from L2) and writes the output dtype: no separate cast.
- backward: two fused GEMM kernels, with grad_proj_x = g_z[c // k] * mask * proj_y and
  grad_proj_y = g_z[c // k] * mask * proj_x (B, o*k) formed tile by tile in registers from
  g_z, the mask and the other modality's projection, rounded to the input dtype as the
  reference's are, and never stored:
  1. ``_grad_input_kernel``: grad_x = grad_proj_x W_x and grad_y = grad_proj_y W_y in one
     launch, grid (B blocks, column tiles of x then of y);
  2. ``_grad_weight_kernel``: grad_W_x = grad_proj_x^T x and grad_W_y = grad_proj_y^T y in
     one launch, grid (column tiles of x then of y, o*k blocks), x and y read in place at
     their strides; the programs of each modality's first column tile also sum grad_proj
     over the batch, the bias gradient (float32, no atomics: deterministic).
  g_z is the output's gradient, or with ``normalize`` the gradient through signed sqrt + L2,
  (B, o) float32, from the saved z by the epilogue's backward kernel, which reads z and the
  output's gradient (B o values each). Pooling z again from the saved projections instead
  read both (B, o*k) residuals (164 MB at the GPU benchmark's shape); saving z costs 16 MB
  of residual memory and, at that shape, no extra write (z reaches memory there anyway).
  Roofline model, H100, forward+backward: bf16 0.475 -> 0.431 ms, TF32 0.865 -> 0.821,
  float32 5.80 -> 5.75. The elementwise products are recomputed once per column tile
  (n / BLOCK_N times per modality and kernel), work the GEMMs hide, against a write and
  re-read of grad_proj (2 B o k values) and 7 backward launches (a pointwise kernel, four
  cuBLAS GEMMs, two sums) for the unfused form, now 3 with ``normalize`` and 2 without (roofline model,
  H100, bf16 forward+backward: 0.537 -> 0.475 ms, 9 -> 5 launches).
- backward without residuals (the forward did not save them): the tiled ``_kernel``
  recomputes the projections, and z in float32 (with ``normalize`` its gradient then comes
  from the epilogue's backward kernel), and the same two GEMM kernels run.

Saving costs 2 B o k elements of writes in the forward (the kernel is compute-bound at the
benchmark shape), and B o more on the whole-row path with ``normalize``, and saves the
backward the projections' 2 B o k (n_x + n_y) FLOPs, twice with ``normalize``.

The whole-row path trades parallelism for the fusion: it launches cdiv(B, BLOCK_B) programs
instead of that times cdiv(o, BLOCK_O), with the same weight traffic (every B block reads
all of W either way).

dtypes: see :mod:`._common`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _dispatch
from .._dispatch import compute_dtype
from . import DEVICE_TYPES
from ._common import (
    KERNEL_DTYPES,
    accumulate_norm,
    autotune_configs,
    batch_bucket,
    dot,
    dot_flops,
    dot_precision,
    epilogue_backward,
    epilogue_forward,
    finish_norm,
    matmul_tile,
    padded,
    signed_root,
)

# Largest o whose rows one program holds for the fused normalisation. The kernel keeps three
# (BLOCK_B, BLOCK_O) float32 tiles (z, proj_x, proj_y), and for sm_90 every row config spills
# registers at o = 1024 in every dtype, and at o = 512 in float32
# (python -m benchmarks.compile_report); at 256 a config fits in every dtype.
_MAX_ROW_O = 256
# Elements of each row-path tile per thread beyond which float32 spills (sm_90); see _fits.
_MAX_ROW_ELEMENTS_PER_THREAD = 16


@triton.jit
def _projection(a_ptr, stride_ab, stride_an, w_ptr, stride_wo, stride_wn, bias_ptr, N,
                rows, cols, row_mask, col_mask, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """(a W^T + bias)[rows, cols], float32."""
    proj = matmul_tile(a_ptr, stride_ab, stride_an, w_ptr, stride_wn, stride_wo,
                       rows, cols, row_mask, col_mask, 0, N, PRECISION, BLOCK_N)
    if HAS_BIAS:
        proj += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return proj


def _flops(args, constexprs, programs):
    # Per program and factor, the two (BLOCK_B, BLOCK_O) projections, over n_x and n_y padded
    # to BLOCK_N steps.
    c = constexprs
    per_factor = 2 * c["BLOCK_B"] * c["BLOCK_O"] * (padded(args["NX"], c["BLOCK_N"]) + padded(args["NY"], c["BLOCK_N"]))
    return {"x_ptr": programs * args["FACTOR"] * per_factor}


@dot_flops(_flops)
@triton.jit(do_not_specialize=["B_BUCKET"])
def _kernel(
    x_ptr, y_ptr, wx_ptr, bx_ptr, wy_ptr, by_ptr, mask_ptr, z_ptr, ex_ptr, ey_ptr, zr_ptr,
    B, B_BUCKET, O, FACTOR, NX, NY,
    stride_xb, stride_xn, stride_yb, stride_yn, stride_wxo, stride_wxn, stride_wyo, stride_wyn,
    stride_mb, stride_mo, stride_zb, stride_zo, stride_eb, eps,
    HAS_BX: tl.constexpr, HAS_BY: tl.constexpr, HAS_MASK: tl.constexpr, NORMALIZE: tl.constexpr, SAVE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """ex_ptr, ey_ptr: (B, o*k) outputs with row stride stride_eb, the projections with SAVE;
    zr_ptr: (B, o) float32 output at z's strides, z before the normalisation with SAVE and
    NORMALIZE; each unused otherwise."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    groups = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    row_mask, group_mask = rows < B, groups < O
    mask = row_mask[:, None] & group_mask[None, :]
    z_offsets = rows.to(tl.int64)[:, None] * stride_zb + groups[None, :] * stride_zo
    z = tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32)
    for i in range(FACTOR):
        cols = groups * FACTOR + i
        px = _projection(x_ptr, stride_xb, stride_xn, wx_ptr, stride_wxo, stride_wxn, bx_ptr, NX,
                         rows, cols, row_mask, group_mask, HAS_BX, PRECISION, BLOCK_N)
        py = _projection(y_ptr, stride_yb, stride_yn, wy_ptr, stride_wyo, stride_wyn, by_ptr, NY,
                         rows, cols, row_mask, group_mask, HAS_BY, PRECISION, BLOCK_N)
        offsets = rows.to(tl.int64)[:, None] * stride_eb + cols[None, :]
        if SAVE:
            tl.store(ex_ptr + offsets, px.to(ex_ptr.dtype.element_ty), mask=mask)
            tl.store(ey_ptr + offsets, py.to(ey_ptr.dtype.element_ty), mask=mask)
        if HAS_MASK:
            m_ptrs = mask_ptr + rows.to(tl.int64)[:, None] * stride_mb + cols[None, :] * stride_mo
            keep = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)
        else:
            keep = 1.0
        z += px * py * keep
    if NORMALIZE:
        if SAVE:
            # The backward's third residual: the normalisation's gradient comes from it.
            tl.store(zr_ptr + z_offsets, z, mask=mask)
        # The launch guarantees BLOCK_O >= O: the tile holds whole rows, and the padding
        # columns are z == 0, whose signed root is 0 and adds nothing to the norm.
        s, _ = signed_root(z, eps)
        # Each element starts as its own lane of the rescaled sum of squares; finish_norm
        # reduces over axis 0, hence the transposes.
        scale, sum_sq = accumulate_norm(tl.zeros_like(s), tl.zeros_like(s), s)
        norm = finish_norm(tl.trans(scale), tl.trans(sum_sq))
        z = s / tl.where(norm < eps, eps, norm)[:, None]  # not tl.maximum, which drops a NaN norm
    tl.store(z_ptr + z_offsets, z.to(z_ptr.dtype.element_ty), mask=mask)


_KEY = ["B_BUCKET", "O", "FACTOR", "NX", "NY", "SAVE"]

_tiled_kernel = triton.autotune(
    configs=autotune_configs([
        triton.Config({"BLOCK_B": b, "BLOCK_O": o, "BLOCK_N": n}, num_warps=w)
        # Each compiles without register spills for sm_90 in every dtype and mode (forward,
        # forward saving the projections) at the benchmark's GPU shape, with
        # Triton 3.6's and 3.9's ptxas (python -m benchmarks.compile_report); larger tiles,
        # and 64 x 64 with BLOCK_N = 32 (or at 4 warps), spill with one ptxas or the other in
        # float32 (whose dots run on CUDA cores) or in the backward mode the kernel had, and
        # 32 x 32 with BLOCK_N = 32 in float32 when saving the projections.
        for b, o, n, w in [(32, 32, 16, 4), (64, 32, 32, 4), (64, 64, 16, 8), (128, 32, 32, 8)]
    ]),
    key=_KEY,
)(_kernel)


# Hopper allows 227 KiB of shared memory per block; keep a margin for the epilogue.
_SHARED_MEMORY_BUDGET = 200 * 1024


def _fits(configs, named_args, **kwargs):
    """Row-path configs whose register tiles and pipelined shared-memory tiles fit: at most
    ``_MAX_ROW_ELEMENTS_PER_THREAD`` elements of each (BLOCK_B, BLOCK_O) tile per thread,
    and each of the num_stages - 1 buffers holds an x tile and a (BLOCK_N, BLOCK_O) weight
    tile."""
    itemsize = named_args["x_ptr"].element_size()

    def shared_memory(c):
        tiles = (c.kwargs["BLOCK_B"] + kwargs["BLOCK_O"]) * c.kwargs["BLOCK_N"] * itemsize
        return tiles * max(1, c.num_stages - 1)

    return [
        c for c in configs
        if c.kwargs["BLOCK_B"] * kwargs["BLOCK_O"] <= _MAX_ROW_ELEMENTS_PER_THREAD * 32 * c.num_warps
        and shared_memory(c) <= _SHARED_MEMORY_BUDGET
    ]


# BLOCK_O is not tuned here: the launch sets it to o rounded up to a power of two. The first
# config fits every dtype at o = _MAX_ROW_O (the interpreter runs only the first).
_row_kernel = triton.autotune(
    configs=autotune_configs([
        triton.Config({"BLOCK_B": b, "BLOCK_N": n}, num_warps=w)
        for b, n, w in [(16, 32, 8), (16, 16, 4), (16, 32, 4), (16, 32, 16), (32, 32, 8), (64, 32, 8)]
    ]),
    key=_KEY,
    prune_configs_by={"early_config_prune": _fits},
)(_kernel)


@triton.jit
def _grad_proj_tile(g_ptr, p_ptr, mask_ptr, rows, cols, mask, FACTOR, stride_gb, stride_go, stride_pb,
                    stride_mb, stride_mo, HAS_MASK: tl.constexpr):
    """grad_proj[rows, cols] = g_z[row, c // k] * mask[row, c] * p[row, c] in float32, with p
    the other modality's saved projection (unit column stride): grad_proj_x from proj_y,
    grad_proj_y from proj_x."""
    rows64 = rows.to(tl.int64)[:, None]
    # Each g_z entry serves k adjacent columns: one load from memory, the others hit L1.
    g = tl.load(g_ptr + rows64 * stride_gb + (cols // FACTOR)[None, :] * stride_go, mask=mask, other=0.0)
    g = g.to(tl.float32)
    if HAS_MASK:
        g *= tl.load(mask_ptr + rows64 * stride_mb + cols[None, :] * stride_mo, mask=mask, other=0.0).to(tl.float32)
    return g * tl.load(p_ptr + rows64 * stride_pb + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _grad_input_tile(g_ptr, p_ptr, mask_ptr, w_ptr, out_ptr, B, C, N, FACTOR, n0,
                     stride_gb, stride_go, stride_pb, stride_mb, stride_mo, stride_wc, stride_wn,
                     HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[rows, n0:n0 + BLOCK_N] = grad_proj @ W[:, n0:n0 + BLOCK_N], W (C, N), out (B, N)
    contiguous, grad_proj formed per (BLOCK_B, BLOCK_K) tile by _grad_proj_tile and rounded to
    W's dtype, as the reference's grad_proj is in the input dtype."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    n = n0 + tl.arange(0, BLOCK_N)
    row_mask, n_mask = rows < B, n < N
    w_cols = w_ptr + n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        col_mask = cols < C
        grad_proj = _grad_proj_tile(g_ptr, p_ptr, mask_ptr, rows, cols, row_mask[:, None] & col_mask[None, :],
                                    FACTOR, stride_gb, stride_go, stride_pb, stride_mb, stride_mo, HAS_MASK)
        w = tl.load(w_cols + cols.to(tl.int64)[:, None] * stride_wc, mask=col_mask[:, None] & n_mask[None, :], other=0.0)
        acc = dot(grad_proj.to(w_ptr.dtype.element_ty), w, acc, PRECISION)
    out = out_ptr + rows.to(tl.int64)[:, None] * N + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def _grad_input_flops(args, constexprs, programs):
    # Per program one (BLOCK_B, BLOCK_N) tile over the o*k columns padded to BLOCK_K, for x's
    # tiles and y's alike. The dot's first operand, grad_proj, is formed in registers in W's
    # dtype: the count is keyed by the weight pointer, whose dtype it has.
    c = constexprs
    return {"wx_ptr": programs * 2 * c["BLOCK_B"] * c["BLOCK_N"] * padded(args["C"], c["BLOCK_K"])}


@dot_flops(_grad_input_flops)
@triton.jit(do_not_specialize=["B_BUCKET"])
def _grad_input_kernel(
    g_ptr, px_ptr, py_ptr, mask_ptr, wx_ptr, wy_ptr, dx_ptr, dy_ptr,
    B, B_BUCKET, C, FACTOR, NX, NY,
    stride_gb, stride_go, stride_pb, stride_mb, stride_mo, stride_wxc, stride_wxn, stride_wyc, stride_wyn,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """grad_x = grad_proj_x @ W_x and grad_y = grad_proj_y @ W_y in one launch, grid
    (B blocks, column tiles of x then of y); grad_proj_x = g_z[c // k] * mask * proj_y and
    grad_proj_y = g_z[c // k] * mask * proj_x are formed in registers (_grad_proj_tile) and
    never stored. Each modality is its own branch (its own strides, some of which Triton
    specialises as constants), so the pointers need not be selected at run time."""
    tiles_x = tl.cdiv(NX, BLOCK_N)
    t = tl.program_id(1)
    if t < tiles_x:
        _grad_input_tile(g_ptr, py_ptr, mask_ptr, wx_ptr, dx_ptr, B, C, NX, FACTOR, t * BLOCK_N,
                         stride_gb, stride_go, stride_pb, stride_mb, stride_mo, stride_wxc, stride_wxn,
                         HAS_MASK, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
    else:
        _grad_input_tile(g_ptr, px_ptr, mask_ptr, wy_ptr, dy_ptr, B, C, NY, FACTOR, (t - tiles_x) * BLOCK_N,
                         stride_gb, stride_go, stride_pb, stride_mb, stride_mo, stride_wyc, stride_wyn,
                         HAS_MASK, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)


@triton.jit
def _grad_weight_tile(x_ptr, g_ptr, p_ptr, mask_ptr, dw_ptr, db_ptr, B, C, N, FACTOR, n0,
                      stride_xb, stride_xn, stride_gb, stride_go, stride_pb, stride_mb, stride_mo,
                      HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """dW[cols, n0:n0 + BLOCK_N] = grad_proj[:, cols]^T @ x[:, n0:n0 + BLOCK_N], one GEMM over
    the batch, dW (C, N) contiguous, x read in place at its strides; grad_proj formed per
    (BLOCK_B, BLOCK_C) tile and rounded to x's dtype. The programs of the first column tile
    (n0 == 0) also store db[cols] = sum_b grad_proj[b, cols], the bias gradient, in float32
    until the one rounding (no atomics: deterministic)."""
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = n0 + tl.arange(0, BLOCK_N)
    col_mask, n_mask = cols < C, n < N
    x_cols = x_ptr + n.to(tl.int64)[None, :] * stride_xn
    acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
    bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        grad_proj = _grad_proj_tile(g_ptr, p_ptr, mask_ptr, rows, cols, row_mask[:, None] & col_mask[None, :],
                                    FACTOR, stride_gb, stride_go, stride_pb, stride_mb, stride_mo, HAS_MASK)
        grad_proj = grad_proj.to(x_ptr.dtype.element_ty)
        if n0 == 0:
            bias += tl.sum(grad_proj.to(tl.float32), axis=0)
        x = tl.load(x_cols + rows.to(tl.int64)[:, None] * stride_xb, mask=row_mask[:, None] & n_mask[None, :],
                    other=0.0)
        acc = dot(tl.trans(grad_proj), x, acc, PRECISION)
    out = dw_ptr + cols.to(tl.int64)[:, None] * N + n[None, :]
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=col_mask[:, None] & n_mask[None, :])
    if n0 == 0:
        tl.store(db_ptr + cols, bias.to(db_ptr.dtype.element_ty), mask=col_mask)


def _grad_weight_flops(args, constexprs, programs):
    # Per program one (BLOCK_C, BLOCK_N) tile over the batch, padded to BLOCK_B; the dot's
    # operands have x's dtype (grad_proj is rounded to it).
    c = constexprs
    return {"x_ptr": programs * 2 * c["BLOCK_C"] * c["BLOCK_N"] * padded(args["B"], c["BLOCK_B"])}


@dot_flops(_grad_weight_flops)
@triton.jit(do_not_specialize=["B_BUCKET"])
def _grad_weight_kernel(
    x_ptr, y_ptr, g_ptr, px_ptr, py_ptr, mask_ptr, dwx_ptr, dbx_ptr, dwy_ptr, dby_ptr,
    B, B_BUCKET, C, FACTOR, NX, NY,
    stride_xb, stride_xn, stride_yb, stride_yn, stride_gb, stride_go, stride_pb, stride_mb, stride_mo,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """grad_W_x = grad_proj_x^T x, grad_b_x = column sums of grad_proj_x, and likewise for y,
    in one launch, grid (column tiles of x then of y, o*k blocks); grad_proj formed in
    registers as in _grad_input_kernel."""
    tiles_x = tl.cdiv(NX, BLOCK_N)
    t = tl.program_id(0)
    if t < tiles_x:
        _grad_weight_tile(x_ptr, g_ptr, py_ptr, mask_ptr, dwx_ptr, dbx_ptr, B, C, NX, FACTOR, t * BLOCK_N,
                          stride_xb, stride_xn, stride_gb, stride_go, stride_pb, stride_mb, stride_mo,
                          HAS_MASK, PRECISION, BLOCK_C, BLOCK_N, BLOCK_B)
    else:
        _grad_weight_tile(y_ptr, g_ptr, px_ptr, mask_ptr, dwy_ptr, dby_ptr, B, C, NY, FACTOR, (t - tiles_x) * BLOCK_N,
                          stride_yb, stride_yn, stride_gb, stride_go, stride_pb, stride_mb, stride_mo,
                          HAS_MASK, PRECISION, BLOCK_C, BLOCK_N, BLOCK_B)


_GRAD_KEY = ["B_BUCKET", "C", "FACTOR", "NX", "NY", "HAS_MASK"]
# Tiles of the backward's GEMMs, (BLOCK_B, BLOCK_N, BLOCK_K) of grad_x and (BLOCK_C, BLOCK_N,
# BLOCK_B) of grad_W: at least 64 rows, so that half-precision dots are wgmma. Each compiles
# without register spills for sm_90 in every dtype at the benchmark's GPU shape with Triton
# 3.9's and 3.6's ptxas (python -m benchmarks.compile_report). Dropped for spilling in float32
# (CUDA-core dots): grad_x 64 x 64 at 4 warps (BLOCK_K 32 or 16, 3.9), 128 x 128 x 32 at 8 or
# 16 warps; grad_W 64 x 128 x 32 and 128 x 128 x 32 at 8 warps (3.6), 128 x 128 x 32 at 16.
_grad_input = triton.autotune(
    configs=autotune_configs([
        triton.Config({"BLOCK_B": b, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
        for b, n, k, w in [(64, 64, 32, 8), (64, 128, 16, 4), (64, 128, 32, 8), (128, 64, 32, 8), (128, 128, 16, 8)]
    ]),
    key=_GRAD_KEY,
)(_grad_input_kernel)
_grad_weight = triton.autotune(
    configs=autotune_configs([
        triton.Config({"BLOCK_C": c, "BLOCK_N": n, "BLOCK_B": b}, num_warps=w)
        for c, n, b, w in [(64, 64, 32, 4), (128, 64, 32, 8), (64, 128, 16, 8), (128, 128, 16, 8), (64, 128, 16, 4)]
    ]),
    key=_GRAD_KEY,
)(_grad_weight_kernel)


def _launch(x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, z, expanded=None, normalize=False, eps=0.0,
            pre_norm=None):
    """Writes z, signed-sqrt-L2-normalised if ``normalize`` (then o must be at most
    ``_MAX_ROW_O``), the two projections into ``expanded`` when given, and with both,
    z before the normalisation into ``pre_norm`` (float32, z's layout)."""
    B, O = z.shape
    mask = dropout_mask if dropout_mask is not None else z
    ex, ey = expanded if expanded is not None else (z, z)
    zr = pre_norm if pre_norm is not None else z
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(O, meta["BLOCK_O"]))  # noqa: E731
    # tl.dot needs every tile dimension >= 16.
    kernel, whole_rows = (_row_kernel, {"BLOCK_O": max(16, triton.next_power_of_2(O))}) if normalize else (_tiled_kernel, {})
    kernel[grid](
        x, y, weight_x, bias_x if bias_x is not None else weight_x,
        weight_y, bias_y if bias_y is not None else weight_y, mask, z, ex, ey, zr,
        B, batch_bucket(B), O, factor, x.shape[1], y.shape[1],
        *x.stride(), *y.stride(), *weight_x.stride(), *weight_y.stride(),
        *mask.stride(), *z.stride(), ex.stride(0), eps,
        HAS_BX=bias_x is not None, HAS_BY=bias_y is not None, HAS_MASK=dropout_mask is not None,
        NORMALIZE=normalize, SAVE=expanded is not None, PRECISION=dot_precision(x.dtype), **whole_rows,
    )


def _pooled(x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, dtype, projections=None, normalize=False,
            eps=0.0, pre_norm=None):
    z = torch.empty((x.shape[0], weight_x.shape[0] // factor), dtype=dtype, device=x.device)
    _launch(x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, z, projections, normalize=normalize, eps=eps,
            pre_norm=pre_norm)
    return z


def _projection_buffers(x, weight_x):
    """Two empty (B, o*k) tensors in compute_dtype(x.dtype): the projections' layout."""
    shape = (x.shape[0], weight_x.shape[0])
    return [torch.empty(shape, dtype=compute_dtype(x.dtype), device=x.device) for _ in range(2)]


def _forward(x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, normalize, eps, save_residuals):
    """(output, residuals): with ``save_residuals`` the op's residuals, the projections
    [x W_x^T + b_x, y W_y^T + b_y], each (B, o*k), and with ``normalize`` z before the
    normalisation, (B, o), all in compute_dtype(x.dtype) (float32 for every kernel dtype);
    else []."""
    B, O = x.shape[0], weight_x.shape[0] // factor
    projections = _projection_buffers(x, weight_x) if save_residuals else None
    residuals = projections if projections is not None else []
    if not normalize or O <= _MAX_ROW_O:
        keep_z = normalize and save_residuals
        pre_norm = torch.empty((B, O), dtype=compute_dtype(x.dtype), device=x.device) if keep_z else None
        z = _pooled(x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, x.dtype, projections, normalize, eps,
                    pre_norm)
        return z, residuals + ([pre_norm] if pre_norm is not None else [])
    # z stays float32 so the normalisation sees it unrounded; it is the third residual as is.
    z = _pooled(x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, compute_dtype(x.dtype), projections)
    return epilogue_forward(z, None, True, eps, x.dtype), residuals + ([z] if save_residuals else [])


def _backward(grad, residuals, x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, normalize, eps):
    """[grad_x, grad_y, grad_W_x, grad_b_x, grad_W_y, grad_b_y] by the two fused GEMM kernels
    from g_z and the projections: the forward's residuals, or, when it saved none, recomputed
    with z by the tiled forward kernel. With ``normalize``, g_z comes from z (the third
    residual, or the recomputed one) by the epilogue's backward kernel."""
    B, C = x.shape[0], weight_x.shape[0]
    grad_z = grad
    if residuals:
        # The kernels read the projections at unit column stride (a no-op for the forward's).
        proj_x, proj_y = (r.contiguous() for r in residuals[:2])
        if normalize:
            grad_z, _ = epilogue_backward(grad, residuals[2], None, True, eps, torch.float32)
    else:
        proj_x, proj_y = _projection_buffers(x, weight_x)
        z = _pooled(x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, torch.float32, (proj_x, proj_y))
        if normalize:
            grad_z, _ = epilogue_backward(grad, z, None, True, eps, torch.float32)
    mask = dropout_mask if dropout_mask is not None else proj_x
    n_x, n_y = x.shape[1], y.shape[1]
    grad_x = torch.empty((B, n_x), dtype=x.dtype, device=x.device)
    grad_y = torch.empty((B, n_y), dtype=x.dtype, device=x.device)
    grad_wx = torch.empty((C, n_x), dtype=weight_x.dtype, device=x.device)
    grad_wy = torch.empty((C, n_y), dtype=weight_x.dtype, device=x.device)
    grad_bx = torch.empty((C,), dtype=weight_x.dtype, device=x.device)
    grad_by = torch.empty_like(grad_bx)
    shared = dict(HAS_MASK=dropout_mask is not None, PRECISION=dot_precision(x.dtype))
    column_tiles = lambda meta: triton.cdiv(n_x, meta["BLOCK_N"]) + triton.cdiv(n_y, meta["BLOCK_N"])  # noqa: E731
    _grad_input[lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), column_tiles(meta))](
        grad_z, proj_x, proj_y, mask, weight_x, weight_y, grad_x, grad_y,
        B, batch_bucket(B), C, factor, n_x, n_y,
        *grad_z.stride(), proj_x.stride(0), *mask.stride(), *weight_x.stride(), *weight_y.stride(), **shared,
    )
    _grad_weight[lambda meta: (column_tiles(meta), triton.cdiv(C, meta["BLOCK_C"]))](
        x, y, grad_z, proj_x, proj_y, mask, grad_wx, grad_bx, grad_wy, grad_by,
        B, batch_bucket(B), C, factor, n_x, n_y,
        *x.stride(), *y.stride(), *grad_z.stride(), proj_x.stride(0), *mask.stride(), **shared,
    )
    return [grad_x, grad_y, grad_wx, grad_bx, grad_wy, grad_by]


_dispatch.register_kernel(
    "factorized_bilinear", "triton", forward=_forward, backward=_backward, device_types=DEVICE_TYPES, saves_residuals=True,
    dtypes=KERNEL_DTYPES,
)
