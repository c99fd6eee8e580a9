"""TensorCache: a value derived from tensors is computed once per version of those tensors
(alive, same object, same data_ptr, same _version), and never cached for inference tensors."""

import gc
import weakref

import pytest
import torch

from fastfusion._tensor_cache import TensorCache


class Compute:
    """A compute function that counts its calls and returns a fresh object each time."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return torch.empty(0)  # weakref-able, and identity tells one computation from another


def _in_place(t):
    t[0] = 7


def _through_a_view(t):
    t[1:3].add_(1)  # a view shares its base's version counter


def _data_swap(t):
    t.data = torch.arange(4)  # new storage, so a new data_ptr; the version counter may not move


@pytest.mark.parametrize("write", [_in_place, _through_a_view, _data_swap], ids=lambda f: f.__name__.strip("_"))
def test_reused_while_unchanged_recomputed_after_a_write(write):
    cache, compute, t = TensorCache(), Compute(), torch.arange(4)
    first = cache.get((t,), compute)
    assert cache.get((t,), compute) is first and compute.calls == 1
    write(t)
    second = cache.get((t,), compute)
    assert second is not first and compute.calls == 2
    assert cache.get((t,), compute) is second and compute.calls == 2


def test_the_key_is_every_tensor_and_the_extra_key():
    cache, compute = TensorCache(), Compute()
    a, b = torch.arange(3), torch.arange(3)
    value = cache.get((a, b), compute, 5)
    assert cache.get((a, b), compute, 6) is not value  # another extra key
    assert cache.get((b, a), compute, 5) is not value  # another order: other tensors
    b.neg_()  # the second tensor changed
    assert cache.get((a, b), compute, 5) is not value
    assert compute.calls == 4


def test_an_entry_dies_with_its_tensor():
    cache, t = TensorCache(), torch.arange(3)
    value = weakref.ref(cache.get((t,), Compute()))
    gc.collect()
    assert value() is not None  # held by the cache while t lives
    del t
    gc.collect()
    assert value() is None


def test_inference_tensors_are_never_cached():
    # They have no version counter: an in-place write inside inference mode is invisible.
    cache, compute = TensorCache(), Compute()
    with torch.inference_mode():
        t = torch.arange(3)
    assert cache.get((t,), compute) is not cache.get((t,), compute)
    assert compute.calls == 2


def test_a_failed_computation_caches_nothing():
    cache, t = TensorCache(), torch.arange(3)

    def fail():
        raise ValueError("bad values")

    with pytest.raises(ValueError, match="bad values"):
        cache.get((t,), fail)
    compute = Compute()
    cache.get((t,), compute)
    assert compute.calls == 1
