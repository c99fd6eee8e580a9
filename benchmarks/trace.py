"""Trace what one benchmark case does on a GPU, on a machine without one.

    case, grad_out = meta_case(kernel, sizes, dtype)
    trace_call(provider_fns(case, provider)[variant], case, mode, grad_out) -> Trace

The case's tensors are meta tensors (no data, any size), and they stand for CUDA tensors
(:func:`fastfusion._dispatch.meta_stands_for`): backends resolve as on CUDA, so "fastfusion"
runs the Triton backend's Python code, and value checks run. A TorchDispatchMode records
every aten op with the tensors it reads and writes; the ``fastfusion::`` custom ops, whose
fake kernels would only give shapes on meta, are expanded into their real implementation,
so the ops and launches inside them are recorded too; every Triton launch is intercepted
at ``kernel[grid]`` and recorded with its real arguments, the autotune configs it could
pick and the grid of each, and not run. Reads of tensor values (``.item()``, ``bool()``)
are recorded as host syncs and answered with a value that passes the checks (meta tensors
hold none). An aten op that takes a CPU tensor while the case's tensors are on the device
is recorded as a host-to-device copy.

Memory: every storage an op creates is followed until freed (weakref finalizers), giving
the peak bytes held during the call beyond what existed before it, as
``torch.cuda.max_memory_allocated`` would count them (without the caching allocator's
rounding), and the bytes of what the call returns.

The call is made twice and the second traced: the first builds what is cached across calls
(inverse tables of the hashes, value checks of unchanged buffers), as in a training loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import weakref
from typing import Any, Callable, Iterator

import torch
import triton
from torch._library.custom_ops import OPDEFS
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import KernelInterface

import fastfusion.triton_backend  # noqa: F401  (registers the Triton kernels for CUDA)
from fastfusion import _dispatch
from fastfusion.flops import fft_flops

from . import ops

aten = torch.ops.aten

# Ops that create no data and launch nothing: views and uninitialised allocations.
_ALLOCATIONS = {aten.empty, aten.empty_like, aten.new_empty, aten.empty_strided, aten.new_empty_strided}
# Ops whose tensor arguments give only a shape, dtype or device: nothing of them is read.
_FACTORIES = _ALLOCATIONS | {
    aten.zeros_like, aten.ones_like, aten.full_like, aten.new_zeros, aten.new_ones, aten.new_full, aten.rand_like,
    aten.randn_like,
}
# In-place ops that overwrite their first argument without reading it.
_OVERWRITES = {aten.copy_, aten.fill_, aten.zero_}


@dataclasses.dataclass(frozen=True)
class Buffer:
    """A tensor argument, as the cost model sees it: the region of one storage it spans."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    storage_offset: int
    storage: int  # identifies the storage within one trace
    nbytes: int  # the bytes one pass over it moves (_moved_bytes)
    # The values, for small tensors copied from the host (tables of sizes a kernel reads).
    values: tuple | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)



def _fft_length(func, args, kwargs, x: torch.Tensor, out: torch.Tensor) -> tuple[int, int]:
    """(transforms, points each) of an FFT op: the fft_* family (self, n, dim, norm) or the
    _fft_* primitives (self, dim list, ...), whose length is the real side's."""
    name = func.overloadpacket.__name__
    if name.startswith("fft_"):
        dim = kwargs.get("dim", args[2] if len(args) > 2 else -1)
        real_side = out if name == "fft_irfft" else x
        length = real_side.shape[dim]
        return x.numel() // x.shape[dim], length
    dims = args[1]
    real_side = out if name == "_fft_c2r" else x
    length = math.prod(real_side.shape[d] for d in dims)
    return x.numel() // math.prod(x.shape[d] for d in dims), length


_FFTS = {aten.fft_rfft, aten.fft_irfft, aten.fft_fft, aten.fft_ifft, aten._fft_r2c, aten._fft_c2r, aten._fft_c2c}


def _flops(func, args, kwargs, out) -> tuple[str | None, int]:
    """(kind, FLOPs) of an aten op by fastfusion.flops' convention: "contraction" (2 per
    multiply-add), "fft" (2.5 N log2 N per real transform, 5 N log2 N per complex one);
    pointwise work counts none (kind None)."""
    packet = func.overloadpacket
    if packet in flop_registry:
        return "contraction", int(flop_registry[packet](*args, **kwargs, out_val=out))
    if packet in (aten.matmul, aten.linear):  # composites the mode sees whole: out = a @ b^(T)
        return "contraction", 2 * out.numel() * args[0].shape[-1]
    if packet in _FFTS:
        transforms, length = _fft_length(func, args, kwargs, args[0], out)
        complex_data = args[0].is_complex() and out.is_complex()
        return "fft", fft_flops(transforms, length, complex_input=complex_data)
    return None, 0


@dataclasses.dataclass
class AtenCall:
    op: torch._ops.OpOverload
    reads: list[Buffer]
    writes: list[Buffer]  # outputs, and inputs the op mutates
    kind: str | None = None  # "contraction", "fft" or None (see _flops)
    flops: int = 0

    @property
    def name(self) -> str:
        return str(self.op.overloadpacket)

    @property
    def launches(self) -> bool:
        # By what the op did, not by its schema: reshape, contiguous and to are alias-annotated
        # but copy when they must. detach_ and kin change metadata in place.
        if self.op.overloadpacket in _ALLOCATIONS or torch.Tag.inplace_view in self.op.tags:
            return False
        return not self.aliases_only

    @property
    def aliases_only(self) -> bool:
        """Whether the op returned views of its inputs and wrote nothing (views, x.to(x.dtype),
        reshape of a contiguous tensor): it moves nothing."""
        read = {b.storage for b in self.reads}
        return not self.op._schema.is_mutable and bool(self.writes) and all(b.storage in read for b in self.writes)


@dataclasses.dataclass
class TritonLaunch:
    kernel: str  # "<module>.<function>", e.g. "low_rank_fusion._forward_kernel"
    fn: Any  # the triton.JITFunction, for compiling it
    args: dict[str, Any]  # every argument by name: Buffer for tensors, else its value
    configs: list[triton.Config | None]  # what autotuning chooses among (pruned); [None]: not autotuned
    grids: list[tuple[int, ...]]  # the grid of each config
    all_configs: list[triton.Config | None]  # the autotuner's whole list, before its prune function
    autotune_key: tuple | None  # the values of the autotuner's key arguments; None: not autotuned


@dataclasses.dataclass
class HostSync:
    op: str


@dataclasses.dataclass
class HostCopy:
    nbytes: int


Event = AtenCall | TritonLaunch | HostSync | HostCopy


@dataclasses.dataclass
class Trace:
    events: list[Event]
    peak_bytes: int  # most bytes held during the call in storages it created
    returned_bytes: int  # of those, the bytes of the storages it returns
    returned: frozenset[int]  # the names of the storages it returns

    @property
    def extra_bytes(self) -> int:
        return max(0, self.peak_bytes - self.returned_bytes)


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _moved_bytes(t: torch.Tensor) -> int:
    """The bytes a pass over ``t`` moves: its elements' bytes when some dimension is unit-stride
    (whole 32-byte sectors are used), else up to a 32-byte sector per element; never more
    than the span of storage it covers."""
    if t.numel() == 0:
        return 0
    size = t.element_size()
    strides = [s for n, s in zip(t.shape, t.stride()) if n > 1]
    span = (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * size
    inner = min(strides, default=1)
    return min(span, t.numel() * (size if inner <= 1 else min(32, inner * size)))


# The values of small device tensors copied from the host while a Recorder was active, by the
# id of their storage while it lives: tables that kernels read (modality sizes) and that the
# library may cache across calls, and so across traces.
_HOST_VALUES: dict[int, tuple] = {}


def _remember_values(device_tensor: torch.Tensor, host: torch.Tensor) -> None:
    storage = device_tensor.untyped_storage()
    if id(storage) not in _HOST_VALUES:
        weakref.finalize(storage, _HOST_VALUES.pop, id(storage), None)
    _HOST_VALUES[id(storage)] = tuple(host.flatten().tolist())


class _Storages:
    """Names every storage a trace meets (ids of freed storages are reused, names never), and
    counts the bytes held by those created while ``tracking``, and their peak."""

    def __init__(self):
        self.names: dict[int, int] = {}  # id of a live storage -> its name
        self.count = 0
        self.created: set[int] = set()  # names of the live storages created while tracking
        self.live = self.peak = 0
        self.tracking = False

    def name(self, t: torch.Tensor, *, new: bool = False) -> int:
        storage = t.untyped_storage()
        key = id(storage)
        if key not in self.names:
            name = self.names[key] = self.count
            self.count += 1
            nbytes = storage.nbytes() if new and self.tracking else 0
            if nbytes:
                self.created.add(name)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, name, nbytes)
        return self.names[key]

    def _freed(self, key: int, name: int, nbytes: int) -> None:
        del self.names[key]
        self.created.discard(name)
        self.live -= nbytes

    def buffer(self, t: torch.Tensor) -> Buffer:
        name = self.name(t)
        return Buffer(tuple(t.shape), tuple(t.stride()), t.dtype, t.storage_offset(), name,
                      _moved_bytes(t), _HOST_VALUES.get(id(t.untyped_storage())))


class _HostTensors(TorchFunctionMode):
    """``torch.tensor(data, device=...)`` and kin made on the host, then copied: dispatch modes
    do not see them build a device tensor from host data, but the recorder below sees the
    copy from a CPU tensor, and so records it and the values."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        from_host = func in (torch.tensor, torch.as_tensor, torch.asarray)
        if from_host and device is not None and torch.device(device).type != "cpu":
            return func(*args, **(kwargs | {"device": "cpu"})).to(device)
        return func(*args, **kwargs)


class Recorder(TorchDispatchMode):
    """Records into ``events`` while ``recording`` (see :func:`recording`)."""

    def __init__(self):
        super().__init__()
        self.events: list[Event] = []
        self.storages = _Storages()
        self.recording = True

    def record(self, event: Event) -> None:
        if self.recording:
            self.events.append(event)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastfusion":
            # On meta a custom op runs its fake kernel; run its implementation instead (torch
            # function modes are off inside dispatch: re-enter ours).
            with self, _HostTensors():
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        if func is aten._local_scalar_dense.default:
            self.record(HostSync(func.name()))
            return True if args[0].dtype == torch.bool else 0
        inputs = _tensors((args, kwargs))
        host = [t for t in inputs if t.device.type == "cpu"]
        out = func(*args, **kwargs)
        outputs = _tensors(out)
        for t in outputs:
            self.storages.name(t, new=True)
        if host and any(t.device.type != "cpu" for t in outputs):
            self.record(HostCopy(sum(t.nbytes for t in host)))
            if len(host) == 1 and len(outputs) == 1 and host[0].numel() <= 1024:
                _remember_values(outputs[0], host[0])
        mutated = [
            a for a, arg in zip(args, func._schema.arguments)
            if isinstance(a, torch.Tensor) and arg.alias_info is not None and arg.alias_info.is_write
        ]
        reads = [] if func.overloadpacket in _FACTORIES else inputs
        if func.overloadpacket in _OVERWRITES:
            reads = reads[1:]
        buffer = self.storages.buffer
        self.record(AtenCall(func, [buffer(t) for t in reads], [buffer(t) for t in outputs + mutated],
                             *_flops(func, args, kwargs, out)))
        return out


def _kernel_name(fn) -> str:
    return f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.fn.__name__}"


@contextlib.contextmanager
def _intercepted_launches(recorder: Recorder) -> Iterator[None]:
    """``kernel[grid](...)`` records a TritonLaunch instead of compiling and running."""

    def getitem(self, grid):
        def launch(*args, **kwargs):
            jit = self.fn if isinstance(self, Autotuner) else self
            named = dict(zip(jit.arg_names, args)) | kwargs
            configs: list[triton.Config | None] = [None]
            all_configs = configs
            key = None
            if isinstance(self, Autotuner):
                configs = all_configs = self.configs
                key = tuple(named[name] for name in self.keys)
                if self.early_config_prune:
                    configs = self.early_config_prune(configs, dict(zip(jit.arg_names, args)), **kwargs)
            grids = []
            for config in configs:
                meta = named | (config.all_kwargs() if config else {})
                g = grid(meta) if callable(grid) else grid
                grids.append(tuple(g) + (1,) * (3 - len(g)))
            recorder.record(TritonLaunch(
                _kernel_name(jit), jit,
                {k: recorder.storages.buffer(v) if isinstance(v, torch.Tensor) else v for k, v in named.items()},
                list(configs), grids, list(all_configs), key,
            ))

        return launch

    original = KernelInterface.__getitem__
    KernelInterface.__getitem__ = getitem
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


PROVIDERS = ("eager", "compile", "fastfusion")


def provider_fns(case: ops.Case, provider: str) -> dict[str, Callable]:
    """What a provider runs, by variant. "compile" traces the reference as eager runs it (the
    cost model fuses it); "fastfusion" is the Triton backend, which "auto" picks on CUDA."""
    if provider in ("eager", "compile"):
        return ops.eager_fns(case)
    if provider == "fastfusion":
        return {"triton": case.bind(functools.partial(case.fused, backend="triton"))}
    raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


@contextlib.contextmanager
def recording() -> Iterator[Recorder]:
    """Context manager: calls inside, on meta tensors, run as on CUDA (module docstring) and
    what they would do there is recorded in the recorder's ``events``."""
    recorder = Recorder()
    with _dispatch.meta_stands_for("cuda"), _intercepted_launches(recorder), _HostTensors(), recorder:
        yield recorder


def trace_call(fn: Callable, case: ops.Case, mode: str, grad_out: torch.Tensor) -> Trace:
    """Trace the second of two calls of ``ops.runner(case, fn, mode, grad_out)``."""
    run = ops.runner(case, fn, mode, grad_out)
    with recording() as recorder:
        storages = recorder.storages
        recorder.recording = False
        run()
        recorder.recording = storages.tracking = True
        results = run()
        recorder.recording = storages.tracking = False
    returned = {storages.name(t): t.untyped_storage().nbytes() for t in results}
    return Trace(
        recorder.events, storages.peak,
        sum(n for name, n in returned.items() if name in storages.created), frozenset(returned),
    )


def meta_case(kernel: str, sizes: dict, dtype: torch.dtype) -> tuple[ops.Case, torch.Tensor]:
    """The benchmark case on meta tensors, and an output gradient for its backward."""
    case = ops.make_case(kernel, sizes, dtype, torch.device("meta"))
    with torch.no_grad():
        out = case.bind(case.reference)(*case.args)
    return case, torch.empty_like(out)
