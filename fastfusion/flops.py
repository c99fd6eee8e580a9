"""FLOP counting of fastfusion ops and modules: with fvcore, and with PyTorch's FlopCounterMode.

    from fastfusion.flops import count_flops
    count_flops(module.eval(), (x, y))      # -> int, forward FLOPs (needs fvcore)

    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        module(x, y).sum().backward()
    counter.get_total_flops()               # forward and backward FLOPs

``count_flops`` needs fvcore (``pip install fastfusion[dev]``); ``import fastfusion`` alone
does not import it. ``import fastfusion`` registers a formula for every ``fastfusion::`` custom
op (forward and backward) with ``torch.utils.flop_counter``, so ``FlopCounterMode`` counts
them; the registration waits until that module is first imported, which costs ~0.5 s.

Convention: *real floating-point operations of the contractions, transforms and
scatter-adds that define an op*; one multiply-add is 2 FLOPs, so the numbers compare with
hardware peak FLOP/s. That is twice fvcore's own unit (it counts a multiply-add as 1), and
the unit of FlopCounterMode's own formulas (mm, bmm, addmm, convolution).

- ``contraction``: mm, bmm, matmul, addmm, linear, einsum, convolution: 2 per
  multiply-add (2 M N K for an (M, K) @ (K, N) product). A bias add is not counted. An
  einsum is counted along torch's left-to-right pairwise path; a step that sums over no
  index (an outer or elementwise product) is pointwise and counts 0.
- ``fft``: 2.5 N log2 N per real-data transform of length N (rfft, irfft) and
  5 N log2 N per complex one (fft, ifft): the split-radix operation count that FFTW's
  benchmarks use, whatever N is.
- ``scatter_add``: 1 per accumulated element (index_add, scatter_add), so a count sketch
  of (B, n) costs B n: its signs flip, they do not multiply. A gather (its adjoint) is 0.
- Pointwise work (activations, products, sums, normalisation, casts, shape ops) counts 0:
  it is bandwidth-bound and measured in bytes, not FLOPs.

Each custom op's formula (its spec's ``flops`` and ``backward_flops``) counts, from its
argument shapes, exactly what the rules above count on the plain-PyTorch path
(``backend="eager"``) that computes the same math, so a module reports the same FLOPs under every backend; the formula never reads the
``backend`` argument. A ``*_backward`` op counts the adjoint of its forward given what the
forward computed (as autograd of the plain path does), not what a backend recomputes:

- count sketch, signed sqrt + L2: 0 (a gather; pointwise work).
- compact bilinear, FFT path: the rfft of the output gradient (B transforms of length d)
  and, per modality, the irfft of its correlation (B T transforms); the gathers count 0.
  Gram path: dX = Y dG^T and dY = X dG, 4 B T n_1 n_2; the gather of dG counts 0.
- factorized bilinear, tensor fusion: twice the forward (each product's two operands get a
  gradient, one product of the forward's size each); the outer product's adjoint, products
  and sums, is pointwise.
- low-rank fusion: per modality dX and dW_m, 2 r B h n_m each, and the fusion weights'
  gradient, 2 r B h.

fvcore traces the forward only, so ``count_flops`` never sees a backward op; the same
formulas serve both counters. Under ``backend="eager"`` no custom op runs: FlopCounterMode
then counts PyTorch's own ops by its own formulas, which have no FFT or scatter-add.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import math
import sys
import warnings
from collections import Counter
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from . import _custom_op

__all__ = ["count_flops", "count_flops_by_kind", "fft_flops"]

Handle = Callable[[list, list], Counter]
Formula = Callable[[dict], Counter]


@contextlib.contextmanager
def _jit_deprecation_silenced() -> Iterator[None]:
    """fvcore scripts and traces with torch.jit, which torch now deprecates; the warning
    is about fvcore's internals, nothing a caller of this module can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
        yield


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def fft_flops(batch: int, length: int, complex_input: bool) -> int:
    """FLOPs of ``batch`` transforms of ``length`` points by the convention above."""
    per_transform = (5.0 if complex_input else 2.5) * length * math.log2(length) if length > 1 else 0.0
    return round(batch * per_transform)


def _shape(value) -> list[int]:
    """The static shape of a traced tensor value (fvcore is imported by then)."""
    from fvcore.nn.jit_handles import get_shape

    return get_shape(value)


def _tensor_list(v: Any) -> list[list[int]]:
    """Shapes of the tensors in a ``Tensor[]`` graph input."""
    node = v.node()
    if node.kind() != "prim::ListConstruct":
        raise ValueError(f"cannot read the shapes of a tensor list made by {node.kind()}")
    return [_shape(t) for t in node.inputs()]


# --- aten ---------------------------------------------------------------------------

def _matmul_like(k_operand: int) -> Handle:
    """Any product whose output element is a K-long dot product, K = operand[-1]."""

    def handle(inputs, outputs):
        k = _shape(inputs[k_operand])[-1]
        return Counter(contraction=2 * _numel(_shape(outputs[0])) * k)

    return handle


def _einsum(inputs, outputs):
    equation = inputs[0].toIValue().replace(" ", "")
    operands = _tensor_list(inputs[1])
    lhs, _, out = equation.partition("->")
    terms = lhs.split(",")
    if "..." in equation:
        raise NotImplementedError(f"einsum with ellipsis ({equation}) is not counted")
    if not out:  # implicit output: the letters that appear once, sorted
        letters = "".join(terms)
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    sizes = {c: n for term, shape in zip(terms, operands) for c, n in zip(term, shape)}
    flops, current = 0, terms[0]
    for i, term in enumerate(terms[1:], start=1):
        kept = set(out).union(*terms[i + 1 :])
        involved = set(current) | set(term)
        if involved - kept:
            flops += 2 * _numel(sizes[c] for c in involved)
        current = "".join(c for c in sorted(involved) if c in kept)
    return Counter(contraction=flops)


def _convolution(inputs, outputs):
    from fvcore.nn.jit_handles import conv_flop_jit

    return Counter(contraction=2 * sum(conv_flop_jit(inputs, outputs).values()))


def _fft(real_data: bool, half_spectrum_input: bool) -> Handle:
    """fft_* (self, n, dim, norm); ``n``, when given, is the transform length."""

    def handle(inputs, outputs):
        shape = _shape(inputs[0])
        n, dim = inputs[1].toIValue(), inputs[2].toIValue()
        if n is None:
            n = 2 * (shape[dim] - 1) if half_spectrum_input else shape[dim]
        return Counter(fft=fft_flops(_numel(shape) // shape[dim], n, complex_input=not real_data))

    return handle


def _scatter_add(inputs, outputs):
    """index_add(self, dim, index, source) / scatter_add(self, dim, index, src)."""
    return Counter(scatter_add=_numel(_shape(inputs[3])))


# --- fastfusion custom ops: one formula per op, shared by both counters ----------------
# A formula takes the op's arguments by schema name, tensors as shapes, tensor lists as
# lists of shapes (canonical layouts, see fastfusion.ops), and returns counts by kind. Each
# op's spec (fastfusion._custom_op.OpSpec.flops, .backward_flops) holds its two formulas.


def no_flops(args: dict) -> Counter:
    """The formula of a pointwise op (or a gather): 0 by the convention above."""
    return Counter()


def twice(formula: Formula) -> Formula:
    """The backward of a forward whose every product gives both operands a gradient."""
    return lambda args: Counter({kind: 2 * n for kind, n in formula(args).items()})


def _formulas() -> dict[str, Formula]:
    """Op name in torch.ops.fastfusion -> formula, for every registered op and its backward.
    Read when counting, not at import: the op files, which register the specs, import this
    module for the helpers above."""
    found = {}
    for name, spec in _custom_op.SPECS.items():
        found[name], found[f"{name}_backward"] = spec.flops, spec.backward_flops
    return found


def _bind(op: str, args: Sequence, kwargs: dict) -> dict:
    """The arguments of a call of ``torch.ops.fastfusion.<op>`` by their schema names."""
    names = [a.name for a in getattr(torch.ops.fastfusion, op).default._schema.arguments]
    return {**dict(zip(names, args)), **kwargs}


def _traced_value(v: Any) -> Any:
    """A traced graph input as a formula reads it: a shape, a list of them, or a constant."""
    node = v.node()
    if node.kind() == "prim::ListConstruct":
        return [_traced_value(t) for t in node.inputs()]
    if isinstance(v.type(), torch._C.TensorType):
        return _shape(v)
    return v.toIValue()


def _fvcore_handle(op: str) -> Handle:
    formula = _formulas()[op]
    return lambda inputs, outputs: formula(_bind(op, [_traced_value(v) for v in inputs], {}))


def _flop_counter_formula(op: str) -> Callable[..., int]:
    """For torch.utils.flop_counter, which passes the arguments with tensors as shapes."""
    formula = _formulas()[op]

    def count(*args, out_shape=None, **kwargs) -> int:
        return sum(formula(_bind(op, args, kwargs)).values())

    return count


_HANDLES: dict[str, Handle | None] = {
    "aten::addmm": _matmul_like(1),
    "aten::bmm": _matmul_like(0),
    "aten::matmul": _matmul_like(0),
    "aten::mm": _matmul_like(0),
    "aten::linear": _matmul_like(0),
    "aten::einsum": _einsum,
    "aten::_convolution": _convolution,
    "aten::fft_rfft": _fft(real_data=True, half_spectrum_input=False),
    "aten::fft_irfft": _fft(real_data=True, half_spectrum_input=True),
    "aten::fft_fft": _fft(real_data=False, half_spectrum_input=False),
    "aten::fft_ifft": _fft(real_data=False, half_spectrum_input=False),
    "aten::index_add": _scatter_add,
    "aten::index_add_": _scatter_add,
    "aten::scatter_add": _scatter_add,
    "aten::scatter_add_": _scatter_add,
}

# Pointwise and shape ops: 0 by the convention above. Listing them silences fvcore's
# "unsupported operator" warning, which then only fires for ops nobody has classified.
_POINTWISE = (
    "abs add add_ amax amin batch_norm clamp_min div exp flatten group_norm instance_norm layer_norm "
    "linalg_vector_norm log_softmax mean movedim mul neg new_ones new_zeros norm ones_like "
    "pad pow relu reshape rsqrt sigmoid sign slice softmax sqrt sub sum tanh to transpose "
    "unflatten unsqueeze upsample_bilinear2d upsample_nearest2d adaptive_avg_pool2d "
    "grid_sampler where zeros_like"
).split()
_HANDLES.update({f"aten::{name}": None for name in _POINTWISE})


def count_flops_by_kind(module: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> dict[str, int]:
    """Forward FLOPs of ``module(*inputs)`` split into "contraction", "fft", "scatter_add"."""
    with _jit_deprecation_silenced():
        from fvcore.nn import FlopCountAnalysis

        handles = {**_HANDLES, **{f"fastfusion::{op}": _fvcore_handle(op) for op in _formulas()}}
        analysis = FlopCountAnalysis(module, inputs).clear_op_handles().set_op_handle(**handles)
        counts = analysis.uncalled_modules_warnings(False).by_operator()
    return {kind: int(counts.get(kind, 0)) for kind in ("contraction", "fft", "scatter_add")}


def count_flops(module: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> int:
    """Forward FLOPs of ``module(*inputs)`` (traced once with torch.jit.trace), by the
    convention in this module's docstring. Put dropout modules in eval mode first."""
    return sum(count_flops_by_kind(module, inputs).values())


# --- FlopCounterMode ----------------------------------------------------------------

_FLOP_COUNTER = "torch.utils.flop_counter"


def _register_flop_formulas() -> None:
    """Registers the formula of every fastfusion op defined so far with FlopCounterMode's
    registry; ops already registered are left as they are."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    formulas = _formulas()
    for op in torch.ops.fastfusion:
        packet = getattr(torch.ops.fastfusion, op)
        if op in formulas and packet not in flop_registry:
            register_flop_formula(packet)(_flop_counter_formula(op))


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Runs :func:`_register_flop_formulas` right after torch.utils.flop_counter is first
    imported. Importing it ourselves would add ~0.5 s to ``import fastfusion`` (it imports
    Triton), and FlopCounterMode copies the registry when it is created, so the formulas
    must be in place before any counter exists."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _FLOP_COUNTER:
            return None
        sys.meta_path.remove(self)  # once; and the lookup below must not come back here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module  # this spec's own loader object

        def exec_module(module):
            execute(module)
            _register_flop_formulas()

        spec.loader.exec_module = exec_module
        return spec


def register_flop_formulas_when_imported() -> None:
    """Registers the formulas with FlopCounterMode now if torch.utils.flop_counter is
    imported, else as soon as it is. ``import fastfusion`` calls this."""
    if _FLOP_COUNTER in sys.modules:
        _register_flop_formulas()
    elif not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
