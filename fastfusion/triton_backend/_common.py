"""Pieces shared by the Triton kernels: the dtype policy, autotuning helpers, the FLOP
declarations, tiles of matmuls (LMF, MFB, TFN), the modality packing (LMF, TFN) and the row
epilogue (signed sqrt, CBP, MFB).

dtype policy: float32, float16 and bfloat16 run the kernels, which accumulate in float32
and round once when storing. float32 products use IEEE precision unless the user allowed
TF32 for matmuls with ``torch.backends.cuda.matmul.allow_tf32`` (the flag PyTorch's own
matmuls obey). The kernels that use ``tl.dot`` are registered for ``KERNEL_DTYPES`` only, so
the dispatcher runs float64 calls on the "torch" kernels: ``tl.dot`` has no float64 form on
every GPU generation and Triton release the project supports, and float64 is the oracle's
dtype rather than a speed path.

FLOP declarations: every launched kernel (a ``@triton.jit`` function that no other one calls)
declares the FLOPs of its ``tl.dot``s beside it, ``@dot_flops(formula)`` between
``@triton.autotune`` and ``@triton.jit``; a kernel without dots declares ``@dot_flops(no_dots)``,
so that a forgotten declaration stays an error for whoever costs the kernel (a GPU cost model,
benchmarks/roofline.py, reads ``kernel.dot_flops``; tests/test_roofline.py walks this package
for kernels without one). ``formula(args, constexprs, programs) -> {pointer name: FLOPs}``:

- ``args``: every launch argument by name; scalars as their values, tensors as objects with
  ``.shape`` and ``.dtype`` and, for small tables copied from the host (the modality table of
  :func:`pack_with_ones`), ``.values``, a tuple of the table's entries (None when unknown);
- ``constexprs``: the scalar and constexpr arguments and the autotune config's block sizes;
- ``programs``: the number of programs in the grid.

FLOPs count 2 per multiply-add of the dots as the programs run them: every program's tiles,
padded to the block sizes, recomputation included. Each count is keyed by the argument name
of a pointer the dot reads (its first operand's), whose dtype with the ``PRECISION``
constexpr selects the unit that multiplies; which unit and its speed are the cost model's
business, not the kernel's.

The row epilogue (``epilogue_forward``/``epilogue_backward``): optional gate multiply, then
optionally signed sqrt and L2 norm. One program per row, looping over the row in blocks: a
first pass reduces the norm (and, in the backward, the radial term <grad, s>), a second pass
writes. The second pass re-reads the row, which the first left in L2 for any row length a model
uses, so DRAM sees each input once. Arithmetic is float32 for half and single inputs, float64
for float64 ones (``tl_compute_dtype``); eps reaches the kernels as a float32 scalar (Triton's
type for Python floats), which in float64 moves the result by about 1e-8 * eps, far below
float64 tolerances of any test against the reference.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter's tl.dot is numpy.matmul on the raw storage, and numpy holds bfloat16 as
# uint16, so bfloat16 products come out as garbage there (Triton 3.9).
_WIDEN_BF16_DOT = tl.constexpr(_INTERPRET)

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# What @triton.jit returns: a JITFunction, or under TRITON_INTERPRET=1 an InterpretedFunction
# (the interpreter module is imported only then, as triton.jit itself does).
if _INTERPRET:
    from triton.runtime.interpreter import InterpretedFunction

    JIT_FUNCTION_TYPES = (JITFunction, InterpretedFunction)
else:
    JIT_FUNCTION_TYPES = (JITFunction,)


def tl_compute_dtype(dtype: torch.dtype):
    """The Triton accumulator type for ``dtype`` (_dispatch.compute_dtype, in Triton's terms)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    # The interpreter runs every candidate for real in numpy: tune nothing there.
    return configs[:1] if _INTERPRET else configs


def batch_bucket(batch: int) -> int:
    """The autotuning key for a batch size: the next power of two. Every autotuned kernel takes
    it as an extra argument, ``B_BUCKET``, keyed on instead of B, so a training loop's ragged
    last batch (or a varying inference batch) reuses the tuning of its bucket instead of
    benchmarking every config again; the best tiles change with the batch's scale, not with
    each size. The kernels never read it, and it is excluded from specialisation
    (``do_not_specialize``), so its values compile nothing new."""
    return triton.next_power_of_2(batch)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for tl.dot; it only changes float32 operands."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


@functools.cache
def _modality_layout(dims: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, tuple[int, ...], int]:
    """The table, column offsets and P of :func:`pack_with_ones` for modalities of sizes
    ``dims`` (n_m + 1 each). Cached per (dims, device), so only the first call with a layout
    copies its table to the device: later calls make no host-to-device copy, and a CUDA graph
    captured after a warm-up call replays with a table that lives as long as the process
    (hence no eviction: a model has a handful of layouts, each a few bytes)."""
    strides, size = [], 1
    for d in reversed(dims):
        strides.insert(0, size)
        size *= d
    offsets = tuple(sum(dims[:m]) for m in range(len(dims)))
    table = [v for row in zip(offsets, dims, strides) for v in row]
    return torch.tensor(table, dtype=torch.int32, device=device), offsets, size


def pack_with_ones(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], int]:
    """All modalities with their constant prepended, [1, x_0, 1, x_1, ...], as one contiguous
    (B, S) tensor, S = sum_m (n_m + 1), so one pointer serves any number of modalities.

    Also returns an int32 device table of (column offset, n_m + 1, stride in the flattened
    outer product = prod_{l > m} (n_l + 1)) per modality, the column offsets as a tuple (no
    device sync to read them), and the outer product's length P. The table is cached
    (:func:`_modality_layout`): do not write to it.
    The copy is O(B * S), the size of the inputs, and makes strided inputs contiguous.
    """
    ones = xs[0].new_ones(xs[0].shape[0], 1)
    packed = torch.cat([t for x in xs for t in (ones, x)], dim=1)
    table, offsets, size = _modality_layout(tuple(x.shape[1] + 1 for x in xs), packed.device)
    return packed, table, offsets, size


def dot_flops(formula: Callable[[dict, dict, int], dict[str, int]]):
    """Decorator: declare ``formula`` (module docstring) as the FLOPs of a ``@triton.jit``
    kernel's dots, stored as its ``dot_flops`` attribute. Goes directly above ``@triton.jit``
    (below ``@triton.autotune``), where the JITFunction is what it decorates."""
    if not callable(formula):
        raise TypeError(f"dot_flops: formula must be callable (args, constexprs, programs), got {formula!r}")

    def declare(kernel):
        if not isinstance(kernel, JIT_FUNCTION_TYPES):
            raise TypeError(
                f"dot_flops must decorate a @triton.jit function directly (below @triton.autotune), got {kernel!r}"
            )
        kernel.dot_flops = formula
        return kernel

    return declare


def no_dots(args: dict, constexprs: dict, programs: int) -> dict[str, int]:
    """The FLOP formula of a kernel without ``tl.dot``: its pointwise work counts 0 (it is
    bandwidth-bound; the cost model times it by its bytes)."""
    return {}


def padded(n: int, block: int) -> int:
    """``n`` rounded up to a multiple of ``block``: the extent a loop of ``block`` steps covers."""
    return triton.cdiv(n, block) * block


def modality_dims(args: dict) -> list[int]:
    """n_m + 1 per modality, for a FLOP formula: every third value of the (offset, n_m + 1,
    stride) table of :func:`pack_with_ones`, the kernel argument ``table_ptr``."""
    table = args["table_ptr"].values
    if table is None:
        raise ValueError(
            "table_ptr: the modality table's values are unknown; the FLOP formula needs them "
            "(the caller must record the table's host values when it is copied to the device)"
        )
    return list(table[1::3])


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """tl.dot accumulating into float32 ``acc``. Under the interpreter bfloat16 operands are
    widened to float32 first: exact, and the same products a GPU's bfloat16 MMA forms."""
    if _WIDEN_BF16_DOT and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc=acc, input_precision=PRECISION)


@triton.jit
def matmul_tile(
    a_ptr, stride_am, stride_ak, b_ptr, stride_bk, stride_bn,
    rows, cols, row_mask, col_mask, k_start, k_end,
    PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """A[rows, k_start:k_end] @ B[k_start:k_end, cols] in float32, masked rows/cols read 0."""
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + cols.to(tl.int64)[None, :] * stride_bn
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < k_end
        a = tl.load(a_rows + k[None, :] * stride_ak, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_cols + k[:, None] * stride_bk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = dot(a, b, acc, PRECISION)
    return acc


_EPILOGUE_BLOCK = 1024


@triton.jit
def signed_root(v, eps):
    root = tl.sqrt(tl.abs(v) + eps)
    # sign(v) * root, written so that a NaN v falls through to root (NaN): NaN in, NaN out.
    return tl.where(v < 0, -root, tl.where(v == 0, 0.0, root)), root


@triton.jit
def accumulate_norm(scale, sum_sq, s):
    # Online rescaling, as LAPACK's nrm2 does: each lane keeps sum (s / scale)^2 with scale its
    # largest |s| so far, so the squares cannot overflow even for |z| near the dtype's maximum.
    a = tl.abs(s)
    new_scale = tl.maximum(scale, a)
    safe = tl.where(new_scale > 0, new_scale, 1.0)
    ratio = scale / safe
    return new_scale, sum_sq * ratio * ratio + (a / safe) * (a / safe)


@triton.jit
def finish_norm(scale, sum_sq):
    top = tl.max(scale, axis=0)
    safe = tl.where(top > 0, top, 1.0)
    ratio = scale / safe
    return tl.sqrt(tl.sum(sum_sq * ratio * ratio, axis=0)) * safe


@triton.jit
def normalized_grad(g, v, norm, denom, radial, eps):
    """The gradient reaching v through out = signed_sqrt(v) / denom, given the output gradient
    g and the row's norm, denom = max(norm, eps) and radial = <g, out> (from a first pass)."""
    s, root = signed_root(v, eps)
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
def epilogue_row(
    z_ptr, gate_ptr, out_ptr, row, d, eps,
    stride_z_row, stride_z_col, stride_gate_row, stride_gate_col, stride_out_row,
    HAS_GATE: tl.constexpr, NORMALIZE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[row] = epilogue of z[row] (z * gate, then signed sqrt + L2 if NORMALIZE), d columns
    in BLOCK steps, two passes over the row: the body of the epilogue kernel, and of any kernel
    that ends by finishing a row it has just made (the pooled CBP's Gram kernel, the fused
    vector CBP kernel)."""
    denom = 1.0
    if NORMALIZE:
        # The first pass: the norm alone (z_ptr stands in for the absent gradient).
        denom = normalized_grad_scalars(z_ptr, z_ptr, gate_ptr, row, d, eps, 0, 0, stride_z_row, stride_z_col,
                                        stride_gate_row, stride_gate_col, HAS_GATE, False, ACC, BLOCK)[1]
    for start in range(0, d, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < d
        z, gate = _gated(z_ptr, gate_ptr, row, cols, mask, stride_z_row, stride_z_col,
                         stride_gate_row, stride_gate_col, HAS_GATE, ACC)
        v = z * gate
        if NORMALIZE:
            s, _ = signed_root(v, eps)
            v = s / denom
        tl.store(out_ptr + row * stride_out_row + cols, v.to(out_ptr.dtype.element_ty), mask=mask)


@dot_flops(no_dots)
@triton.jit
def _epilogue_forward_kernel(
    z_ptr, gate_ptr, out_ptr,
    d, eps,
    stride_z_row, stride_z_col, stride_gate_row, stride_gate_col, stride_out_row,
    HAS_GATE: tl.constexpr, NORMALIZE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    epilogue_row(z_ptr, gate_ptr, out_ptr, tl.program_id(0).to(tl.int64), d, eps,
                 stride_z_row, stride_z_col, stride_gate_row, stride_gate_col, stride_out_row,
                 HAS_GATE, NORMALIZE, ACC, BLOCK)


@triton.jit
def normalized_grad_scalars(
    grad_ptr, z_ptr, gate_ptr, row, d, eps,
    stride_grad_row, stride_grad_col, stride_z_row, stride_z_col, stride_gate_row, stride_gate_col,
    HAS_GATE: tl.constexpr, HAS_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """(norm, denom, radial) of row ``row`` for :func:`normalized_grad`: the L2 norm of
    s = signed_sqrt(z * gate), denom = max(norm, eps) and radial = <grad, s / denom> (0
    without HAS_GRAD, grad_ptr then unread), in one pass over the row in BLOCK steps: the
    first pass of the epilogue's backward, and without the gradient of its forward."""
    scale = tl.zeros((BLOCK,), dtype=ACC)
    sum_sq = tl.zeros((BLOCK,), dtype=ACC)
    dot = tl.zeros((BLOCK,), dtype=ACC)
    for start in range(0, d, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < d
        z, gate = _gated(z_ptr, gate_ptr, row, cols, mask, stride_z_row, stride_z_col,
                         stride_gate_row, stride_gate_col, HAS_GATE, ACC)
        s, _ = signed_root(z * gate, eps)
        scale, sum_sq = accumulate_norm(scale, sum_sq, s)
        if HAS_GRAD:
            g = tl.load(grad_ptr + row * stride_grad_row + cols * stride_grad_col, mask=mask, other=0.0).to(ACC)
            dot += g * s
    norm = finish_norm(scale, sum_sq)
    denom = tl.where(norm < eps, eps, norm)  # not tl.maximum, which drops a NaN norm
    # <grad, out> with out = s / denom.
    return norm, denom, tl.sum(dot, axis=0) / denom


@dot_flops(no_dots)
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
        norm, denom, radial = normalized_grad_scalars(
            grad_ptr, z_ptr, gate_ptr, row, d, eps, stride_grad_row, stride_grad_col,
            stride_z_row, stride_z_col, stride_gate_row, stride_gate_col, HAS_GATE, True, ACC, BLOCK)
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
        HAS_GATE=gate is not None, NORMALIZE=normalize, ACC=tl_compute_dtype(z.dtype), BLOCK=_EPILOGUE_BLOCK,
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
        HAS_GATE=gate is not None, NORMALIZE=normalize, ACC=tl_compute_dtype(z.dtype), BLOCK=_EPILOGUE_BLOCK,
    )
    return grad_z, grad_gate
