"""Argument checks shared by the public functions. Every message names the argument."""

from __future__ import annotations

from typing import Sequence

import torch

from ._dispatch import device_type
from ._tensor_cache import TensorCache

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


# What the value checks read, once per version of each hash/sign tensor (TensorCache): a
# module's buffers, or a caller's tensors passed on every step, are read on the first call and
# not again until written to, so later calls make no host sync (on CUDA each read is a
# device-to-host sync). The caches apply on every device: one behaviour to reason about and
# test, and on the CPU they still save a pass over the tensor. They hold facts independent of
# the call (a hash's range, not whether it fits one out_dim), so each call still compares them
# with its own arguments, and a bad value raises on every call that sees it.
_HASH_RANGES: TensorCache[tuple[int, int]] = TensorCache()
_SIGNS_UNIT: TensorCache[bool] = TensorCache()


def _hash_range(hash: torch.Tensor) -> tuple[int, int]:
    low, high = torch.aminmax(hash)
    return low.item(), high.item()


def _reads_values(t: torch.Tensor) -> bool:
    # Value checks read tensor data (a host sync and, under torch.compile, a graph break);
    # while compiling they are skipped, and so they are on the meta device, which holds no
    # data (unless they stand for another device's). The shape/dtype/device checks still run.
    return not torch.compiler.is_compiling() and device_type(t) != "meta"


def check_tensor(name: str, t, *, min_ndim: int = 1, batched: bool = False) -> torch.Tensor:
    """A floating tensor of at least ``min_ndim`` dimensions, none of them empty; with
    ``batched`` the dimensions before the last are batch dimensions, which may be empty (the
    result is then empty too, as with torch ops), and only the last (feature) one may not."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    if batched and t.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last (feature) dimension, got shape {tuple(t.shape)}")
    if not batched and t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    return t


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dtype: bool = True) -> None:
    """``t`` must live on ``ref``'s device (and, if ``dtype``, share its dtype)."""
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must share a device")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def check_modalities(name: str, xs, *, minimum: int = 2) -> list[torch.Tensor]:
    if isinstance(xs, torch.Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, one per modality, got {type(xs).__name__}")
    if len(xs) < minimum:
        raise ValueError(f"{name} must hold at least {minimum} modalities, got {len(xs)}")
    return list(xs)


def check_same_count(name: str, items, ref_name: str, count: int) -> list:
    if isinstance(items, torch.Tensor) or not isinstance(items, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple with one entry per modality, got {type(items).__name__}")
    if len(items) != count:
        raise ValueError(f"{name} has {len(items)} entries but {ref_name} has {count} modalities")
    return list(items)


def check_hash(name: str, hash, in_dim: int, out_dim: int, ref: torch.Tensor, *, values: bool = True) -> None:
    """``hash`` maps ``in_dim`` inputs to buckets in [0, out_dim); ``values=False`` skips
    reading the values (for buffers already checked). The values are read once per version
    of ``hash`` (``_HASH_RANGES``)."""
    if not isinstance(hash, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(hash).__name__}")
    if hash.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {hash.dtype}")
    check_shape(name, hash, (in_dim,))
    check_like(name, hash, "the input", ref, dtype=False)
    if values and _reads_values(hash):
        low, high = _HASH_RANGES.get((hash,), lambda: _hash_range(hash))
        if low < 0 or high >= out_dim:
            raise ValueError(f"{name} values must lie in [0, out_dim={out_dim}), got range [{low}, {high}]")


def check_sign(name: str, sign, in_dim: int, ref: torch.Tensor, *, values: bool = True) -> None:
    """``sign`` holds +1 or -1 for each of ``in_dim`` inputs, in any integer or float dtype."""
    if not isinstance(sign, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(sign).__name__}")
    if sign.dtype == torch.bool or sign.is_complex():
        raise TypeError(f"{name} must be an integer or floating tensor of +1/-1, got {sign.dtype}")
    check_shape(name, sign, (in_dim,))
    check_like(name, sign, "the input", ref, dtype=False)
    if values and _reads_values(sign) and not _SIGNS_UNIT.get((sign,), lambda: bool((sign.abs() == 1).all())):
        raise ValueError(f"{name} values must all be +1 or -1")


def check_eps(name: str, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{name} must be a positive number, got {eps!r}")
    return float(eps)


def check_modality_tensors(name: str, xs, *, min_ndim: int = 1) -> list[torch.Tensor]:
    """A list of >= 2 floating tensors (..., n_m) sharing device, dtype and leading shape
    (batch dimensions, which may be empty)."""
    xs = check_modalities(name, xs)
    for m, x in enumerate(xs):
        check_tensor(f"{name}[{m}]", x, min_ndim=min_ndim, batched=True)
        if m:
            check_like(f"{name}[{m}]", x, f"{name}[0]", xs[0])
            if x.shape[:-1] != xs[0].shape[:-1]:
                raise ValueError(
                    f"{name}[{m}] has leading shape {tuple(x.shape[:-1])} but {name}[0] has "
                    f"{tuple(xs[0].shape[:-1])}; all modalities must share every dimension but the last"
                )
    return xs
