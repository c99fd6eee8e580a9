"""Values derived from tensors, computed once per version of those tensors.

A :class:`TensorCache` entry is keyed by the ids of the tensors it was derived from (and an
extra hashable key), and is valid only while those very tensors are alive and unmodified:

- weakrefs: the death of any of the tensors evicts the entry, so a recycled id() never meets
  a stale value, and the cache keeps no tensor alive;
- ``data_ptr()`` catches ``.data`` swaps and ``set_()``; ``_version`` catches in-place writes
  (through the tensor or any view of it, which share its version counter).

Writes through ``.data`` aliases bypass the version counter and go unseen, as they do for
autograd. Inference tensors (created under ``torch.inference_mode``) have no version counter,
so nothing derived from them is cached: the value is recomputed on every call.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Callable, Generic, Hashable, Sequence, TypeVar

import torch

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class _Entry(Generic[T]):
    refs: tuple[weakref.ref, ...]
    state: tuple[tuple[int, int], ...]
    value: T


class TensorCache(Generic[T]):
    """``get(tensors, compute)`` returns ``compute()``, computed once per version of ``tensors``
    (module docstring). ``compute`` may raise; nothing is cached then."""

    def __init__(self) -> None:
        self._entries: dict[tuple, _Entry[T]] = {}

    def get(self, tensors: Sequence[torch.Tensor], compute: Callable[[], T], extra: Hashable = None) -> T:
        """The cached value for ``tensors`` and ``extra`` (another part of the key, e.g. a size
        the value depends on), computed by ``compute`` when missing or stale."""
        if any(t.is_inference() for t in tensors):
            return compute()
        key = (*map(id, tensors), extra)
        state = tuple((t.data_ptr(), t._version) for t in tensors)
        entry = self._entries.get(key)
        if entry is not None and entry.state == state and all(ref() is t for ref, t in zip(entry.refs, tensors)):
            return entry.value
        value = compute()
        evict = functools.partial(self._evict, key)
        self._entries[key] = _Entry(tuple(weakref.ref(t, evict) for t in tensors), state, value)
        return value

    def _evict(self, key: tuple, ref: weakref.ref) -> None:
        # A replaced entry's refs still call back when their tensors die: only the current
        # entry's own refs may remove it.
        entry = self._entries.get(key)
        if entry is not None and ref in entry.refs:
            del self._entries[key]
