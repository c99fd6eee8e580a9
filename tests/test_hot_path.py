"""What a repeated call costs the host on CUDA, checked on this machine with meta tensors that
stand for CUDA tensors: ``benchmarks.trace.recording`` runs the Triton backend's real Python
code on them ("auto" picks "triton", the value checks run), records every Triton launch
instead of running it, and records what would stall or copy on CUDA:

- host syncs: reads of a tensor value to the host (``.item()``, ``bool()`` of a tensor),
  answered there since meta tensors hold no data;
- host-to-device copies: a host (CPU) tensor given to an op that makes a device tensor,
  ``torch.tensor(data, device=...)`` and its kin included.

The second call of every public function, forward and backward, must make neither.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton backend needs the triton package")
pytest.importorskip("fvcore")  # benchmarks.trace counts FLOPs with fastfusion.flops

import fastfusion as ff  # noqa: E402
from fastfusion import _dispatch, _tensor_cache  # noqa: E402

if "triton" not in _dispatch.available_backends("cuda"):
    pytest.skip("the triton backend is not registered (needs CUDA or TRITON_INTERPRET=1)", allow_module_level=True)

from benchmarks import trace  # noqa: E402
from fastfusion.triton_backend import _common  # noqa: E402

META = "meta"
D = 8  # sketch length


def _leaf(*shape):
    return torch.randn(shape, device=META, requires_grad=True)


def _sketch_args(*dims):
    # The values are never read (they are meta); the checks get 0 for the hash range, True
    # for the signs.
    return [torch.zeros(n, dtype=torch.int64, device=META) for n in dims], [torch.ones(n, device=META) for n in dims]


def _count_sketch(batch):
    (h,), (s,) = _sketch_args(5)
    x = _leaf(batch, 5)
    return lambda: ff.count_sketch(x, h, s, D), [x]


def _compact_bilinear(batch):
    hashes, signs = _sketch_args(5, 4)
    xs, gate = [_leaf(batch, 3, 5), _leaf(batch, 3, 4)], _leaf(batch, D)
    return lambda: ff.compact_bilinear(xs, hashes, signs, D, pool_dim=1, gate=gate), [*xs, gate]


def _tensor_sketch(batch):
    hashes, signs = _sketch_args(5, 4, 3)
    xs = [_leaf(batch, 5), _leaf(batch, 4), _leaf(batch, 3)]
    return lambda: ff.tensor_sketch(xs, hashes, signs, D), xs


def _low_rank_fusion(batch):
    xs = [_leaf(batch, 5), _leaf(batch, 4), _leaf(batch, 3)]
    factors = [_leaf(2, 6, 7), _leaf(2, 5, 7), _leaf(2, 4, 7)]
    weights, bias = _leaf(1, 2), _leaf(1, 7)
    return lambda: ff.low_rank_fusion(xs, factors, weights, bias), [*xs, *factors, weights, bias]


def _tensor_fusion(batch):
    xs, weight, bias = [_leaf(batch, 5), _leaf(batch, 4)], _leaf(7, 30), _leaf(7)
    return lambda: ff.tensor_fusion(xs, weight, bias), [*xs, weight, bias]


def _factorized_bilinear(normalize):
    def case(batch):
        x, y, wx, wy, bx = _leaf(batch, 5), _leaf(batch, 4), _leaf(6, 5), _leaf(6, 4), _leaf(6)
        return lambda: ff.factorized_bilinear(x, y, wx, bx, wy, None, 2, normalize), [x, y, wx, wy, bx]

    return case


CASES = {
    "count_sketch": _count_sketch,
    "compact_bilinear": _compact_bilinear,
    "tensor_sketch": _tensor_sketch,
    "low_rank_fusion": _low_rank_fusion,
    "tensor_fusion": _tensor_fusion,
    "factorized_bilinear": _factorized_bilinear(True),
    "factorized_bilinear unnormalized": _factorized_bilinear(False),
}
READS_VALUES = ("count_sketch", "compact_bilinear", "tensor_sketch")
BUILDS_TABLES = ("low_rank_fusion", "tensor_fusion")


def _step(call, leaves) -> None:
    """One training step's worth of the call: forward and backward."""
    out = call()
    torch.autograd.grad(out, leaves, torch.ones_like(out))


class _Probe:
    """What one step recorded, by kind."""

    def __init__(self, events):
        self.syncs = [e for e in events if isinstance(e, trace.HostSync)]
        self.copies = [e for e in events if isinstance(e, trace.HostCopy)]
        self.launches = [e for e in events if isinstance(e, trace.TritonLaunch)]


def _probe(call, leaves) -> _Probe:
    with trace.recording() as recorder:
        _step(call, leaves)
    return _Probe(recorder.events)


def test_the_probe_sees_syncs_and_copies():
    x = torch.ones(3, device=META)
    with trace.recording() as recorder:
        x.sum().item()
        bool((x > 0).all())
        torch.ones(2).to(META)
        torch.tensor([1, 2], device=META)
    probe = _Probe(recorder.events)
    assert len(probe.syncs) == 2
    assert [c.nbytes for c in probe.copies] == [2 * 4, 2 * 8]


@pytest.mark.parametrize("case", CASES)
def test_second_call_makes_no_host_sync_or_copy(case):
    call, leaves = CASES[case](3)
    first = _probe(call, leaves)
    assert first.launches, "the triton backend did not run"
    if case in READS_VALUES:
        assert first.syncs, "the first call checks the values: the probe must see those reads"
    second = _probe(call, leaves)
    assert second.launches, "the triton backend did not run"
    assert second.syncs == [] and second.copies == []


@pytest.mark.parametrize("case", READS_VALUES + BUILDS_TABLES)
def test_without_the_caches_every_call_syncs_or_copies(monkeypatch, case):
    # The control: what the probe sees when nothing is cached, as before the caches existed.
    monkeypatch.setattr(_tensor_cache.TensorCache, "get", lambda self, tensors, compute, extra=None: compute())
    monkeypatch.setattr(_common, "_modality_layout", _common._modality_layout.__wrapped__)
    call, leaves = CASES[case](3)
    _probe(call, leaves)
    second = _probe(call, leaves)
    if case in READS_VALUES:
        assert second.syncs
    else:
        assert len(second.copies) == 2  # the modality table, forward and backward


@pytest.mark.parametrize(
    "case", ["low_rank_fusion", "tensor_fusion", "factorized_bilinear", "factorized_bilinear unnormalized"]
)
def test_autotune_keys_bucket_the_batch(case):
    keys = {}
    for batch in (5, 7, 8, 9):
        launches = _probe(*CASES[case](batch)).launches  # the triton backend's launches, recorded
        keys[batch] = [(x.kernel, x.autotune_key) for x in launches if x.autotune_key is not None]
    assert keys[5], "no autotuned kernel ran"
    assert keys[5] == keys[7] == keys[8], "batches of one power-of-two bucket must share their tunings"
    # Every autotuned kernel keys on the bucket: the next bucket changes every key.
    assert all(k9 != k5 for k9, k5 in zip(keys[9], keys[5]))
