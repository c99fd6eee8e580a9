"""Backend selection and the kernel table that every fastfusion op dispatches through.

A *backend* is a family of kernels ("torch", later "triton", "cpp", "cuda"). Each op
registers, per backend, a forward and a backward kernel and the device types they run on.
The public functions pass the backend name in force, as requested ("auto" included), to the
``fastfusion::`` custom op; the op resolves it when it runs (its fake kernel does the same),
so a graph made by torch.export, torch.jit.trace or torch.compile records the request, not
the pick of the machine it was made on: a program exported where "auto" picked "cpp" runs
on an install without the C++ extension. Two names are not kernel families:

- ``"auto"``: the first backend, in the device's preference order, that has a kernel for
  the op on that device and is usable: a backend with a probe (the C++ extension, built on
  first use) that reports it unavailable is skipped with one warning.
- ``"eager"``: bypass the custom ops entirely and run the plain-PyTorch reference with
  PyTorch's own autograd. It is the baseline the benchmarks compare against, and lets a
  whole model be switched to it for A/B comparisons.

Residuals. The ops whose backward needs intermediates of the forward (projections, spectra)
return them from the forward custom op as a list of *residuals*, which autograd saves. The
public function asks for them when autograd records the call (:func:`wants_residuals`),
never while exporting or tracing, so an exported graph holds no residual outputs whatever
backend runs it. Each backend decides: a kernel registered with ``saves_residuals=True`` takes
``save_residuals`` as its forward's last argument and returns ``(output, residuals)``, and its
backward gets that list as its second argument, empty when the forward did not save (it then
recomputes).
Which residuals, in which shapes, is part of each op's contract, so its fake kernel knows
them. A kernel may save for some calls only: ``saves_residuals`` is then a predicate of the
forward's arguments that looks only at what a fake tensor has (shapes, dtypes) and at the
non-tensor arguments, so that the fake kernel, which asks :func:`residuals_saved` with the
same arguments, agrees with the kernel. Other kernels recompute, as fused GPU kernels
prefer, and never see residuals.

On the meta device every backend that has the op resolves as asked (its fake kernels give the
shapes; nothing runs), and "auto" to "torch". Inside :func:`meta_stands_for` meta tensors
count as another device type instead, for tools that trace what a call would do on a device
this machine lacks (benchmarks.roofline).

Dtypes. A kernel is registered with the dtypes it computes (``dtypes``; None: any). A call in
another dtype runs the "torch" kernels instead (:func:`backend_for`), whatever was asked:
``tl.dot`` has no float64 form, so the Triton fusion kernels take float32 and half inputs and
float64, the oracle's dtype, runs the reference. ``dtypes`` may also be a predicate of the
forward's arguments (shapes, dtypes, non-tensor arguments only, as for ``saves_residuals``), for
a kernel that computes a dtype on some of its paths only. Kernels compute half-precision
inputs in float32 (:func:`compute_dtype`).

Empty batches (an empty leading dimension of the inputs) have nothing to compute: whatever the
backend, they run the "torch" kernels (:func:`backend_for`), whose PyTorch ops give empty
results and zero gradients for the parameters, so no C++ or Triton kernel is ever launched on
an empty grid.

Precedence: the ``backend=`` argument of a call, then the innermost ``fastfusion.backend``
context, then ``fastfusion.set_backend``, then the ``FASTFUSION_BACKEND`` environment
variable (read at import), then ``"auto"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from typing import Callable, Iterator

import torch

BACKEND_NAMES = ("auto", "eager", "torch", "triton", "cpp", "cuda")

# Fastest first; "torch" runs everywhere, so "auto" always resolves.
_AUTO_PREFERENCE = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpp", "torch"),
}
_DEFAULT_PREFERENCE = ("torch",)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for explicitly but has no kernel for this op and device."""


@dataclasses.dataclass(frozen=True)
class Kernel:
    forward: Callable
    backward: Callable
    device_types: frozenset[str] | None  # None: any device
    saves_residuals: bool | Callable[..., bool] = False  # see the module docstring
    dtypes: frozenset[torch.dtype] | Callable[..., bool] | None = None  # None: any; see the module docstring

    def accepts(self, *args) -> bool:
        """Whether this kernel computes a call with the forward arguments ``args``."""
        if self.dtypes is None:
            return True
        if callable(self.dtypes):
            return self.dtypes(*args)
        return _first_tensor(args[0]).dtype in self.dtypes


_KERNELS: dict[str, dict[str, Kernel]] = {}

# Backends whose kernels need something that may be missing at run time (a compiled
# extension): probe() returns None when they can run, else the reason they cannot. It is
# first asked when a call resolves to that backend, so building happens on first use, not at
# import, and it must cache its answer.
_PROBES: dict[str, Callable[[], str | None]] = {}
_FALLBACK_WARNED: set[str] = set()


def register_kernel(
    op: str,
    backend: str,
    *,
    forward: Callable,
    backward: Callable,
    device_types: tuple[str, ...] | None = None,
    saves_residuals: bool | Callable[..., bool] = False,
    dtypes: tuple[torch.dtype, ...] | Callable[..., bool] | None = None,
) -> None:
    """Make ``backend`` provide ``op`` (its forward and backward) on ``device_types`` for inputs
    in ``dtypes``; ``saves_residuals`` and ``dtypes``: see the module docstring."""
    if backend not in BACKEND_NAMES or backend in ("auto", "eager"):
        raise ValueError(f"backend must be one of 'torch', 'triton', 'cpp', 'cuda', got {backend!r}")
    types = None if device_types is None else frozenset(device_types)
    accepted = dtypes if dtypes is None or callable(dtypes) else frozenset(dtypes)
    _KERNELS.setdefault(op, {})[backend] = Kernel(forward, backward, types, saves_residuals, accepted)


def register_probe(backend: str, probe: Callable[[], str | None]) -> None:
    """Make ``backend`` usable only when ``probe()`` returns None (see ``_PROBES``)."""
    _PROBES[backend] = probe


# Resolution runs inside the custom ops and their fake kernels, never in code that dynamo
# traces, so the probe (which may build and load a library) runs as plain Python.
def _unavailable_reason(backend: str) -> str:
    probe = _PROBES.get(backend)
    reason = None if probe is None else probe()
    return "" if reason is None else reason


def _usable_for_auto(backend: str) -> bool:
    """Whether "auto" may pick ``backend``; warns once per backend when it may not."""
    reason = _unavailable_reason(backend)
    if reason and backend not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(backend)
        warnings.warn(
            f"fastfusion: the {backend!r} backend is unavailable ({reason}); using the next backend "
            f"instead. Set FASTFUSION_BACKEND={backend} to make this an error.",
            RuntimeWarning,
            stacklevel=2,
        )
    return not reason


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels compute in: float32 for half-precision inputs (FFTs, norms,
    accumulators), else the inputs' own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _contiguous(result):
    # The ops' fake kernels promise contiguous outputs; hold every backend to that.
    if isinstance(result, torch.Tensor):
        return result.contiguous()
    return [t.contiguous() for t in result]


def runs_reference(name: str) -> bool:
    """Whether a public function runs its plain-PyTorch reference instead of the custom op:
    when ``name`` is "eager", and while ``torch.onnx.export`` traces it, so the ONNX program
    holds the reference's standard operators (ONNX has no fastfusion operators)."""
    return name == "eager" or torch.onnx.is_in_onnx_export()


def _first_tensor(arg) -> torch.Tensor:
    return arg[0] if isinstance(arg, (list, tuple)) else arg


def run_forward(op: str, backend: str, *args):
    """Run the forward kernel of ``op`` that ``backend`` resolves to (called inside the custom
    op); ``args[0]`` is the batch, or the list of modality batches."""
    return _contiguous(_KERNELS[op][backend_for(op, args[0], backend, *args[1:])].forward(*args))


def run_backward(op: str, backend: str, *args):
    """Run ``backend``'s backward kernel of ``op`` (called inside the backward custom op, with
    the concrete backend that its forward ran: :func:`backend_for` in the setup_context)."""
    return _contiguous(_KERNELS[op][backend].backward(*args))


def residuals_saved(op: str, backend: str, save_residuals: bool, *args) -> bool:
    """Whether a forward call with ``save_residuals`` returns residuals (fake kernels ask);
    ``args``: the forward's arguments, which a kernel that saves for some calls only needs."""
    saves = _KERNELS[op][backend_for(op, args[0], backend, *args[1:])].saves_residuals
    return bool(save_residuals and (saves(*args) if callable(saves) else saves))


def run_forward_saving(op: str, backend: str, save_residuals: bool, *args) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(output, residuals)`` of the forward kernel of an op with residuals that ``backend``
    resolves to; residuals is empty unless :func:`residuals_saved`."""
    kernel = _KERNELS[op][backend_for(op, args[0], backend, *args[1:])]
    if not kernel.saves_residuals:
        return _contiguous(kernel.forward(*args)), []
    output, residuals = kernel.forward(*args, save_residuals)
    return _contiguous(output), _contiguous(residuals)


def run_backward_saving(op: str, backend: str, grad: torch.Tensor, residuals: list[torch.Tensor], *args):
    """The backward kernel of an op with residuals, given what its forward saved. ``args`` are
    the forward's arguments, so ``backend`` resolves as the forward's did (:func:`backend_for`:
    the same kernel also when the backward op is called directly with the requested name)."""
    kernel = _KERNELS[op][backend_for(op, args[0], backend, *args[1:])]
    if not kernel.saves_residuals:
        return _contiguous(kernel.backward(grad, *args))
    return _contiguous(kernel.backward(grad, residuals, *args))


def wants_residuals(*tensors: torch.Tensor | None) -> bool:
    """Whether a forward call should ask for residuals: autograd will record it (grad mode on,
    some input requiring grad) and it is not being exported or traced (module docstring)."""
    return (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in tensors)
        and not torch.compiler.is_exporting()
        and not torch.jit.is_tracing()
    )


def _runs_on(k: Kernel, device_type: str) -> bool:
    return k.device_types is None or device_type in k.device_types


def _check_name(name: str, argument: str) -> str:
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"{argument} must be one of {BACKEND_NAMES}, got {name!r}")
    return name


def _env_backend() -> str:
    name = os.environ.get("FASTFUSION_BACKEND", "auto").strip() or "auto"
    return _check_name(name, "the FASTFUSION_BACKEND environment variable")


class _State:
    default = _env_backend()
    stack: list[str] = []
    meta_stands_for: str | None = None


@contextlib.contextmanager
def meta_stands_for(device_type: str) -> Iterator[None]:
    """Context manager: meta tensors count as ``device_type`` tensors (:func:`device_type`), so
    backends resolve, "auto" included, and value checks run as they would there. The caller
    must intercept the reads of values (``aten._local_scalar_dense``), which meta tensors
    cannot give, e.g. with a TorchDispatchMode."""
    previous, _State.meta_stands_for = _State.meta_stands_for, device_type
    try:
        yield
    finally:
        _State.meta_stands_for = previous


def device_type(t: torch.Tensor) -> str:
    """The device type that selects kernels and checks for ``t``: its own, except for meta
    tensors inside :func:`meta_stands_for`."""
    kind = t.device.type
    return _State.meta_stands_for if kind == "meta" and _State.meta_stands_for else kind


def set_backend(name: str) -> None:
    """Select the backend for every later call that does not choose one itself."""
    _State.default = _check_name(name, "name")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager: calls inside use backend ``name`` unless they pass ``backend=``."""
    _State.stack.append(_check_name(name, "name"))
    try:
        yield
    finally:
        _State.stack.pop()


def requested_backend(per_call: str | None = None) -> str:
    """The backend name in force for a call, before "auto" is resolved."""
    if per_call is not None:
        return _check_name(per_call, "backend")
    if _State.stack:
        return _State.stack[-1]
    return _State.default


def resolve_backend(op: str, device_type: str, name: str) -> str:
    """Turn a requested name into the concrete backend that runs ``op`` on ``device_type``."""
    if name == "eager":
        return name
    kernels = _KERNELS[op]
    if device_type == "meta" and name in kernels:
        # Meta tensors hold no data: the custom ops run their fake kernels on them, whatever the
        # backend, so any backend of the op gives the shapes, and nothing is built or launched.
        return name
    if name == "auto":
        for candidate in _AUTO_PREFERENCE.get(device_type, _DEFAULT_PREFERENCE):
            if candidate in kernels and _runs_on(kernels[candidate], device_type) and _usable_for_auto(candidate):
                return candidate
        raise BackendUnavailableError(f"no fastfusion backend implements {op} on {device_type}")
    if name not in kernels or not _runs_on(kernels[name], device_type):
        raise BackendUnavailableError(
            f"fastfusion backend {name!r} does not implement {op} on {device_type} here; "
            f"available: {available_backends(device_type)}"
        )
    reason = _unavailable_reason(name)
    if reason:
        raise BackendUnavailableError(f"fastfusion backend {name!r} was requested but is unavailable: {reason}")
    return name


def backend_for(op: str, first, backend: str, *rest) -> str:
    """The concrete backend that a custom-op call of ``op`` requested as ``backend`` runs with,
    given the forward's arguments ``(first, *rest)``: resolved for the device of the op's first
    batched input (``first``, or its first entry), and "torch" instead when that batch is empty
    or the kernel does not take the call's dtype (module docstring). ``first`` alone suffices
    unless the kernel's ``dtypes`` is a predicate."""
    batch = _first_tensor(first)
    name = resolve_backend(op, device_type(batch), backend)
    if batch.numel() == 0 or not _KERNELS[op][name].accepts(first, *rest):
        return "torch"
    return name


def selected_backend(op: str, device: str | torch.device = "cpu", backend: str | None = None) -> str:
    """The concrete backend that a call of ``op`` on ``device`` runs now, given the call's
    ``backend`` argument, the context, set_backend and FASTFUSION_BACKEND ("eager" if so
    chosen). ``op`` names an op (fastfusion._custom_op.SPECS), e.g. "compact_bilinear", which
    also serves tensor_sketch."""
    if op not in _KERNELS:
        raise ValueError(f"op must be one of {sorted(_KERNELS)}, got {op!r}")
    return resolve_backend(op, torch.device(device).type, requested_backend(backend))


def available_backends(device_type: str | None = None) -> tuple[str, ...]:
    """Concrete backends with at least one kernel (on ``device_type`` if given), fastest first."""
    order = ("triton", "cuda", "cpp", "torch")
    found = {
        name
        for table in _KERNELS.values()
        for name, k in table.items()
        if (device_type is None or _runs_on(k, device_type)) and not _unavailable_reason(name)
    }
    return tuple(name for name in order if name in found)
