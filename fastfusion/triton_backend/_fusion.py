"""Pieces shared by the Triton fusion kernels (LMF, MFB, TFN).

dtype policy: float32, float16 and bfloat16 run the kernels, which accumulate in float32
and round once when storing. float32 products use IEEE precision unless the user allowed
TF32 for matmuls with ``torch.backends.cuda.matmul.allow_tf32`` (the flag PyTorch's own
matmuls obey). float64 runs the plain-PyTorch reference: ``tl.dot`` has no float64 form on
every GPU generation and Triton release the project supports, and float64 is the oracle's
dtype rather than a speed path.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter's tl.dot is numpy.matmul on the raw storage, and numpy holds bfloat16 as
# uint16, so bfloat16 products come out as garbage there (Triton 3.9).
_WIDEN_BF16_DOT = tl.constexpr(_INTERPRET)

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
