"""The op contract: one :class:`OpSpec` per op, from which :func:`register` makes its custom ops.

An op of fastfusion is declared once, in its file under ``ops/``, as an :class:`OpSpec`: its
kernel-level arguments (a schema fragment), its "torch" forward and backward kernels (plain
PyTorch), the shapes of its output and of its residuals (fake kernels), which arguments
receive gradients and its autocast policy. :func:`register` turns the declaration into

- ``fastfusion::<op>``: ``(<args>, [bool save_residuals,] str backend) -> Tensor``, or
  ``-> (Tensor, Tensor[])`` (output, residuals) for an op with residuals, and its fake;
- ``fastfusion::<op>_backward``: ``(Tensor grad, [Tensor[] residuals,] <saved args>, str
  backend) -> Tensor`` for an op with one differentiable tensor, else ``-> Tensor[]`` (one
  gradient per differentiable tensor, list arguments flattened), and its fake;
- the autograd of the forward op: its setup_context resolves the requested backend to the
  concrete one the forward ran (:func:`fastfusion._dispatch.backend_for`) and saves what the
  backward needs; its backward calls the backward op and nests the gradients back into the
  arguments' structure (a list argument gets a list);
- a second derivative that raises (:func:`once_differentiable`);
- the "torch" kernels in the dispatch table.

Backends add kernels with :func:`fastfusion._dispatch.register_kernel` under the op's name; the
public function validates and canonicalises its arguments, then calls :func:`call`, which
applies the autocast policy and runs either the custom op or, for ``backend="eager"`` and ONNX
export, the "torch" forward kernel under PyTorch's own autograd.

:data:`SPECS` lists every registered op, in registration order; the C++ backend, the FLOP
formulas and the benchmarks read it instead of keeping their own lists.

Each op file also declares its benchmark cases, after its public function, as
:class:`Benchmark` objects passed to :func:`declare_benchmark`; the harness (``benchmarks/``)
reads them through :func:`benchmarks` and keeps no per-op code.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from types import MappingProxyType
from typing import Callable, Mapping

import torch

from . import _dispatch

# Autocast policies: "float32" computes in float32 whatever the autocast dtype (FFTs, as
# torch.fft's own policy), "lower" in the autocast dtype (matmul-like ops), None ignores
# autocast (the op runs in its inputs' dtype).
AUTOCAST_POLICIES = ("float32", "lower", None)


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """The declaration of one op.

    ``args``: the kernel-level arguments as a schema fragment, e.g. ``"Tensor z, float eps"``
    (``Tensor[]`` for lists of modalities, ``Tensor?`` for optional tensors, ``SymInt`` for
    sizes); the custom op appends ``bool save_residuals`` (ops with residuals) and ``str backend``.
    ``forward(*args)``: the "torch" kernel, plain PyTorch and differentiable by autograd (it is
    also the eager reference); ``backward(grad, *saved)``: its vector-Jacobian product, one
    gradient per differentiable tensor in ``differentiable``'s order (a list per list argument,
    flattened), or the gradient itself when there is one.
    ``fake(*args)``: an empty output of the right shape, dtype and device.
    ``residuals(*args)``: empty residuals in the shapes a saving kernel returns; None for an op
    without residuals (its schema has no ``save_residuals``; the backward gets no residuals).
    ``differentiable``: the names of the arguments that receive gradients.
    ``saved``: the arguments the backward takes after ``grad`` (and the residuals); all of them
    when None. ``backward_fake(grad, *saved)``: the backward's output shapes, when they do not
    follow from the saved differentiable arguments.
    ``none_grads``: for optional differentiable arguments whose kernels return a gradient even
    when the argument is None, its shape as a function of the arguments (a dict of them by
    name); the gradient is dropped. Other optional arguments passed as None get no entry.
    ``autocast``: one of :data:`AUTOCAST_POLICIES`; under it the differentiable arguments are
    cast before the call (the public function casts others that must match, such as a mask,
    to :func:`cast_dtype` itself).
    ``flops``, ``backward_flops``: the FLOPs of a forward and a backward call by kind, from the
    arguments by schema name with tensors as shapes (the convention of :mod:`fastfusion.flops`,
    which counts the ops with them).
    ``cpp_kernels``: whether csrc/cpu has the op's C++ kernels (an op may start with the
    "torch" kernels alone); ``cpp_saves_residuals``: whether they return residuals.
    """

    name: str
    args: str
    forward: Callable
    backward: Callable
    fake: Callable
    differentiable: tuple[str, ...]
    flops: Callable[[dict], Counter]
    backward_flops: Callable[[dict], Counter]
    residuals: Callable | None = None
    saved: tuple[str, ...] | None = None
    backward_fake: Callable | None = None
    none_grads: Mapping[str, Callable[[dict], tuple]] = dataclasses.field(default_factory=dict)
    autocast: str | None = None
    cpp_kernels: bool = True
    cpp_saves_residuals: bool = False

    @property
    def has_residuals(self) -> bool:
        return self.residuals is not None

    @property
    def arg_types(self) -> tuple[str, ...]:
        return tuple(a.strip().rsplit(" ", 1)[0] for a in self.args.split(","))

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.strip().rsplit(" ", 1)[1] for a in self.args.split(","))

    @property
    def saved_names(self) -> tuple[str, ...]:
        return self.arg_names if self.saved is None else self.saved


SPECS: dict[str, OpSpec] = {}
_FORWARD_OPS: dict[str, Callable] = {}  # the fastfusion::<op> custom op of each spec


def _single_gradient(spec: OpSpec) -> bool:
    """Whether the backward returns one tensor (one differentiable non-list argument)."""
    types = dict(zip(spec.arg_names, spec.arg_types))
    return len(spec.differentiable) == 1 and types[spec.differentiable[0]] == "Tensor"


def _pack(values) -> tuple[list[torch.Tensor], list]:
    """Tensors of ``values`` (list entries flattened) and a layout to rebuild ``values`` from them."""
    tensors, layout = [], []
    for v in values:
        if isinstance(v, (list, tuple)):
            tensors.extend(v)
            layout.append(("list", len(v)))
        elif isinstance(v, torch.Tensor):
            tensors.append(v)
            layout.append(("tensor", None))
        else:
            layout.append(("value", v))  # None or a non-tensor argument
    return tensors, layout


def _unpack(layout, tensors) -> list:
    it, values = iter(tensors), []
    for kind, v in layout:
        if kind == "list":
            values.append([next(it) for _ in range(v)])
        elif kind == "tensor":
            values.append(next(it))
        else:
            values.append(v)
    return values


def _default_backward_fake(spec: OpSpec) -> Callable:
    index = {name: i for i, name in enumerate(spec.saved_names)}
    missing = [n for n in spec.differentiable if n not in index]
    if missing:
        raise ValueError(f"{spec.name}: backward_fake is needed, {missing} are not among the saved arguments")

    def fake(grad, *saved):
        named = dict(zip(spec.saved_names, saved))
        grads = []
        for name in spec.differentiable:
            value = named[name]
            if isinstance(value, (list, tuple)):
                grads.extend(t.new_empty(t.shape) for t in value)
            elif value is not None:
                grads.append(value.new_empty(value.shape))
            elif name in spec.none_grads:
                grads.append(grad.new_empty(spec.none_grads[name](named)))
        return grads[0] if _single_gradient(spec) else grads

    return fake


def register(spec: OpSpec) -> OpSpec:
    """Register ``spec``'s custom ops, autograd and "torch" kernels (module docstring)."""
    if spec.name in SPECS:
        raise ValueError(f"op {spec.name!r} is registered already")
    if spec.autocast not in AUTOCAST_POLICIES:
        raise ValueError(f"autocast must be one of {AUTOCAST_POLICIES}, got {spec.autocast!r}")
    names = spec.arg_names
    num_args = len(names)
    single = _single_gradient(spec)
    saved_index = [names.index(n) for n in spec.saved_names]
    residual_arg = "bool save_residuals, " if spec.has_residuals else ""
    output = "(Tensor, Tensor[])" if spec.has_residuals else "Tensor"
    saved_args = ", ".join(f"{spec.arg_types[i]} {names[i]}" for i in saved_index)
    residual_input = "Tensor[] residuals, " if spec.has_residuals else ""

    def forward_impl(*inputs):
        if spec.has_residuals:
            *args, save, backend = inputs
            return _dispatch.run_forward_saving(spec.name, backend, save, *args)
        *args, backend = inputs
        return _dispatch.run_forward(spec.name, backend, *args)

    def forward_fake(*inputs):
        out = spec.fake(*inputs[:num_args])
        if not spec.has_residuals:
            return out
        *args, save, backend = inputs
        return out, (spec.residuals(*args) if _dispatch.residuals_saved(spec.name, backend, save, *args) else [])

    def backward_impl(grad, *inputs):
        *args, backend = inputs
        if spec.has_residuals:
            residuals, *args = args
            return _dispatch.run_backward_saving(spec.name, backend, grad, residuals, *args)
        return _dispatch.run_backward(spec.name, backend, grad, *args)

    grads_fake = spec.backward_fake or _default_backward_fake(spec)

    def backward_fake(grad, *inputs):
        saved = inputs[1:-1] if spec.has_residuals else inputs[:-1]
        return grads_fake(grad, *saved)

    op = torch.library.custom_op(
        f"fastfusion::{spec.name}", forward_impl, mutates_args=(),
        schema=f"({spec.args}, {residual_arg}str backend) -> {output}",
    )
    op.register_fake(forward_fake)
    backward_op = torch.library.custom_op(
        f"fastfusion::{spec.name}_backward", backward_impl, mutates_args=(),
        schema=f"(Tensor grad, {residual_input}{saved_args}, str backend) -> {'Tensor' if single else 'Tensor[]'}",
    )
    backward_op.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        args, backend = inputs[:num_args], inputs[-1]
        ctx.backend = _dispatch.backend_for(spec.name, args[0], backend, *args[1:])  # what the forward ran
        residuals = list(output[1]) if spec.has_residuals else []
        if spec.has_residuals:
            mark_residuals(ctx, residuals)
        # Per argument: its list length, or whether it was None (which gradients exist).
        ctx.structure = tuple(len(a) if isinstance(a, (list, tuple)) else a is None for a in args)
        tensors, ctx.layout = _pack([args[i] for i in saved_index])
        ctx.num_saved = len(tensors)
        ctx.save_for_backward(*tensors, *residuals)

    trailing = (None,) * (2 if spec.has_residuals else 1)  # save_residuals, backend: no gradients

    def backward(ctx, grad, *_grad_residuals):
        if grad is None:  # the output's gradient is undefined: so are the inputs'
            return (*(None if isinstance(s, bool) else [None] * s for s in ctx.structure), *trailing)
        saved = ctx.saved_tensors
        args = _unpack(ctx.layout, saved[: ctx.num_saved])
        residual_list = [list(saved[ctx.num_saved :])] if spec.has_residuals else []
        result = backward_op(grad.contiguous(), *residual_list, *args, ctx.backend)
        flat = iter([result] if single else result)
        grads = []
        for name, s in zip(names, ctx.structure):
            if name not in spec.differentiable:
                grads.append(None if isinstance(s, bool) else [None] * s)
            elif not isinstance(s, bool):
                grads.append([next(flat) for _ in range(s)])
            elif s:  # passed as None: its kernels may still return a gradient, then dropped
                if name in spec.none_grads:
                    next(flat)
                grads.append(None)
            else:
                grads.append(next(flat))
        return (*grads, *trailing)

    op.register_autograd(backward, setup_context=setup_context)
    once_differentiable(spec.name, backward_op)
    _dispatch.register_kernel(spec.name, "torch", forward=spec.forward, backward=spec.backward)
    SPECS[spec.name] = spec
    _FORWARD_OPS[spec.name] = op
    return spec


def mark_residuals(ctx, residuals) -> None:
    """In a setup_context: the forward's residual outputs feed only the backward. They are
    not differentiable, and autograd must not zero-fill gradients for them, so the backward
    receives None for them, and for the output too when its gradient is undefined."""
    ctx.mark_non_differentiable(*residuals)
    ctx.set_materialize_grads(False)


def once_differentiable(op: str, backward_op) -> None:
    """Make a double backward through ``backward_op`` (the backward custom op of ``op``) raise one
    clear error: the fused backward kernels have no derivatives of their own. Without this,
    torch reports a missing autograd formula of an internal op. First-order gradients, with
    ``create_graph=True`` too, are unaffected."""
    def _second_derivative(ctx, *grads):
        raise RuntimeError(
            f"{op} is once differentiable: its fused backward has no derivative. For double backward "
            f"(gradgradcheck, gradient penalties) run it with backend='eager', the plain-PyTorch reference."
        )

    backward_op.register_autograd(_second_derivative)


# Looked up, not asked, in code that torch.compile traces: dynamo before torch 2.13 cannot
# trace torch._C._is_autocast_available and fails fullgraph compiles of every op that asks.
# The device types fastfusion runs on (meta: shapes only) are known at import.
_AUTOCAST_AVAILABLE = {t: torch.amp.is_autocast_available(t) for t in ("cpu", "cuda", "meta")}


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for ``device_type``, or None when autocast is off (or
    does not exist there, as on the meta device)."""
    available = _AUTOCAST_AVAILABLE.get(device_type)
    if available is None:  # another device type: asked directly (outside fastfusion's kernels)
        available = torch.amp.is_autocast_available(device_type)
    if not available or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_dtype(spec: OpSpec, device_type: str) -> torch.dtype | None:
    """The dtype that ``spec``'s policy casts a call's floating tensors to under the autocast in
    force on ``device_type``, or None when nothing is cast."""
    lowered = None if spec.autocast is None else autocast_dtype(device_type)
    if lowered is None:
        return None
    return torch.float32 if spec.autocast == "float32" else lowered


def _cast(value, dtype: torch.dtype):
    if isinstance(value, (list, tuple)):
        return [_cast(v, dtype) for v in value]
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


def call(name: str, backend: str | None, *args):
    """Run op ``name`` on its kernel-level ``args`` (validated and canonical) with the requested
    ``backend``: the custom op, or the "torch" forward kernel for "eager" and ONNX export, in
    either case under the op's autocast policy (differentiable arguments cast, autocast off inside).
    Returns the output; an op with residuals asks for them when autograd records the call."""
    spec, op = SPECS[name], _FORWARD_OPS[name]
    first = _dispatch._first_tensor(args[0])
    lowered = cast_dtype(spec, first.device.type)
    if lowered is not None:
        with torch.autocast(first.device.type, enabled=False):
            cast = [_cast(a, lowered) if n in spec.differentiable else a for n, a in zip(spec.arg_names, args)]
            return call(name, backend, *cast)
    requested = _dispatch.requested_backend(backend)
    if _dispatch.runs_reference(requested):
        return spec.forward(*args)
    if not spec.has_residuals:
        return op(*args, requested)
    named = dict(zip(spec.arg_names, args))
    tensors, _ = _pack([named[n] for n in spec.differentiable])
    return op(*args, _dispatch.wants_residuals(*tensors), requested)[0]


# The benchmark shape sets every declaration sizes its case for, by name:
SHAPE_SETS = MappingProxyType({
    "cuda": "the GPU sizes (docs/design.md, Reference sizes)",
    "cpu": "the 2-core CPU sizes (docs/design.md, Reference sizes)",
    "cpu-quick": "the CPU sizes shrunk 2-4x per dimension, so that a quick run on two cores, "
                 "torch.compile warm-up included, ends in under 3 minutes",
    "tiny": "a few kilobytes per tensor, for testing the harness itself",
})

_VARIANT = re.compile(r"[a-z][a-z0-9_]*")


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One benchmark case of an op, named ``<op>`` or ``<op>[<variant>]``.

    ``function``: the op's public function; ``reference``: its plain-PyTorch reference, with
    the same signature (the eager and torch.compile baselines and the float64 oracle).
    ``shapes``: per shape set of :data:`SHAPE_SETS` (every one of them), the sizes, a dict of
    ints and tuples of ints with the same keys in every set. ``build(sizes, randn)`` returns
    ``(args, buffers, apply)``: the floating inputs drawn with ``randn(*shape, scale=1.0)``
    (float64 CPU values from the case's generator, or meta tensors without values; the
    harness casts and moves them and differentiates all of them, parameters included), the
    integer buffers (hashes, signs) on the CPU, and ``apply(f, buffers, *args)``, the case
    computed by ``f``, which has the public function's signature. ``apply`` receives the
    buffers, never captures them, so that the harness alone places every tensor on the device.
    ``eager_variants(buffers, sizes, dtype)``: the plain-PyTorch ways of computing the case
    the eager baseline picks the fastest of, by name, each with the reference's signature and
    built from the buffers already on the device (setup, not timed); None: the reference alone.
    ``formulations(sizes)``: exact plain-PyTorch formulations besides the reference, by name,
    with the reference's signature (the roofline floor is the cheapest); None: none.
    """

    op: str
    variant: str | None
    function: Callable
    reference: Callable
    shapes: Mapping[str, Mapping]
    build: Callable
    eager_variants: Callable | None = None
    formulations: Callable | None = None

    @property
    def name(self) -> str:
        return self.op if self.variant is None else f"{self.op}[{self.variant}]"


_BENCHMARKS: dict[str, Benchmark] = {}


def declare_benchmark(benchmark: Benchmark) -> Benchmark:
    """Record ``benchmark`` (its op must be registered); raises ValueError naming what is wrong."""
    if benchmark.op not in SPECS:
        raise ValueError(f"benchmark op must be a registered op, one of {sorted(SPECS)}; got {benchmark.op!r}")
    if benchmark.variant is not None and not (isinstance(benchmark.variant, str) and _VARIANT.fullmatch(benchmark.variant)):
        raise ValueError(f"benchmark variant must be None or a lowercase word, got {benchmark.variant!r}")
    if benchmark.name in _BENCHMARKS:
        raise ValueError(f"benchmark {benchmark.name!r} is declared already")
    missing = [s for s in SHAPE_SETS if s not in benchmark.shapes]
    unknown = [s for s in benchmark.shapes if s not in SHAPE_SETS]
    if missing or unknown:
        raise ValueError(
            f"benchmark {benchmark.name!r}: shapes must size every shape set of {tuple(SHAPE_SETS)}; "
            f"missing {missing}, unknown {unknown}"
        )
    keys = {s: set(sizes) for s, sizes in benchmark.shapes.items()}
    if len({frozenset(k) for k in keys.values()}) != 1:
        raise ValueError(f"benchmark {benchmark.name!r}: shapes must have the same size keys in every set, got {keys}")
    _BENCHMARKS[benchmark.name] = benchmark
    return benchmark


def benchmarks() -> tuple[Benchmark, ...]:
    """Every declared benchmark, in report order: the ops' registration order, then declaration order."""
    order = {op: i for i, op in enumerate(SPECS)}
    return tuple(sorted(_BENCHMARKS.values(), key=lambda b: order[b.op]))  # sorted is stable
