"""What a repeated call costs the host on CUDA, checked on this machine with meta tensors that
stand for CUDA tensors (``fastfusion._dispatch.meta_stands_for``): backends resolve as on CUDA
("auto" picks "triton") and the value checks run.

:class:`HotPath` runs the Triton backend's real Python code on those meta tensors (the custom
ops would otherwise run their fake kernels), with every Triton launch recorded instead of run,
and counts what would stall or copy on CUDA:

- host syncs: reads of a tensor value to the host (``aten._local_scalar_dense``, behind
  ``.item()``, ``bool()`` and ``int()`` of a tensor), answered here since meta tensors hold no
  data;
- host-to-device copies: a host (CPU) tensor given to any aten op, or ``torch.tensor`` and
  its kin building a device tensor from host data (that copy is invisible to dispatch modes).

The second call of every public function, forward and backward, must make neither.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

triton = pytest.importorskip("triton", reason="the triton backend needs the triton package")

import fastfusion as ff  # noqa: E402
from fastfusion import _dispatch, _tensor_cache  # noqa: E402

META = "meta"
D = 8  # sketch length
_HOST_SYNCS = {"_local_scalar_dense", "item", "is_nonzero"}
_FROM_HOST_DATA = (torch.tensor, torch.as_tensor, torch.asarray)

if "triton" not in _dispatch.available_backends("cuda"):
    pytest.skip("the triton backend is not registered (needs CUDA or TRITON_INTERPRET=1)", allow_module_level=True)

from fastfusion.triton_backend import _fusion  # noqa: E402


class _Copies(TorchFunctionMode):
    """Sees ``torch.tensor(data, device=...)`` and kin, which copy host data to a device."""

    def __init__(self, found: list[str]):
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FROM_HOST_DATA and torch.device(kwargs.get("device") or "cpu").type != "cpu":
            self.found.append(f"{func.__name__}(..., device={kwargs['device']})")
        return func(*args, **kwargs)


class HotPath(TorchDispatchMode):
    """Records host syncs and host-to-device copies (module docstring) while it is active."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self.copies: list[str] = []
        self._functions = _Copies(self.copies)

    @contextlib.contextmanager
    def active(self):
        with self._functions, self:
            yield self

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastfusion":
            # The backend's real implementation, not the fake kernel; inside it this mode (and
            # the function mode, which a custom op call leaves) must see every op.
            with self, self._functions:
                return torch._library.custom_ops.OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in leaves):
            self.copies.append(str(func))
        if func.overloadpacket.__name__ in _HOST_SYNCS:
            self.syncs.append(str(func))
            return True if args[0].dtype == torch.bool else 0
        return func(*args, **kwargs)


@pytest.fixture
def launches(monkeypatch) -> list[tuple]:
    """Every Triton launch, as (kernel, args, kwargs), recorded instead of run."""
    recorded = []

    def launcher(kernel, grid):
        return lambda *args, **kwargs: recorded.append((kernel, args, kwargs))

    monkeypatch.setattr(triton.runtime.jit.KernelInterface, "__getitem__", launcher)
    return recorded


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


def _probe(call, leaves) -> HotPath:
    with _dispatch.meta_stands_for("cuda"), HotPath().active() as probe:
        _step(call, leaves)
    return probe


def test_the_probe_sees_syncs_and_copies():
    x = torch.ones(3, device=META)
    with _dispatch.meta_stands_for("cuda"), HotPath().active() as probe:
        x.sum().item()
        bool((x > 0).all())
        torch.ones(2).to(META)
        torch.tensor([1, 2], device=META)
    assert len(probe.syncs) == 2
    assert probe.copies == ["aten._to_copy.default", "tensor(..., device=meta)"]


@pytest.mark.parametrize("case", CASES)
def test_second_call_makes_no_host_sync_or_copy(launches, case):
    call, leaves = CASES[case](3)
    first = _probe(call, leaves)
    assert launches, "the triton backend did not run"
    if case in READS_VALUES:
        assert first.syncs, "the first call checks the values: the probe must see those reads"
    launches.clear()
    second = _probe(call, leaves)
    assert launches, "the triton backend did not run"
    assert second.syncs == [] and second.copies == []


@pytest.mark.parametrize("case", READS_VALUES + BUILDS_TABLES)
def test_without_the_caches_every_call_syncs_or_copies(launches, monkeypatch, case):
    # The control: what the probe sees when nothing is cached, as before the caches existed.
    monkeypatch.setattr(_tensor_cache.TensorCache, "get", lambda self, tensors, compute, extra=None: compute())
    monkeypatch.setattr(_fusion, "_modality_layout", _fusion._modality_layout.__wrapped__)
    call, leaves = CASES[case](3)
    _probe(call, leaves)
    second = _probe(call, leaves)
    if case in READS_VALUES:
        assert second.syncs
    else:
        assert second.copies == ["tensor(..., device=meta)"] * 2  # forward and backward


def _autotune_keys(launches) -> list[tuple]:
    """The autotuner's key of every autotuned launch (the values of its ``key`` arguments)."""
    keys = []
    for kernel, args, kwargs in launches:
        if isinstance(kernel, triton.runtime.autotuner.Autotuner):
            named = {**dict(zip(kernel.arg_names, args)), **kwargs}
            keys.append((kernel, tuple(named[name] for name in kernel.keys)))
    return keys


@pytest.mark.parametrize(
    "case", ["low_rank_fusion", "tensor_fusion", "factorized_bilinear", "factorized_bilinear unnormalized"]
)
def test_autotune_keys_bucket_the_batch(launches, case):
    keys = {}
    for batch in (5, 7, 8, 9):
        launches.clear()
        _probe(*CASES[case](batch))  # runs the triton backend's launches, recorded
        keys[batch] = _autotune_keys(launches)
    assert keys[5], "no autotuned kernel ran"
    assert keys[5] == keys[7] == keys[8], "batches of one power-of-two bucket must share their tunings"
    # Every autotuned kernel keys on the bucket: the next bucket changes every key.
    assert all(k9 != k5 for k9, k5 in zip(keys[9], keys[5]))
