"""Numerical checks of fastfusion ops at your own sizes, dtypes and backends.

    import fastfusion as ff
    from fastfusion.testing import assert_matches_reference, gradcheck

    def fusion(x, y, weight, backend):
        return ff.tensor_fusion([x, y], weight, None, backend=backend)

    x = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(64, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(128, 33 * 17) / 24).bfloat16().requires_grad_()
    assert_matches_reference(fusion, [x, y, weight], backend="auto")  # output, 3 gradients
    gradcheck(fusion, [x[:3, :4], y[:3, :2], weight[:5, :15]], backend="auto")  # in float64

``fn(*inputs, backend=name)`` must return a tensor (or a tuple of tensors). ``inputs`` holds
tensors, lists or tuples of tensors (e.g. the modalities of one op), or anything else, which
is passed through unchanged. Floating-point tensors are the values: they are cast for the
reference, and those with ``requires_grad`` are the ones differentiated. Integer tensors
(hashes) and signs of any dtype are passed as given.

The rule, shared with fastfusion's own test suite. Every result T (each output, and the
gradient w.r.t. every input that requires grad, for one seeded random cotangent) is compared
with R, the same result of ``backend="eager"`` (the plain-PyTorch reference, autograd for the
gradients) on float64 copies of the inputs, by the relative norm error

    err(T) = ||T - R||_2 / ||R||_2                       (absolute, ||T||_2, where R == 0)

and must satisfy, in T's dtype D,

    err(T) <= 2 * max(err(E), err(round_D(R)), floor(D))

with E the same result of ``backend="eager"`` run in D on the same inputs: a backend may be
at most twice as far from the exact result as PyTorch's own computation in that dtype
(flash-attention's rule), or as the exact result merely rounded to D, which no kernel can
beat. floor(D) covers results where PyTorch happens to round luckily: 0 in float16 and
bfloat16 (the rounding term suffices there), 1 epsilon in float32. In float64 E *is* the
reference, so err(E) = 0 and the bound is the floor, 2 * 5e-13 = 1e-12: thirty times the
largest float64 error of a fastfusion backend on the C++ backend's test cases (3.6e-14, a
gradient with cancellation). The bound holds per tensor, in norm: on tensors of a handful of
values the errors of both runs are dominated by one or two entries, and a run of seeds finds
float32 cases where a kernel rounds 3-6x worse than PyTorch's lucky run; check sizes with
some hundreds of values per result. The signed square root (``normalize=True``) of values
near 0 amplifies rounding by 1 / sqrt|z|, PyTorch's own too, too erratically for any such
rule (float64 results of CBP then differ by 1e-10): check those with ``normalize=False``.

Double backward (gradients of gradients) is not supported by the fastfusion custom ops, so
there is no ``gradgradcheck`` here: differentiating a gradient of an op raises.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch

__all__ = ["Comparison", "assert_matches_reference", "error_bound", "gradcheck", "rel_err"]

F64 = torch.float64

# floor(D) of the rule in the module docstring.
_FLOOR = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: 5e-13}


class Comparison(NamedTuple):
    """One result of :func:`assert_matches_reference`: the backend's error, PyTorch's own
    ("eager") error in the same dtype, the error of the exact result rounded to that dtype,
    all against the float64 reference, and the bound the first must not exceed."""

    error: float
    eager_error: float
    rounding_error: float
    bound: float


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_2 / ||expected||_2 over all elements, computed in float64 on the
    CPU (either tensor may live on a GPU). Raises ValueError when ``expected`` is all zeros,
    where a relative error means nothing."""
    a = actual.detach().to("cpu", F64)
    b = expected.detach().to("cpu", F64)
    denom = torch.linalg.vector_norm(b)
    if denom == 0:
        raise ValueError("expected is all zeros: a relative error means nothing")
    return (torch.linalg.vector_norm(a - b) / denom).item()


def error_bound(
    eager_error: float, rounding_error: float, dtype: torch.dtype, floor: float | None = None, factor: float = 2.0
) -> float:
    """factor * max(eager_error, rounding_error, floor): the most error a result in ``dtype``
    may have (see the module docstring); ``floor`` defaults to floor(dtype), ``factor`` to 2."""
    return factor * max(eager_error, rounding_error, _FLOOR.get(dtype, 0.0) if floor is None else floor)


def _is_value(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _map_values(f: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    """``obj`` with ``f`` applied to every floating tensor, through lists and tuples."""
    if _is_value(obj):
        return f(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_values(f, item) for item in obj)
    return obj


def _grad_leaves(inputs: Sequence, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every floating tensor in ``inputs`` that requires grad, in the
    order :func:`_map_values` visits them; names are "0", "2[1]", ..."""
    leaves = []
    for i, item in enumerate(inputs):
        name = f"{prefix}[{i}]" if prefix else str(i)
        if _is_value(item) and item.requires_grad:
            leaves.append((name, item))
        elif isinstance(item, (list, tuple)):
            leaves.extend(_grad_leaves(item, name))
    return leaves


def _fresh(inputs: Sequence, dtype: torch.dtype | None) -> list:
    """New leaves with the inputs' values (cast to ``dtype`` when given, else the same
    tensors' views, strides kept) and their requires_grad."""
    cast = (lambda t: t.detach().to(dtype)) if dtype is not None else (lambda t: t.detach())
    return _map_values(lambda t: cast(t).requires_grad_(t.requires_grad), list(inputs))


def _outputs(result: Any, what: str) -> list[torch.Tensor]:
    outputs = list(result) if isinstance(result, (list, tuple)) else [result]
    if not outputs or not all(_is_value(o) for o in outputs):
        raise TypeError(f"fn returned {type(result).__name__} for {what}; it must return a floating tensor or a tuple of them")
    return outputs


def _grads(outputs: list[torch.Tensor], inputs: list, cotangents: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of sum_i <outputs_i, cotangents_i> w.r.t. every input that requires
    grad (zeros for one the outputs do not depend on)."""
    pairs = [(o, c.to(o.device, o.dtype)) for o, c in zip(outputs, cotangents) if o.requires_grad]
    if not pairs:
        raise ValueError("inputs require grad, but no output does")
    leaves = [t for _, t in _grad_leaves(inputs)]
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [c for _, c in pairs], allow_unused=True, materialize_grads=True)
    return list(grads)


def _compare(
    name: str,
    got: torch.Tensor,
    eager: torch.Tensor,
    exact: torch.Tensor,
    floor: float | None,
    factor: float,
    problems: list[str],
) -> Comparison:
    if tuple(got.shape) != tuple(exact.shape) or got.dtype != eager.dtype:
        problems.append(
            f"{name}: shape {tuple(got.shape)} and dtype {got.dtype}, but the reference gives "
            f"shape {tuple(exact.shape)} and PyTorch's own run dtype {eager.dtype}"
        )
        return Comparison(float("inf"), float("nan"), float("nan"), float("nan"))
    if not torch.isfinite(exact).all():
        raise ValueError(f"{name}: the float64 reference is not finite; choose inputs where the op is defined")
    if not torch.isfinite(got).all():
        problems.append(f"{name}: non-finite values where the reference is finite")
        return Comparison(float("inf"), float("nan"), float("nan"), float("nan"))
    if exact.count_nonzero() == 0:  # absolute errors: the norms themselves
        error, eager_error, rounding_error = (torch.linalg.vector_norm(t.detach().to("cpu", F64)).item() for t in (got, eager, exact))
    else:
        error, eager_error = rel_err(got, exact), rel_err(eager, exact)
        rounding_error = rel_err(exact.to(got.dtype), exact)
    bound = error_bound(eager_error, rounding_error, got.dtype, floor, factor)
    if not error <= bound:
        problems.append(
            f"{name}: error {error:.3e} > {bound:.3e} = {factor:g} x max(PyTorch's own error {eager_error:.3e}, "
            f"rounding {rounding_error:.3e}, floor {_FLOOR.get(got.dtype, 0.0) if floor is None else floor:.1e}) "
            f"in {got.dtype}"
        )
    return Comparison(error, eager_error, rounding_error, bound)


def assert_matches_reference(
    fn: Callable[..., Any],
    inputs: Sequence,
    *,
    backend: str,
    generator: torch.Generator | None = None,
    floor: float | None = None,
    factor: float = 2.0,
) -> dict[str, Comparison]:
    """Checks ``fn(*inputs, backend=backend)`` against the float64 eager reference by the
    rule in this module's docstring: every output, and the gradient w.r.t. every floating
    input that requires grad, for one random cotangent per output (standard normal, drawn
    in float64 from ``generator``, a CPU generator, seeded 0 if None, then rounded to the
    output's dtype so that every run sees the same values).

    ``floor`` replaces floor(dtype) of the rule, and ``factor`` its 2: for results outside the
    rule's scope (the module docstring), such as a handful of values, where both runs' errors
    hang on one or two roundings, or gradients through the signed square root of values near
    0, where both are noise amplified by 1 / sqrt|z|. Loosen them only for such results.

    Returns ``{"output": Comparison, "grad 0": ..., "grad 2[1]": ...}`` ("output i" when fn
    returns several; a gradient is named by its input's position, then its index within a
    list). Raises AssertionError naming every result that breaks the rule.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(f"inputs must be a list or tuple of fn's positional arguments, got {type(inputs).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a backend name (str), got {type(backend).__name__}")
    if backend == "eager":
        raise ValueError("backend='eager' is the reference itself; pass the backend to check (e.g. 'cpp', 'auto')")
    if floor is not None and not floor >= 0:
        raise ValueError(f"floor must be a non-negative error, got {floor!r}")
    if not factor >= 1:
        raise ValueError(f"factor must be at least 1, got {factor!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)

    exact_inputs = _fresh(inputs, F64)
    exact_outputs = _outputs(fn(*exact_inputs, backend="eager"), "the float64 reference")
    # PyTorch's own run in the inputs' dtypes; in float64 that is the reference itself.
    in_float64 = all(t.dtype == F64 for t in _flat_values(inputs))
    eager_inputs = exact_inputs if in_float64 else _fresh(inputs, None)
    eager_outputs = exact_outputs if in_float64 else _outputs(fn(*eager_inputs, backend="eager"), "backend='eager'")
    backend_inputs = _fresh(inputs, None)
    outputs = _outputs(fn(*backend_inputs, backend=backend), f"backend={backend!r}")
    shapes, exact_shapes = [tuple(o.shape) for o in outputs], [tuple(o.shape) for o in exact_outputs]
    if shapes != exact_shapes:
        raise AssertionError(f"backend={backend!r} returned outputs of shapes {shapes}, the reference {exact_shapes}")

    exact_grads, eager_grads, grads = [], [], []
    if _grad_leaves(inputs):
        cotangents = [
            torch.randn(o.shape, generator=generator, dtype=F64).to(e.dtype) for o, e in zip(exact_outputs, eager_outputs)
        ]
        exact_grads = _grads(exact_outputs, exact_inputs, cotangents)
        eager_grads = exact_grads if in_float64 else _grads(eager_outputs, eager_inputs, cotangents)
        grads = _grads(outputs, backend_inputs, cotangents)

    names = ["output"] if len(outputs) == 1 else [f"output {i}" for i in range(len(outputs))]
    names += [f"grad {name}" for name, _ in _grad_leaves(inputs)]
    problems: list[str] = []
    comparisons = {
        name: _compare(name, got, eager, exact, floor, factor, problems)
        for name, got, eager, exact in zip(names, outputs + grads, eager_outputs + eager_grads, exact_outputs + exact_grads)
    }
    if problems:
        raise AssertionError(f"backend={backend!r} does not match the float64 reference:\n  " + "\n  ".join(problems))
    return comparisons


def _flat_values(inputs: Sequence) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map_values(lambda t: found.append(t) or t, list(inputs))
    return found


def gradcheck(
    fn: Callable[..., Any],
    inputs: Sequence,
    *,
    backend: str,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    **kwargs: Any,
) -> bool:
    """``torch.autograd.gradcheck`` of ``fn(*inputs, backend=backend)`` on float64 copies of
    the floating inputs, w.r.t. those that require grad: the backend's gradients against
    central finite differences of its own forward, (f(x + eps) - f(x - eps)) / (2 eps) per
    input element, within atol + rtol * |numerical|.

    The defaults are gradcheck's own, which suit inputs and outputs of order one; each input
    element costs two forward calls, so keep the sizes small. Inputs must stay ``eps`` away
    from the ops' kinks (signed square root at 0). ``kwargs`` go to gradcheck (e.g.
    ``fast_mode=True``). Returns True, or raises gradcheck's ``GradcheckError``.
    There is no gradgradcheck: the ops do not support double backward.
    """
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(f"inputs must be a list or tuple of fn's positional arguments, got {type(inputs).__name__}")
    exact_inputs = _fresh(inputs, F64)
    leaves = [t for _, t in _grad_leaves(exact_inputs)]
    if not leaves:
        raise ValueError("inputs: no floating tensor requires grad; call requires_grad_() on those to check")

    def with_leaves(*values: torch.Tensor):
        supplied = iter(values)
        rebuilt = _map_values(lambda t: next(supplied) if t.requires_grad else t, exact_inputs)
        return fn(*rebuilt, backend=backend)

    return torch.autograd.gradcheck(with_leaves, tuple(leaves), eps=eps, atol=atol, rtol=rtol, **kwargs)
