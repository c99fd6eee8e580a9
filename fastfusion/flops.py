"""FLOP counting with fvcore, including FFTs and the ``fastfusion::`` custom ops.

    from fastfusion.flops import count_flops
    count_flops(module.eval(), (x, y))      # -> int, forward FLOPs

Needs fvcore (``pip install fastfusion[dev]``); ``import fastfusion`` alone does not.

Convention: *real floating-point operations of the contractions, transforms and
scatter-adds that define an op*; one multiply-add is 2 FLOPs, so the numbers compare with
hardware peak FLOP/s. That is twice fvcore's own unit (it counts a multiply-add as 1).

- ``contraction``: mm, bmm, matmul, addmm, linear, einsum, convolution: 2 per
  multiply-add (2 M N K for an (M, K) @ (K, N) product). A bias add is not counted. An
  einsum is counted along torch's left-to-right pairwise path; a step that sums over no
  index (an outer or elementwise product) is pointwise and counts 0.
- ``fft``: 2.5 N log2 N per real-data transform of length N (rfft, irfft) and
  5 N log2 N per complex one (fft, ifft): the split-radix operation count that FFTW's
  benchmarks use, whatever N is.
- ``scatter_add``: 1 per accumulated element (index_add, scatter_add), so a count sketch
  of (B, n) costs B n: its signs flip, they do not multiply.
- Pointwise work (activations, products, sums, normalisation, casts, shape ops) counts 0:
  it is bandwidth-bound and measured in bytes, not FLOPs.

Each custom op's handle counts, from its input shapes, exactly what the handles above
count on the plain-PyTorch path (``backend="eager"``) that computes the same math, so a
module reports the same FLOPs under every backend; the tests hold both paths to a hand
count. The ``*_backward`` custom ops have no handles: fvcore traces the forward only.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn


@contextlib.contextmanager
def _jit_deprecation_silenced() -> Iterator[None]:
    """fvcore scripts and traces with torch.jit, which torch now deprecates; the warning
    is about fvcore's internals, nothing a caller of this module can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
        yield


with _jit_deprecation_silenced():
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import conv_flop_jit, get_shape

__all__ = ["count_flops", "count_flops_by_kind", "fft_flops"]

Handle = Callable[[list, list], Counter]


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def fft_flops(batch: int, length: int, complex_input: bool) -> int:
    """FLOPs of ``batch`` transforms of ``length`` points by the convention above."""
    per_transform = (5.0 if complex_input else 2.5) * length * math.log2(length) if length > 1 else 0.0
    return round(batch * per_transform)


def _tensor_list(v: Any) -> list[list[int]]:
    """Shapes of the tensors in a ``Tensor[]`` graph input."""
    node = v.node()
    if node.kind() != "prim::ListConstruct":
        raise ValueError(f"cannot read the shapes of a tensor list made by {node.kind()}")
    return [get_shape(t) for t in node.inputs()]


# --- aten ---------------------------------------------------------------------------

def _matmul_like(k_operand: int) -> Handle:
    """Any product whose output element is a K-long dot product, K = operand[-1]."""

    def handle(inputs, outputs):
        k = get_shape(inputs[k_operand])[-1]
        return Counter(contraction=2 * _numel(get_shape(outputs[0])) * k)

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
    return Counter(contraction=2 * sum(conv_flop_jit(inputs, outputs).values()))


def _fft(real_data: bool, half_spectrum_input: bool) -> Handle:
    """fft_* (self, n, dim, norm); ``n``, when given, is the transform length."""

    def handle(inputs, outputs):
        shape = get_shape(inputs[0])
        n, dim = inputs[1].toIValue(), inputs[2].toIValue()
        if n is None:
            n = 2 * (shape[dim] - 1) if half_spectrum_input else shape[dim]
        return Counter(fft=fft_flops(_numel(shape) // shape[dim], n, complex_input=not real_data))

    return handle


def _scatter_add(inputs, outputs):
    """index_add(self, dim, index, source) / scatter_add(self, dim, index, src)."""
    return Counter(scatter_add=_numel(get_shape(inputs[3])))


# --- fastfusion custom ops (canonical layouts, see fastfusion.ops) -------------------

def _ff_count_sketch(inputs, outputs):
    return Counter(scatter_add=_numel(get_shape(inputs[0])))


def _ff_compact_bilinear(inputs, outputs):
    # xs (B, T, n_m). FFT path: count sketch and rfft per position and modality, the product
    # pooled over T in the frequency domain, one irfft per sample. Gram path: X^T Y per sample
    # and the scatter of its n_1 n_2 entries.
    xs, out_dim, algorithm = _tensor_list(inputs[0]), inputs[3].toIValue(), inputs[8].toIValue()
    batch, positions = xs[0][0], xs[0][1]
    if algorithm == "gram":
        (_, _, n1), (_, _, n2) = xs
        return Counter(contraction=2 * batch * positions * n1 * n2, scatter_add=batch * n1 * n2)
    return Counter(
        scatter_add=sum(_numel(x) for x in xs),
        fft=len(xs) * fft_flops(batch * positions, out_dim, complex_input=False)
        + fft_flops(batch, out_dim, complex_input=False),
    )


def _ff_factorized_bilinear(inputs, outputs):
    x, y, weight_x = (get_shape(v) for v in inputs[:3])
    return Counter(contraction=2 * x[0] * weight_x[0] * (x[1] + y[1]))


def _ff_low_rank_fusion(inputs, outputs):
    # Per modality (B, n_m) @ (r, n_m, h), the constant row being added, not multiplied;
    # then the rank-weighted sum, an (r) . (r, B, h) contraction.
    xs, factors = _tensor_list(inputs[0]), _tensor_list(inputs[1])
    batch, (rank, _, hidden) = xs[0][0], factors[0]
    return Counter(contraction=2 * batch * rank * hidden * (sum(x[1] for x in xs) + 1))


def _ff_tensor_fusion(inputs, outputs):
    # The outer product is pointwise; the linear layer over its prod_m(n_m+1) entries is not.
    xs, weight = _tensor_list(inputs[0]), get_shape(inputs[1])
    return Counter(contraction=2 * xs[0][0] * _numel(weight))


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
    "fastfusion::count_sketch": _ff_count_sketch,
    "fastfusion::compact_bilinear": _ff_compact_bilinear,
    "fastfusion::factorized_bilinear": _ff_factorized_bilinear,
    "fastfusion::low_rank_fusion": _ff_low_rank_fusion,
    "fastfusion::tensor_fusion": _ff_tensor_fusion,
}

# Pointwise and shape ops: 0 by the convention above. Listing them silences fvcore's
# "unsupported operator" warning, which then only fires for ops nobody has classified.
_POINTWISE = (
    "abs add add_ amax amin batch_norm clamp_min div exp flatten group_norm instance_norm layer_norm "
    "linalg_vector_norm log_softmax mean movedim mul neg new_ones new_zeros norm ones_like "
    "pad pow relu reshape rsqrt sigmoid sign slice softmax sqrt sub sum tanh to transpose "
    "unflatten unsqueeze upsample_bilinear2d upsample_nearest2d adaptive_avg_pool2d "
    "grid_sampler where zeros_like fastfusion::signed_sqrt_l2"
).split()
_HANDLES.update({name if "::" in name else f"aten::{name}": None for name in _POINTWISE})


def count_flops_by_kind(module: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> dict[str, int]:
    """Forward FLOPs of ``module(*inputs)`` split into "contraction", "fft", "scatter_add"."""
    analysis = FlopCountAnalysis(module, inputs).clear_op_handles().set_op_handle(**_HANDLES)
    with _jit_deprecation_silenced():
        counts = analysis.uncalled_modules_warnings(False).by_operator()
    return {kind: int(counts.get(kind, 0)) for kind in ("contraction", "fft", "scatter_add")}


def count_flops(module: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> int:
    """Forward FLOPs of ``module(*inputs)`` (traced once with torch.jit.trace), by the
    convention in this module's docstring. Put dropout modules in eval mode first."""
    return sum(count_flops_by_kind(module, inputs).values())
