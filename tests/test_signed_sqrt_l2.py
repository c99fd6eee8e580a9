"""signed_sqrt_l2: s = sign(z) sqrt(|z| + eps); out = s / max(||s||, eps), over the last dim.

Beyond the value and gradient checks (every backend against the float64 "eager" reference
by the suite's one rule, in every dtype of the case table), the points here are the pitfalls
of peer code: NaN gradients at z = 0, NaN for an all-zero vector, and overflow/underflow of
the norm. Every test runs on every backend under test, each on its device.
"""

import pytest
import torch

import fastfusion as ff

from helpers import (
    ALL_DTYPES,
    F64,
    HALF,
    LAYOUTS,
    TRITON_INTERPRETED,
    Case,
    assert_conforms,
    assert_low_precision,
    assert_rel_close,
    away_from_zero,
    backend_device,
    backend_dtype_params,
    backends_under_test,
    conformance_params,
    randn,
    to_backend,
)
from oracles import signed_sqrt_l2_oracle

BACKENDS = backends_under_test()


def sqrt_case(*shape, layout="contiguous", eps=1e-12, zeros=None):
    """A Case builder: z of ``shape`` in ``layout``; ``zeros(z)`` writes exact zeros into it."""

    def build(gen):
        z = randn(gen, *shape, layout=layout)
        if zeros is not None:
            zeros(z)
        return (lambda z, backend: ff.signed_sqrt_l2(z, eps, backend=backend)), [z.requires_grad_(True)]

    return build


def zeros_and_a_zero_row(z):
    """Exact zeros (the finite-gradient path) and one all-zero row (the below-eps path)."""
    z[..., ::3] = 0
    z[(0,) * (z.dim() - 1)] = 0


def zeros_1029(z):
    z[0, 0, :7] = 0  # finite gradients at exact zeros
    z[1, 1] = 0  # an all-zero row divides by eps


def zeros_in_rows(z):
    z[0] = 0.0
    z[1, ::2] = 0.0


# The one case table: exact zeros and all-zero rows, every layout, d = 1029 across two blocks
# of the Triton kernels and a partial one, and ||s|| < eps (the denominator is the constant
# eps, a separate branch of the backward).
CASES = {
    "4x11 zeros": Case(sqrt_case(4, 11, zeros=zeros_and_a_zero_row)),
    "2x3x6 strided zeros": Case(sqrt_case(2, 3, 6, layout="strided", zeros=zeros_and_a_zero_row)),
    "3x2x1029 zeros": Case(sqrt_case(3, 2, 1029, zeros=zeros_1029), ALL_DTYPES),
    "4x37 transposed": Case(sqrt_case(4, 37, layout="transposed")),
    "3x8 zero rows": Case(sqrt_case(3, 8, zeros=zeros_in_rows), (F64,)),
    **{
        f"{'x'.join(map(str, shape))} {layout} eps={eps}": Case(sqrt_case(*shape, layout=layout, eps=eps), (F64,))
        for shape in [(1, 7), (2, 3, 5)]
        for layout in LAYOUTS
        for eps in [1e-12, 0.5]
    },
}


@pytest.mark.parametrize("case, backend, dtype", conformance_params(CASES))
def test_conforms(gen, case, backend, dtype):
    fn, inputs = CASES[case].build(gen)
    assert_conforms(fn, inputs, backend, dtype, gen, **CASES[case].tolerance(backend, dtype))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "eager"])
def test_tiny_norm_below_eps(gen, backend):
    # ||s|| < eps: the denominator is the constant eps, a separate branch of the backward.
    z = (randn(gen, 2, 5) * 1e-30).requires_grad_(True)
    assert_conforms(lambda z, backend: ff.signed_sqrt_l2(z, 0.1, backend=backend), [z], backend, F64, gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 7), (4, 16), (2, 3, 5), (9,)])
@pytest.mark.parametrize("eps", [1e-12, 1e-3, 0.5])
def test_matches_formula(gen, backend, shape, eps):
    z = randn(gen, *shape, layout="strided")
    out = ff.signed_sqrt_l2(to_backend(z, backend), eps, backend=backend)
    assert_rel_close(out, signed_sqrt_l2_oracle(z, eps), 1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-30, 1e-8, 1.0, 1e8, 1e30])
def test_unit_norm_and_finite_at_any_magnitude(gen, backend, dtype, scale):
    z = to_backend(randn(gen, 3, 11) * scale, backend, dtype)
    out = ff.signed_sqrt_l2(z, backend=backend)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # Every row is nonzero, so the L2 normalisation must give unit rows ...
    norms = torch.linalg.vector_norm(out.double(), dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), rtol=0, atol=1e-5), norms
    # ... with the signs of z (the signed square root never flips a sign).
    assert torch.equal(torch.sign(out), torch.sign(z))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unit_norm_near_float32_max(backend):
    # sqrt(3e38) ~ 1.7e19 is representable, and so is the norm of 7 of them (~4.6e19);
    # only a naive sum of squares (7 * 3e38 > float32 max) overflows, giving s / inf = 0.
    z = torch.tensor([[3e38, -3e38, 1e38, -2e38, 3e38, 1e37, -3e38]], dtype=torch.float32)
    out = ff.signed_sqrt_l2(to_backend(z, backend), backend=backend)
    assert torch.isfinite(out).all()
    expected = signed_sqrt_l2_oracle(z.double())
    assert_rel_close(out, expected, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_finite_at_exact_zeros(gen, backend):
    z = randn(gen, 3, 8)
    z[:, ::3] = 0.0  # exact zeros inside otherwise nonzero rows
    z = to_backend(z, backend).requires_grad_(True)
    out = ff.signed_sqrt_l2(z, backend=backend)
    (grad,) = torch.autograd.grad(out, z, to_backend(randn(gen, 3, 8), backend))
    assert torch.isfinite(grad).all()
    # d sign(z) sqrt(|z| + eps) / dz = sign(z)^2 / (2 sqrt(|z| + eps)) is 0 at z == 0 exactly.
    assert torch.equal(grad[:, ::3], torch.zeros_like(grad[:, ::3]))
    assert (grad[:, 1::3] != 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_vector(gen, backend):
    z = torch.zeros(2, 6, dtype=torch.float64)
    z[1] = randn(gen, 6)  # a normal row next to the zero row
    z = to_backend(z, backend).requires_grad_(True)
    out = ff.signed_sqrt_l2(z, backend=backend)
    assert torch.equal(out[0].cpu(), torch.zeros(6, dtype=torch.float64))
    assert_rel_close(out[1], signed_sqrt_l2_oracle(z[1].cpu()), 1e-14)
    (grad,) = torch.autograd.grad(out, z, to_backend(randn(gen, 2, 6), backend))
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_to_its_row_only(gen, backend):
    z = randn(gen, 3, 5)
    z[1, 2] = float("nan")
    out = ff.signed_sqrt_l2(to_backend(z, backend), backend=backend)
    assert torch.isnan(out[1]).any(), "a NaN input must not be hidden"
    assert torch.isfinite(out[[0, 2]]).all(), "a NaN must not leak into other rows"


@pytest.mark.parametrize(
    "backend, shape, eps",
    [
        (backend, shape, eps)
        for shape, eps, interpret in [((3, 7), None, False), ((3, 7), 0.25, False), ((3, 5), None, False), ((2, 13), 1e-3, True)]
        for backend in BACKENDS
        # Seconds per gradcheck in Triton's interpreter: there it runs the last case only.
        if interpret or backend != "triton" or not TRITON_INTERPRETED
    ],
)
def test_gradcheck(gen, backend, shape, eps):
    # |z| >= 0.5: finite differences jump at z = 0 (sign) and blow up near it (sqrt).
    z = to_backend(away_from_zero(gen, *shape, requires_grad=True), backend)
    args = () if eps is None else (eps,)
    assert torch.autograd.gradcheck(lambda t: ff.signed_sqrt_l2(t, *args, backend=backend), (z,), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend, dtype", backend_dtype_params(HALF))
def test_low_precision(gen, backend, dtype):
    z = randn(gen, 8, 33, requires_grad=True)
    fn = lambda z, backend: ff.signed_sqrt_l2(z, backend=backend)  # noqa: E731
    errors = assert_low_precision(fn, [z], dtype, gen, backend=backend, cap=1e-2, grad_cap=1e-2)
    # Computed in float32: the only error left is rounding the results to ``dtype``.
    for name, (err_torch, _, floor) in errors.items():
        assert err_torch <= 1.5 * floor, (name, err_torch, floor)


@pytest.mark.parametrize("backend", backends_under_test())
def test_nan_stays_in_its_row_and_huge_rows_stay_unit(backend):
    z = torch.randn(3, 1029, device=backend_device(backend), requires_grad=True)
    with torch.no_grad():
        z[1, 1000] = float("nan")  # in the second block: a NaN must survive the block reduction
        z[2] = 3e38  # the squares overflow float32 unless the norm rescales
    out = ff.signed_sqrt_l2(z, backend=backend)
    out.backward(torch.randn_like(out))
    assert out[1].isnan().all() and z.grad[1].isnan().all()
    for row in (0, 2):
        assert out[row].isfinite().all() and z.grad[row].isfinite().all()
        assert abs(out[row].double().norm().item() - 1) < 1e-5
