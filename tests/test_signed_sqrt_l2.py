"""signed_sqrt_l2: s = sign(z) sqrt(|z| + eps); out = s / max(||s||, eps), over the last dim.

Beyond the value and gradient checks, the points here are the pitfalls of peer code:
NaN gradients at z = 0, NaN for an all-zero vector, and overflow/underflow of the norm.
"""

import pytest
import torch

import fastfusion as ff
from helpers import (
    LAYOUTS,
    assert_backends_agree,
    assert_low_precision,
    assert_rel_close,
    away_from_zero,
    backend_device,
    backends_under_test,
    randn,
)
from oracles import signed_sqrt_l2_oracle

BACKENDS = ("torch", "eager")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 7), (4, 16), (2, 3, 5), (9,)])
@pytest.mark.parametrize("eps", [1e-12, 1e-3, 0.5])
def test_matches_formula(gen, backend, shape, eps):
    z = randn(gen, *shape, layout="strided")
    out = ff.signed_sqrt_l2(z, eps, backend=backend)
    assert_rel_close(out, signed_sqrt_l2_oracle(z, eps), 1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-30, 1e-8, 1.0, 1e8, 1e30])
def test_unit_norm_and_finite_at_any_magnitude(gen, backend, dtype, scale):
    z = (randn(gen, 3, 11) * scale).to(dtype)
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
    out = ff.signed_sqrt_l2(z, backend=backend)
    assert torch.isfinite(out).all()
    expected = signed_sqrt_l2_oracle(z.double())
    assert_rel_close(out, expected, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_finite_at_exact_zeros(gen, backend):
    z = randn(gen, 3, 8)
    z[:, ::3] = 0.0  # exact zeros inside otherwise nonzero rows
    z.requires_grad_(True)
    out = ff.signed_sqrt_l2(z, backend=backend)
    (grad,) = torch.autograd.grad(out, z, randn(gen, 3, 8))
    assert torch.isfinite(grad).all()
    # d sign(z) sqrt(|z| + eps) / dz = sign(z)^2 / (2 sqrt(|z| + eps)) is 0 at z == 0 exactly.
    assert torch.equal(grad[:, ::3], torch.zeros_like(grad[:, ::3]))
    assert (grad[:, 1::3] != 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_vector(gen, backend):
    z = torch.zeros(2, 6, dtype=torch.float64)
    z[1] = randn(gen, 6)  # a normal row next to the zero row
    z.requires_grad_(True)
    out = ff.signed_sqrt_l2(z, backend=backend)
    assert torch.equal(out[0], torch.zeros(6, dtype=torch.float64))
    assert_rel_close(out[1], signed_sqrt_l2_oracle(z[1]), 1e-14)
    (grad,) = torch.autograd.grad(out, z, randn(gen, 2, 6))
    assert torch.isfinite(grad).all()


def test_gradients_at_zeros_agree_between_backends(gen):
    z = randn(gen, 3, 8)
    z[0] = 0.0
    z[1, ::2] = 0.0
    z.requires_grad_(True)
    assert_backends_agree(lambda b: ff.signed_sqrt_l2(z, backend=b), [z], gen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_to_its_row_only(gen, backend):
    z = randn(gen, 3, 5)
    z[1, 2] = float("nan")
    out = ff.signed_sqrt_l2(z, backend=backend)
    assert torch.isnan(out[1]).any(), "a NaN input must not be hidden"
    assert torch.isfinite(out[[0, 2]]).all(), "a NaN must not leak into other rows"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(gen, backend):
    # |z| >= 0.5: finite differences jump at z = 0 (sign) and blow up near it (sqrt).
    z = away_from_zero(gen, 3, 7, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ff.signed_sqrt_l2(t, backend=backend), (z,))
    assert torch.autograd.gradcheck(lambda t: ff.signed_sqrt_l2(t, 0.25, backend=backend), (z,))


@pytest.mark.parametrize("shape", [(1, 7), (2, 3, 5)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("eps", [1e-12, 0.5])
def test_torch_backend_gradients_equal_eager(gen, shape, layout, eps):
    z = randn(gen, *shape, layout=layout, requires_grad=True)
    assert_backends_agree(lambda b: ff.signed_sqrt_l2(z, eps, backend=b), [z], gen)


def test_tiny_norm_below_eps_gradients_agree(gen):
    # ||s|| < eps: the denominator is the constant eps, a separate branch of the backward.
    z = (randn(gen, 2, 5) * 1e-30).requires_grad_(True)
    assert_backends_agree(lambda b: ff.signed_sqrt_l2(z, 0.1, backend=b), [z], gen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(gen, dtype):
    z = randn(gen, 8, 33)
    errors = assert_low_precision(lambda t, b: ff.signed_sqrt_l2(t[0], backend=b), [z], dtype, gen, cap=1e-2, grad_cap=1e-2)
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
