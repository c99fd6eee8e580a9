"""Triton signed square root + L2 normalisation, and the row epilogue it shares with compact
bilinear pooling: optional gate multiply, then optionally signed sqrt and L2 norm.

One program per row, looping over the row in blocks: a first pass reduces the norm (and, in
the backward, the radial term <grad, s>), a second pass writes. The second pass re-reads the
row, which the first left in L2 for any row length a model uses, so DRAM sees each input
once. Arithmetic is float32 for half and single inputs, float64 for float64 ones; eps reaches
the kernels as a float32 scalar (Triton's type for Python floats), which in float64 moves the
result by about 1e-8 * eps, far below float64 tolerances of any test against the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _dispatch
from . import DEVICE_TYPES
from .count_sketch import tl_compute_dtype

_BLOCK = 1024


@triton.jit
def _signed_root(v, eps):
    root = tl.sqrt(tl.abs(v) + eps)
    # sign(v) * root, written so that a NaN v falls through to root (NaN): NaN in, NaN out.
    return tl.where(v < 0, -root, tl.where(v == 0, 0.0, root)), root


@triton.jit
def _accumulate_norm(scale, sum_sq, s):
    # Online rescaling, as LAPACK's nrm2 does: each lane keeps sum (s / scale)^2 with scale its
    # largest |s| so far, so the squares cannot overflow even for |z| near the dtype's maximum.
    a = tl.abs(s)
    new_scale = tl.maximum(scale, a)
    safe = tl.where(new_scale > 0, new_scale, 1.0)
    ratio = scale / safe
    return new_scale, sum_sq * ratio * ratio + (a / safe) * (a / safe)


@triton.jit
def _finish_norm(scale, sum_sq):
    top = tl.max(scale, axis=0)
    safe = tl.where(top > 0, top, 1.0)
    ratio = scale / safe
    return tl.sqrt(tl.sum(sum_sq * ratio * ratio, axis=0)) * safe


@triton.jit
def normalized_grad(g, v, norm, denom, radial, eps):
    """The gradient reaching v through out = signed_sqrt(v) / denom, given the output gradient
    g and the row's norm, denom = max(norm, eps) and radial = <g, out> (from a first pass)."""
    s, root = _signed_root(v, eps)
    # Below eps the denominator is the constant eps: only the direct term remains.
    grad_s = tl.where(norm < eps, g / eps, (g - (s / denom) * radial) / denom)
    # d sqrt(|v| + eps) / dv is finite (root >= sqrt(eps)) and sign(v)^2 zeroes it at 0:
    # grad_s times 0 there, not 0, so that a NaN row is NaN there too, as in the reference.
    return tl.where(v != 0, grad_s / (2 * root), grad_s * 0.0)


@triton.jit
def _gated(z_ptr, gate_ptr, row, cols, mask, stride_z_row, stride_z_col, stride_gate_row, stride_gate_col,
           HAS_GATE: tl.constexpr, ACC: tl.constexpr):
    z = tl.load(z_ptr + row * stride_z_row + cols * stride_z_col, mask=mask, other=0.0).to(ACC)
    if HAS_GATE:
        gate = tl.load(gate_ptr + row * stride_gate_row + cols * stride_gate_col, mask=mask, other=0.0).to(ACC)
    else:
        gate = tl.full(z.shape, 1.0, ACC)
    return z, gate


@triton.jit
def _epilogue_forward_kernel(
    z_ptr, gate_ptr, out_ptr,
    d, eps,
    stride_z_row, stride_z_col, stride_gate_row, stride_gate_col, stride_out_row,
    HAS_GATE: tl.constexpr, NORMALIZE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    denom = 1.0
    if NORMALIZE:
        scale = tl.zeros((BLOCK,), dtype=ACC)
        sum_sq = tl.zeros((BLOCK,), dtype=ACC)
        for start in range(0, d, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < d
            z, gate = _gated(z_ptr, gate_ptr, row, cols, mask, stride_z_row, stride_z_col,
                             stride_gate_row, stride_gate_col, HAS_GATE, ACC)
            s, _ = _signed_root(z * gate, eps)
            scale, sum_sq = _accumulate_norm(scale, sum_sq, s)
        norm = _finish_norm(scale, sum_sq)
        denom = tl.where(norm < eps, eps, norm)  # not tl.maximum, which drops a NaN norm
    for start in range(0, d, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < d
        z, gate = _gated(z_ptr, gate_ptr, row, cols, mask, stride_z_row, stride_z_col,
                         stride_gate_row, stride_gate_col, HAS_GATE, ACC)
        v = z * gate
        if NORMALIZE:
            s, _ = _signed_root(v, eps)
            v = s / denom
        tl.store(out_ptr + row * stride_out_row + cols, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue_backward_kernel(
    grad_ptr, z_ptr, gate_ptr, grad_z_ptr, grad_gate_ptr,
    d, eps,
    stride_grad_row, stride_grad_col, stride_z_row, stride_z_col, stride_gate_row, stride_gate_col,
    stride_grad_z_row, stride_grad_gate_row,
    HAS_GATE: tl.constexpr, NORMALIZE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    norm = 1.0
    denom = 1.0
    radial = 0.0
    if NORMALIZE:
        scale = tl.zeros((BLOCK,), dtype=ACC)
        sum_sq = tl.zeros((BLOCK,), dtype=ACC)
        dot = tl.zeros((BLOCK,), dtype=ACC)
        for start in range(0, d, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < d
            z, gate = _gated(z_ptr, gate_ptr, row, cols, mask, stride_z_row, stride_z_col,
                             stride_gate_row, stride_gate_col, HAS_GATE, ACC)
            g = tl.load(grad_ptr + row * stride_grad_row + cols * stride_grad_col, mask=mask, other=0.0).to(ACC)
            s, _ = _signed_root(z * gate, eps)
            scale, sum_sq = _accumulate_norm(scale, sum_sq, s)
            dot += g * s
        norm = _finish_norm(scale, sum_sq)
        denom = tl.where(norm < eps, eps, norm)
        # <grad, out> with out = s / denom.
        radial = tl.sum(dot, axis=0) / denom
    for start in range(0, d, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < d
        z, gate = _gated(z_ptr, gate_ptr, row, cols, mask, stride_z_row, stride_z_col,
                         stride_gate_row, stride_gate_col, HAS_GATE, ACC)
        g = tl.load(grad_ptr + row * stride_grad_row + cols * stride_grad_col, mask=mask, other=0.0).to(ACC)
        if NORMALIZE:
            g = normalized_grad(g, z * gate, norm, denom, radial, eps)
        if HAS_GATE:
            tl.store(grad_gate_ptr + row * stride_grad_gate_row + cols, (g * z).to(grad_gate_ptr.dtype.element_ty), mask=mask)
            g = g * gate
        tl.store(grad_z_ptr + row * stride_grad_z_row + cols, g.to(grad_z_ptr.dtype.element_ty), mask=mask)


def epilogue_forward(z: torch.Tensor, gate: torch.Tensor | None, normalize: bool, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """(R, d) -> (R, d) contiguous in ``out_dtype``: z * gate, then signed sqrt + L2 if ``normalize``."""
    rows, d = z.shape
    out = torch.empty((rows, d), dtype=out_dtype, device=z.device)
    gate_or_z = z if gate is None else gate  # a valid pointer the kernel never reads without HAS_GATE
    _epilogue_forward_kernel[(rows,)](
        z, gate_or_z, out,
        d, eps,
        z.stride(0), z.stride(1), gate_or_z.stride(0), gate_or_z.stride(1), out.stride(0),
        HAS_GATE=gate is not None, NORMALIZE=normalize, ACC=tl_compute_dtype(z.dtype), BLOCK=_BLOCK,
    )
    return out


def epilogue_backward(grad: torch.Tensor, z: torch.Tensor, gate: torch.Tensor | None, normalize: bool, eps: float,
                      grad_z_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Vector-Jacobian product of :func:`epilogue_forward` at (z, gate): (grad_z, grad_gate or None)."""
    rows, d = z.shape
    grad_z = torch.empty((rows, d), dtype=grad_z_dtype, device=z.device)
    grad_gate = None if gate is None else torch.empty((rows, d), dtype=gate.dtype, device=z.device)
    gate_or_z = z if gate is None else gate
    grad_gate_or_z = grad_z if grad_gate is None else grad_gate
    _epilogue_backward_kernel[(rows,)](
        grad, z, gate_or_z, grad_z, grad_gate_or_z,
        d, eps,
        grad.stride(0), grad.stride(1), z.stride(0), z.stride(1), gate_or_z.stride(0), gate_or_z.stride(1),
        grad_z.stride(0), grad_gate_or_z.stride(0),
        HAS_GATE=gate is not None, NORMALIZE=normalize, ACC=tl_compute_dtype(z.dtype), BLOCK=_BLOCK,
    )
    return grad_z, grad_gate


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])  # a view whenever the leading dims collapse


def _forward(z: torch.Tensor, eps: float) -> torch.Tensor:
    return epilogue_forward(_rows(z), None, True, eps, z.dtype).view(z.shape)


def _backward(grad: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    grad_z, _ = epilogue_backward(_rows(grad), _rows(z), None, True, eps, grad.dtype)
    return grad_z.view(z.shape)


_dispatch.register_kernel("signed_sqrt_l2", "triton", forward=_forward, backward=_backward, device_types=DEVICE_TYPES)
