"""Utilities shared by the test files: the device each backend is tested on, error metrics,
seeded input builders, and the comparisons of backends and of precisions. The expected values
themselves come from oracles.py; nothing here computes one with fastfusion."""

from __future__ import annotations

from typing import Callable, Sequence

import pytest
import torch

F64 = torch.float64
LAYOUTS = ("contiguous", "strided", "transposed")


# --------------------------------------------------------------------------- devices

# The one choice of device for the tests of the "triton" backend. Its kernels are GPU kernels:
# on a machine with CUDA they are tested there, compiled, and without one on the CPU under
# Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 from this), so that a GPU run checks
# exactly the cases that CI checks. Every other backend is tested on the CPU: the C++ kernels are
# CPU kernels, and "torch" and "eager" are the references the others are held to.
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU = torch.device("cpu")


def backend_device(backend: str) -> torch.device:
    """The device that tests of ``backend`` put their tensors on."""
    return TRITON_DEVICE if backend == "triton" else CPU


def skip_module_unless_triton_runs() -> None:
    """Skip the calling test module, visibly, when the "triton" backend cannot run on
    TRITON_DEVICE: Triton is not installed, or there is no GPU and TRITON_INTERPRET is not 1."""
    import fastfusion  # see backends_under_test

    if "triton" not in fastfusion.available_backends(TRITON_DEVICE.type):
        why = "Triton is missing, or there is no GPU and TRITON_INTERPRET != 1"
        pytest.skip(f"the triton backend does not run on {TRITON_DEVICE.type} here: {why}", allow_module_level=True)


def backends_under_test() -> tuple[str, ...]:
    """The backend "eager" and every concrete backend that runs on its :func:`backend_device` here."""
    # Imported here, not at the top: conftest.py imports this module to decide TRITON_INTERPRET,
    # which must be set before fastfusion (and so Triton) is first imported.
    import fastfusion

    runnable = (b for b in fastfusion.available_backends() if b in fastfusion.available_backends(backend_device(b).type))
    return ("eager", *runnable)


# --------------------------------------------------------------------------- metrics
# The metric and the low-precision rule are fastfusion.testing's: the suite holds the
# backends to the rule that users get. (Imported on use: see backends_under_test.)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """fastfusion.testing.rel_err: ||actual - expected|| / ||expected|| in float64."""
    from fastfusion.testing import rel_err as shared

    return shared(actual, expected)



def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """Same shape, all finite, and relative norm error <= tol."""
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


# --------------------------------------------------------------------------- inputs


def randn(gen: torch.Generator, *shape: int, dtype=F64, layout: str = "contiguous", requires_grad: bool = False) -> torch.Tensor:
    """Standard normal values with ``shape``, as a contiguous tensor or a non-contiguous view.

    "strided" keeps every other element of a twice-as-wide last dimension (last stride 2);
    "transposed" is the transpose of a tensor stored feature-major (last stride > 1).
    The view itself is the leaf when ``requires_grad``, so kernels see its strides.
    """
    if layout == "contiguous":
        return torch.randn(shape, generator=gen, dtype=F64).to(dtype).requires_grad_(requires_grad)
    # Draw and cast the storage first: .to() of a non-dense view would make it contiguous.
    if layout == "strided":
        t = torch.randn(shape[:-1] + (2 * shape[-1],), generator=gen, dtype=F64).to(dtype)[..., ::2]
    elif layout == "transposed":
        t = torch.randn((shape[-1],) + shape[:-1], generator=gen, dtype=F64).to(dtype).movedim(0, -1)
    else:
        raise AssertionError(f"unknown layout {layout}")
    return t.detach().requires_grad_(requires_grad)


def away_from_zero(gen: torch.Generator, *shape: int, low: float = 0.5, high: float = 1.5, requires_grad=False) -> torch.Tensor:
    """Random signs times magnitudes in [low, high]: safe for finite differences of sign/sqrt."""
    magnitude = low + (high - low) * torch.rand(shape, generator=gen, dtype=F64)
    sign = torch.randint(2, shape, generator=gen, dtype=torch.int64) * 2 - 1
    return (magnitude * sign).requires_grad_(requires_grad)


def random_hashes_signs(
    gen: torch.Generator,
    in_dims: Sequence[int],
    out_dim: int,
    *,
    hash_dtype=torch.int64,
    sign_dtype=torch.int8,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Independent hash (values in [0, out_dim)) and sign (+1/-1) vectors per modality."""
    hashes = [torch.randint(out_dim, (n,), generator=gen).to(hash_dtype) for n in in_dims]
    signs = [(torch.randint(2, (n,), generator=gen) * 2 - 1).to(sign_dtype) for n in in_dims]
    return hashes, signs


# --------------------------------------------------------------------------- backends


def custom_op_ran(out: torch.Tensor) -> bool:
    """True when ``out`` came out of a ``fastfusion::`` custom op (a concrete backend), False
    when the plain reference built it with PyTorch's own autograd ("eager")."""
    assert out.grad_fn is not None, "needs an input that requires grad"
    seen, todo = set(), [out.grad_fn]
    while todo:  # the op's node may sit under reshapes and casts: search the graph
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "fastfusion" in node.name():
            return True
        todo.extend(next_node for next_node, _ in node.next_functions)
    return False


def assert_backends_agree(
    fn: Callable[[str], torch.Tensor],
    leaves: Sequence[torch.Tensor],
    gen: torch.Generator,
    tol: float = 1e-12,
) -> None:
    """``fn(backend)`` builds the output from ``leaves``. The "torch" backend (custom ops with
    hand-written backward kernels) must match "eager" (PyTorch autograd of the reference):
    the output, and the gradient of a random cotangent w.r.t. every leaf."""
    out_eager = fn("eager")
    out_torch = fn("torch")
    assert custom_op_ran(out_torch) and not custom_op_ran(out_eager)
    assert_rel_close(out_torch, out_eager, tol, "output")
    cotangent = torch.randn(out_eager.shape, generator=gen, dtype=out_eager.dtype)
    grads_eager = torch.autograd.grad(out_eager, leaves, cotangent)
    grads_torch = torch.autograd.grad(out_torch, leaves, cotangent)
    for i, (gt, ge) in enumerate(zip(grads_torch, grads_eager)):
        assert gt.dtype == leaves[i].dtype and gt.shape == leaves[i].shape, f"grad of leaf {i}"
        assert_rel_close(gt, ge, tol, f"grad of leaf {i} (shape {tuple(leaves[i].shape)})")


def assert_low_precision(fn, inputs, dtype, gen, *, cap: float, grad_cap: float) -> dict:
    """fastfusion.testing's rule for backend "torch" in ``dtype``: within 2x of "eager"'s error in
    ``dtype`` (or of the float64 result rounded to ``dtype``), both against float64, for the
    output and the gradient w.r.t. every input (``fn(inputs, backend)`` must be differentiable
    in all of them); and below an absolute cap. ``inputs`` are rounded to ``dtype`` first, so
    the float64 reference sees exactly the values the low-precision runs see; the cotangent
    is drawn from ``gen``.

    Returns, for "output" and "grad i": (error of "torch", error of "eager", error of the
    float64 result merely rounded to ``dtype``: the floor no kernel can beat).
    """
    from fastfusion.testing import assert_matches_reference

    def call(*t, backend):
        out = fn(list(t), backend)
        assert t[0].dtype != dtype or out.dtype == dtype, f"{backend}: output in {out.dtype}, not {dtype}"
        return out

    low = [t.detach().to(dtype).requires_grad_(True) for t in inputs]
    comparisons = assert_matches_reference(call, low, backend="torch", generator=gen)
    for name, c in comparisons.items():
        limit = cap if name == "output" else grad_cap
        assert c.error <= limit, f"{name}: error {c.error:.2e} > {limit:.1e}"
    return {name: (c.error, c.eager_error, c.rounding_error) for name, c in comparisons.items()}
