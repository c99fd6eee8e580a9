"""Triton factorized bilinear pooling (MFB): z_j = sum_{i<k} (x W_x + b_x)_{jk+i} (y W_y + b_y)_{jk+i}
(times the dropout mask), then signed sqrt and L2 normalisation when ``normalize``.

``_kernel`` has two modes (and two pointwise kernels serve the backward from saved
projections). For each i < k it computes both projections of the columns j*k + i
(a strided set of W rows, so the group sum is a plain register add) as tensor-core matmuls
with the biases in the epilogue.

- forward: multiplies, masks and sums the k products into z in float32 registers. With
  ``normalize`` and o <= ``_MAX_ROW_O`` the grid is (B blocks,) and one program holds whole
  rows of z (BLOCK_O >= o), so the signed sqrt and the row's L2 norm (overflow-safe,
  NaN-propagating, as the reference) are computed in registers and the kernel stores the
  final output: z never reaches memory. Otherwise the grid is (B blocks, o blocks).
- forward, saving residuals (autograd records the call): the kernel also stores each
  projection tile as it computes it, the op's two (B, o*k) residuals in float32 for half
  inputs. Without them the (B, o*k) expansion never exists.
- forward, normalize with o > ``_MAX_ROW_O``: a row no longer fits one program's
  registers, and the norm spans every o block, so z is written in float32 and normalised
  by the Triton ``signed_sqrt_l2`` epilogue kernel, which reads each row twice (the second
  time from L2) and writes the output dtype: no separate cast.
- backward from the residuals: no projection is recomputed. One pointwise kernel writes
  grad_proj_x = g_z[j] * mask * proj_y and grad_proj_y = g_z[j] * mask * proj_x, (B, o*k):
  with ``normalize`` ``_normalized_grad_proj_kernel``, one program per row, pools z from the
  saved products and takes the normalisation's gradient g_z in the same program (z and g_z
  never reach memory), else ``_grad_proj_kernel`` reads g_z = the output's gradient.
  grad_x, grad_y, grad_W and grad_b come from grad_proj by torch matmuls and sums (cuBLAS).
- backward without residuals (the forward did not save them): ``_kernel`` in backward mode
  recomputes the projections and writes the same grad_proj; with ``normalize`` z is first
  recomputed by the forward mode.

Saving costs 2 B o k elements of writes in the forward (the kernel is compute-bound at the
benchmark shape) and saves the backward the projections' 2 B o k (n_x + n_y) FLOPs, twice
with ``normalize``.

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
    dot_flops,
    dot_precision,
    epilogue_backward,
    epilogue_forward,
    finish_norm,
    matmul_tile,
    no_dots,
    normalized_grad,
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
    # to BLOCK_N steps; the backward mode recomputes them.
    c = constexprs
    per_factor = 2 * c["BLOCK_B"] * c["BLOCK_O"] * (padded(args["NX"], c["BLOCK_N"]) + padded(args["NY"], c["BLOCK_N"]))
    return {"x_ptr": programs * args["FACTOR"] * per_factor}


@dot_flops(_flops)
@triton.jit(do_not_specialize=["B_BUCKET"])
def _kernel(
    x_ptr, y_ptr, wx_ptr, bx_ptr, wy_ptr, by_ptr, mask_ptr, z_ptr, ex_ptr, ey_ptr,
    B, B_BUCKET, O, FACTOR, NX, NY,
    stride_xb, stride_xn, stride_yb, stride_yn, stride_wxo, stride_wxn, stride_wyo, stride_wyn,
    stride_mb, stride_mo, stride_zb, stride_zo, stride_eb, eps,
    HAS_BX: tl.constexpr, HAS_BY: tl.constexpr, HAS_MASK: tl.constexpr, BACKWARD: tl.constexpr, NORMALIZE: tl.constexpr,
    SAVE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """ex_ptr, ey_ptr: (B, o*k) outputs with row stride stride_eb, the projections in forward
    mode with SAVE, their gradients in backward mode; unused otherwise."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    groups = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    row_mask, group_mask = rows < B, groups < O
    mask = row_mask[:, None] & group_mask[None, :]
    z_ptrs = z_ptr + rows.to(tl.int64)[:, None] * stride_zb + groups[None, :] * stride_zo
    if BACKWARD:
        grad_z = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
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
        if BACKWARD:
            g = grad_z * keep
            tl.store(ex_ptr + offsets, (g * py).to(ex_ptr.dtype.element_ty), mask=mask)
            tl.store(ey_ptr + offsets, (g * px).to(ey_ptr.dtype.element_ty), mask=mask)
        else:
            z += px * py * keep
    if not BACKWARD:
        if NORMALIZE:
            # The launch guarantees BLOCK_O >= O: the tile holds whole rows, and the padding
            # columns are z == 0, whose signed root is 0 and adds nothing to the norm.
            s, _ = signed_root(z, eps)
            # Each element starts as its own lane of the rescaled sum of squares; finish_norm
            # reduces over axis 0, hence the transposes.
            scale, sum_sq = accumulate_norm(tl.zeros_like(s), tl.zeros_like(s), s)
            norm = finish_norm(tl.trans(scale), tl.trans(sum_sq))
            z = s / tl.where(norm < eps, eps, norm)[:, None]  # not tl.maximum, which drops a NaN norm
        tl.store(z_ptrs, z.to(z_ptr.dtype.element_ty), mask=mask)


_KEY = ["B_BUCKET", "O", "FACTOR", "NX", "NY", "BACKWARD", "SAVE"]

_tiled_kernel = triton.autotune(
    configs=autotune_configs([
        triton.Config({"BLOCK_B": b, "BLOCK_O": o, "BLOCK_N": n}, num_warps=w)
        # Each compiles without register spills for sm_90 in every dtype and mode (forward,
        # forward saving the projections, backward) at the benchmark's GPU shape, with
        # Triton 3.6's and 3.9's ptxas (python -m benchmarks.compile_report); larger tiles,
        # and 64 x 64 with BLOCK_N = 32 (or at 4 warps), spill with one ptxas or the other in
        # float32 (whose dots run on CUDA cores) or in the backward mode, and 32 x 32 with
        # BLOCK_N = 32 in float32 when saving the projections.
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


# Tiles of the pointwise backward kernels: 16 float32 elements per thread at 8 warps, each row
# a contiguous run of columns.
_POINTWISE_BLOCK_B, _POINTWISE_BLOCK_C, _POINTWISE_WARPS = 16, 256, 8
# Groups per step of the normalised backward's row loop: o = 1000 in four steps.
_NORMALIZED_BLOCK_O = 256


@triton.jit
def _row_pool(px_ptr, py_ptr, mask_ptr, row, groups, group_mask, FACTOR, stride_pb, stride_pc, stride_mb, stride_mo,
              HAS_MASK: tl.constexpr):
    """z[row, groups] = sum_{i<k} (proj_x * proj_y * mask)[row, group*k + i] in float32."""
    z = tl.zeros(groups.shape, dtype=tl.float32)
    # The k passes read the columns with stride k, all within the same cache lines: memory
    # serves each byte about once, L1 the other passes.
    for i in range(FACTOR):
        cols = groups * FACTOR + i
        px = tl.load(px_ptr + row * stride_pb + cols * stride_pc, mask=group_mask, other=0.0).to(tl.float32)
        py = tl.load(py_ptr + row * stride_pb + cols * stride_pc, mask=group_mask, other=0.0).to(tl.float32)
        e = px * py
        if HAS_MASK:
            e *= tl.load(mask_ptr + row * stride_mb + cols * stride_mo, mask=group_mask, other=0.0).to(tl.float32)
        z += e
    return z


@triton.jit
def _row_step(g_ptr, px_ptr, py_ptr, mask_ptr, row, start, O, FACTOR, stride_gb, stride_go, stride_pb, stride_pc,
              stride_mb, stride_mo, HAS_MASK: tl.constexpr, BLOCK_O: tl.constexpr):
    """One step of a row loop over the groups [start, start + BLOCK_O): the groups, their mask,
    z pooled from the saved projections and the output gradient g there, in float32."""
    groups = start + tl.arange(0, BLOCK_O)
    group_mask = groups < O
    z = _row_pool(px_ptr, py_ptr, mask_ptr, row, groups, group_mask, FACTOR, stride_pb, stride_pc, stride_mb,
                  stride_mo, HAS_MASK)
    g = tl.load(g_ptr + row * stride_gb + groups * stride_go, mask=group_mask, other=0.0).to(tl.float32)
    return groups, group_mask, z, g


@dot_flops(no_dots)
@triton.jit
def _normalized_grad_proj_kernel(
    g_ptr, px_ptr, py_ptr, mask_ptr, gpx_ptr, gpy_ptr, O, FACTOR, eps,
    stride_gb, stride_go, stride_pb, stride_pc, stride_mb, stride_mo, stride_eb,
    HAS_MASK: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """The backward of the normalised output from the saved (B, o*k) projections, one program
    per row: z pooled from them as the forward pools it, the gradient g_z of signed sqrt + L2
    at z, then grad_proj_x = g_z[c // k] * mask * proj_y and grad_proj_y = g_z[c // k] * mask *
    proj_x for every column c, into contiguous rows of stride stride_eb. The first pass over the
    row reduces the norm and <g, s>; the second re-reads the row, which the first left in L2,
    and writes: z and g_z never reach memory."""
    row = tl.program_id(0).to(tl.int64)
    scale = tl.zeros((BLOCK_O,), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK_O,), dtype=tl.float32)
    dot = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for start in range(0, O, BLOCK_O):
        groups, group_mask, z, g = _row_step(g_ptr, px_ptr, py_ptr, mask_ptr, row, start, O, FACTOR, stride_gb,
                                             stride_go, stride_pb, stride_pc, stride_mb, stride_mo, HAS_MASK, BLOCK_O)
        s, _ = signed_root(z, eps)
        scale, sum_sq = accumulate_norm(scale, sum_sq, s)
        dot += g * s
    norm = finish_norm(scale, sum_sq)
    denom = tl.where(norm < eps, eps, norm)  # not tl.maximum, which drops a NaN norm
    radial = tl.sum(dot, axis=0) / denom
    for start in range(0, O, BLOCK_O):
        groups, group_mask, z, g = _row_step(g_ptr, px_ptr, py_ptr, mask_ptr, row, start, O, FACTOR, stride_gb,
                                             stride_go, stride_pb, stride_pc, stride_mb, stride_mo, HAS_MASK, BLOCK_O)
        grad_z = normalized_grad(g, z, norm, denom, radial, eps)
        for i in range(FACTOR):
            cols = groups * FACTOR + i
            px = tl.load(px_ptr + row * stride_pb + cols * stride_pc, mask=group_mask, other=0.0).to(tl.float32)
            py = tl.load(py_ptr + row * stride_pb + cols * stride_pc, mask=group_mask, other=0.0).to(tl.float32)
            ge = grad_z
            if HAS_MASK:
                ge *= tl.load(mask_ptr + row * stride_mb + cols * stride_mo, mask=group_mask, other=0.0).to(tl.float32)
            tl.store(gpx_ptr + row * stride_eb + cols, (ge * py).to(gpx_ptr.dtype.element_ty), mask=group_mask)
            tl.store(gpy_ptr + row * stride_eb + cols, (ge * px).to(gpy_ptr.dtype.element_ty), mask=group_mask)


@dot_flops(no_dots)
@triton.jit
def _grad_proj_kernel(
    g_ptr, px_ptr, py_ptr, mask_ptr, gpx_ptr, gpy_ptr, B, C, FACTOR,
    stride_gb, stride_go, stride_pb, stride_pc, stride_mb, stride_mo, stride_eb,
    HAS_MASK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_proj_x = g_z[c // k] * mask * proj_y and grad_proj_y = g_z[c // k] * mask * proj_x
    for each column c < C = o*k, from the saved (B, o*k) projections; g_z is (B, o). The
    outputs are contiguous rows of stride stride_eb."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < B)[:, None] & (cols < C)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    # Each g_z entry is read by k adjacent columns: one load from memory, the others hit L1.
    g = tl.load(g_ptr + rows64 * stride_gb + (cols // FACTOR)[None, :] * stride_go, mask=mask, other=0.0).to(tl.float32)
    if HAS_MASK:
        g *= tl.load(mask_ptr + rows64 * stride_mb + cols[None, :] * stride_mo, mask=mask, other=0.0).to(tl.float32)
    px = tl.load(px_ptr + rows64 * stride_pb + cols[None, :] * stride_pc, mask=mask, other=0.0).to(tl.float32)
    py = tl.load(py_ptr + rows64 * stride_pb + cols[None, :] * stride_pc, mask=mask, other=0.0).to(tl.float32)
    offsets = rows64 * stride_eb + cols[None, :]
    tl.store(gpx_ptr + offsets, (g * py).to(gpx_ptr.dtype.element_ty), mask=mask)
    tl.store(gpy_ptr + offsets, (g * px).to(gpy_ptr.dtype.element_ty), mask=mask)


def _launch(x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, z, expanded=None, backward=False,
            normalize=False, eps=0.0):
    """Forward mode writes z, signed-sqrt-L2-normalised if ``normalize`` (then o must be at
    most ``_MAX_ROW_O``), and the two projections into ``expanded`` when given; backward mode
    reads the gradient of z from ``z`` and writes the two projections' gradients into
    ``expanded``."""
    B, O = z.shape
    mask = dropout_mask if dropout_mask is not None else z
    ex, ey = expanded if expanded is not None else (z, z)
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(O, meta["BLOCK_O"]))  # noqa: E731
    # tl.dot needs every tile dimension >= 16.
    kernel, whole_rows = (_row_kernel, {"BLOCK_O": max(16, triton.next_power_of_2(O))}) if normalize else (_tiled_kernel, {})
    kernel[grid](
        x, y, weight_x, bias_x if bias_x is not None else weight_x,
        weight_y, bias_y if bias_y is not None else weight_y, mask, z, ex, ey,
        B, batch_bucket(B), O, factor, x.shape[1], y.shape[1],
        *x.stride(), *y.stride(), *weight_x.stride(), *weight_y.stride(),
        *mask.stride(), *z.stride(), ex.stride(0), eps,
        HAS_BX=bias_x is not None, HAS_BY=bias_y is not None, HAS_MASK=dropout_mask is not None,
        BACKWARD=backward, NORMALIZE=normalize, SAVE=expanded is not None and not backward,
        PRECISION=dot_precision(x.dtype), **whole_rows,
    )


def _pooled(x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, dtype, projections=None, normalize=False,
            eps=0.0):
    z = torch.empty((x.shape[0], weight_x.shape[0] // factor), dtype=dtype, device=x.device)
    _launch(x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, z, projections, normalize=normalize, eps=eps)
    return z


def _grad_projections(grad, proj_x, proj_y, factor, dropout_mask, dtype, normalize=False, eps=0.0):
    """(grad_proj_x, grad_proj_y), each (B, o*k) in ``dtype``, from the saved projections and
    the output's gradient: through the normalisation when ``normalize``, else z's gradient."""
    B, C = proj_x.shape
    gpx = torch.empty((B, C), dtype=dtype, device=proj_x.device)
    gpy = torch.empty_like(gpx)
    mask = dropout_mask if dropout_mask is not None else proj_x
    strides = (*grad.stride(), *proj_x.stride(), *mask.stride(), gpx.stride(0))
    if normalize:
        _normalized_grad_proj_kernel[(B,)](
            grad, proj_x, proj_y, mask, gpx, gpy, C // factor, factor, eps, *strides,
            HAS_MASK=dropout_mask is not None, BLOCK_O=_NORMALIZED_BLOCK_O,
        )
        return gpx, gpy
    grid = (triton.cdiv(B, _POINTWISE_BLOCK_B), triton.cdiv(C, _POINTWISE_BLOCK_C))
    _grad_proj_kernel[grid](
        grad, proj_x, proj_y, mask, gpx, gpy, B, C, factor, *strides,
        HAS_MASK=dropout_mask is not None, BLOCK_B=_POINTWISE_BLOCK_B, BLOCK_C=_POINTWISE_BLOCK_C,
        num_warps=_POINTWISE_WARPS,
    )
    return gpx, gpy


def _forward(x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, normalize, eps, save_residuals):
    """(output, residuals): the residuals are the projections [x W_x^T + b_x, y W_y^T + b_y],
    each (B, o*k) in compute_dtype(x.dtype), when ``save_residuals``, else []."""
    projections = None
    if save_residuals:
        shape = (x.shape[0], weight_x.shape[0])
        projections = [torch.empty(shape, dtype=compute_dtype(x.dtype), device=x.device) for _ in range(2)]
    residuals = projections if projections is not None else []
    if not normalize or weight_x.shape[0] // factor <= _MAX_ROW_O:
        z = _pooled(x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, x.dtype, projections, normalize, eps)
        return z, residuals
    # z stays float32 so the normalisation sees it unrounded.
    z = _pooled(x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, torch.float32, projections)
    return epilogue_forward(z, None, True, eps, x.dtype), residuals


def _backward(grad, residuals, x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, normalize, eps):
    if residuals:
        grad_px, grad_py = _grad_projections(grad, *residuals, factor, dropout_mask, x.dtype, normalize, eps)
    else:
        if normalize:
            z = _pooled(x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, torch.float32)
            grad, _ = epilogue_backward(grad, z, None, True, eps, torch.float32)
        grad_px = torch.empty((x.shape[0], weight_x.shape[0]), dtype=x.dtype, device=x.device)
        grad_py = torch.empty_like(grad_px)
        _launch(x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, grad, (grad_px, grad_py), backward=True)
    return [grad_px @ weight_x, grad_py @ weight_y, grad_px.t() @ x, grad_px.sum(0), grad_py.t() @ y, grad_py.sum(0)]


_dispatch.register_kernel(
    "factorized_bilinear", "triton", forward=_forward, backward=_backward, device_types=DEVICE_TYPES, saves_residuals=True,
    dtypes=KERNEL_DTYPES,
)
