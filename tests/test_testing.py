"""fastfusion.testing: the rule on hand-made errors (each bound met and broken), every op and
backend at odd sizes in three dtypes, gradcheck, and bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.gradcheck import GradcheckError

import fastfusion as ff
from fastfusion.testing import Comparison, assert_matches_reference, error_bound, gradcheck, rel_err

from helpers import backend_device, backends_under_test

F32_EPS = torch.finfo(torch.float32).eps
BACKENDS = ["auto", *(b for b in backends_under_test() if b != "eager")]


class _ScaledGradient(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``scale``: a backend with a wrong
    gradient and a right output."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scaled(factor: float, gradient_factor: float = 1.0):
    """fn(x, backend): x * 1 on the reference, x * factor (gradient * gradient_factor) on
    any other backend. x * 1 is exact in every dtype, so PyTorch's own error is 0."""

    def fn(x, backend):
        if backend == "eager":
            return x * 1.0
        return _ScaledGradient.apply(x * factor, gradient_factor)

    return fn


def leaf(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype).requires_grad_()


# --------------------------------------------------------------------------- the rule


def test_rel_err_by_hand():
    assert rel_err(torch.tensor([3.0, 4.5]), torch.tensor([3.0, 4.0])) == pytest.approx(0.1)
    assert rel_err(torch.tensor([1.0, 1.0], dtype=torch.bfloat16), torch.tensor([1.0, 0.0])) == 1.0
    with pytest.raises(ValueError, match="all zeros"):
        rel_err(torch.ones(3), torch.zeros(3))


def test_error_bound_by_dtype():
    assert error_bound(1e-3, 2e-3, torch.bfloat16) == 4e-3  # no floor in half precision
    assert error_bound(0.0, 0.0, torch.float16) == 0.0
    assert error_bound(1e-9, 1e-9, torch.float32) == 2 * F32_EPS
    assert error_bound(1e-6, 1e-8, torch.float32) == 2e-6
    assert error_bound(0.0, 0.0, torch.float64) == 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_floor_is_met_and_broken(dtype):
    # Relative changes of 0.4 and 3 times the floor's own bound: 2 eps (float32), 1e-12 (float64).
    bound = 2 * F32_EPS if dtype == torch.float32 else 1e-12
    x = leaf(50, 7, dtype=dtype)
    ok = assert_matches_reference(scaled(1 + 0.4 * bound), [x], backend="other")
    assert ok["output"].error <= bound and ok["output"].eager_error == 0
    with pytest.raises(AssertionError, match="output: error") as failure:
        assert_matches_reference(scaled(1 + 3 * bound), [x], backend="other")
    assert "grad 0: error" in str(failure.value)  # x * factor: its gradient is off by factor too


def test_half_precision_has_no_floor():
    x = leaf(64, 9, dtype=torch.bfloat16)
    assert assert_matches_reference(scaled(1.0), [x], backend="other")["output"] == Comparison(0.0, 0.0, 0.0, 0.0)
    with pytest.raises(AssertionError, match="output: error"):  # 1 + 2^-7 changes most values by an ulp
        assert_matches_reference(scaled(1 + 2**-7), [x], backend="other")


def test_a_wrong_gradient_is_named():
    x, y = leaf(30, 11, seed=1), leaf(30, 11, seed=2)

    def fn(x, y, backend):
        return scaled(1.0, gradient_factor=1 + 1e-4)(x, backend) * y

    with pytest.raises(AssertionError) as failure:
        assert_matches_reference(fn, [x, y], backend="other")
    assert "grad 0" in str(failure.value) and "grad 1" not in str(failure.value) and "output" not in str(failure.value)


def test_twice_pytorchs_own_error_is_the_limit():
    # (x + 1e4) - 1e4 in float32 keeps ~10 of x's bits: PyTorch's own error, about 1e-4. A
    # backend whose error vector is (1 + k) times that one has (1 + k) times its error (the
    # final rounding to float32 adds ~1e-7).
    x = leaf(200, seed=3)
    cancel = lambda x: (x + 1e4) - 1e4  # noqa: E731

    def off_by(k):
        def fn(x, backend):
            own = cancel(x)
            return own if backend == "eager" else (own.double() + k * (own.double() - x.double())).to(x.dtype)

        return fn

    passed = assert_matches_reference(off_by(0.5), [x], backend="other")["output"]
    assert passed.eager_error > 1e-5 and passed.error == pytest.approx(1.5 * passed.eager_error, rel=1e-2)
    with pytest.raises(AssertionError, match="output: error"):
        assert_matches_reference(off_by(1.5), [x], backend="other")


def test_factor_and_floor_loosen_the_rule_only_as_asked():
    # The same construction: 2.5x PyTorch's own error breaks the rule, passes with factor 3,
    # and a floor above both errors passes it too; nonsense values are refused by name.
    x = leaf(200, seed=3)

    def fn(x, backend):
        own = (x + 1e4) - 1e4
        return own if backend == "eager" else (own.double() + 1.5 * (own.double() - x.double())).to(x.dtype)

    with pytest.raises(AssertionError, match="2 x max"):
        assert_matches_reference(fn, [x], backend="other")
    assert assert_matches_reference(fn, [x], backend="other", factor=3)["output"].bound > 0

    def scaled_wrong(x, backend):  # a 1e-3 relative error on top: far beyond 3x
        return fn(x, backend) * (1 if backend == "eager" else 1 + 1e-3)

    with pytest.raises(AssertionError, match="3 x max"):
        assert_matches_reference(scaled_wrong, [x], backend="other", factor=3)
    assert assert_matches_reference(fn, [x], backend="other", floor=1e-2)["output"].bound == 2e-2
    with pytest.raises(ValueError, match="factor"):
        assert_matches_reference(fn, [x], backend="other", factor=0.5)
    with pytest.raises(ValueError, match="floor"):
        assert_matches_reference(fn, [x], backend="other", floor=-1.0)


def test_an_all_zero_reference_is_compared_absolutely():
    x, y = leaf(8, 5), leaf(8, 5, seed=1)

    def fn(x, y, backend):  # the gradient w.r.t. y is 0: exactly on the reference
        return x + y * (0.0 if backend == "eager" else 1e-3)

    with pytest.raises(AssertionError, match=r"grad 1: error \d"):
        assert_matches_reference(fn, [x, y], backend="other")
    exact_zero = assert_matches_reference(lambda x, y, backend: x + 0 * y, [x, y], backend="other")
    assert exact_zero["grad 1"] == Comparison(0.0, 0.0, 0.0, 2 * F32_EPS)


def test_non_finite_results_and_wrong_shapes_fail():
    x = leaf(4, 6)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_matches_reference(lambda x, backend: x / (0.0 if backend != "eager" else 1.0), [x], backend="other")
    with pytest.raises(AssertionError, match="shape"):
        assert_matches_reference(lambda x, backend: x if backend == "eager" else x[:, :5], [x], backend="other")
    with pytest.raises(ValueError, match="reference is not finite"):
        assert_matches_reference(lambda x, backend: x / 0.0, [x], backend="other")


def test_bad_arguments_are_named():
    x = leaf(3)
    fn = lambda x, backend: x  # noqa: E731
    with pytest.raises(ValueError, match="backend='eager' is the reference"):
        assert_matches_reference(fn, [x], backend="eager")
    with pytest.raises(TypeError, match="inputs must be a list or tuple"):
        assert_matches_reference(fn, x, backend="torch")
    with pytest.raises(TypeError, match="backend must be"):
        assert_matches_reference(fn, [x], backend=None)
    with pytest.raises(TypeError, match="fn must be callable"):
        assert_matches_reference("fn", [x], backend="torch")
    with pytest.raises(TypeError, match="must return a floating tensor"):
        assert_matches_reference(lambda x, backend: 3, [x], backend="torch")
    with pytest.raises(ValueError, match="no floating tensor requires grad"):
        gradcheck(fn, [x.detach()], backend="torch")


# --------------------------------------------------------------------------- every op


def _sketch(gen, dims, d):
    hashes = [torch.randint(d, (n,), generator=gen) for n in dims]
    signs = [(torch.randint(2, (n,), generator=gen) * 2 - 1).to(torch.int8) for n in dims]
    return hashes, signs


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _count_sketch(gen):
    (h,), (s,) = _sketch(gen, [37], 23)
    return (lambda x, backend: ff.count_sketch(x, h.to(x.device), s.to(x.device), 23, backend=backend)), [_randn(gen, 5, 7, 37)]


def _compact_bilinear(gen, algorithm="fft", dims=(13, 11), d=29, lead=(4, 6)):
    # No normalisation: the signed square root of values near 0 amplifies any rounding,
    # PyTorch's own too, and the errors of both runs are then too erratic for a 2x rule.
    hashes, signs = _sketch(gen, dims, d)
    pool_dim = 1 if len(lead) == 2 else None

    def fn(xs, gate, backend):
        on = xs[0].device
        return ff.compact_bilinear(
            xs, [h.to(on) for h in hashes], [s.to(on) for s in signs], d, pool_dim=pool_dim, gate=gate, normalize=False, backend=backend, algorithm=algorithm
        )

    return fn, [[_randn(gen, *lead, n) for n in dims], torch.rand(lead[0], d, generator=gen, dtype=torch.float64) + 0.5]


def _factorized_bilinear(gen):
    def fn(x, y, wx, bx, wy, by, backend):  # unnormalised: see _compact_bilinear
        return ff.factorized_bilinear(x, y, wx, bx, wy, by, 3, normalize=False, backend=backend)

    return fn, [_randn(gen, 10, 13), _randn(gen, 10, 11), _randn(gen, 15, 13) / 4, _randn(gen, 15), _randn(gen, 15, 11) / 4, _randn(gen, 15)]


def _low_rank_fusion(gen, dims=(7, 5, 3)):
    fn = lambda xs, factors, w, b, backend: ff.low_rank_fusion(xs, factors, w, b, backend=backend)  # noqa: E731
    return fn, [[_randn(gen, 9, n) for n in dims], [_randn(gen, 4, n + 1, 11) / 3 for n in dims], _randn(gen, 4), _randn(gen, 11)]


def _tensor_fusion(gen, dims=(6, 4, 3)):
    fn = lambda xs, w, b, backend: ff.tensor_fusion(xs, w, b, backend=backend)  # noqa: E731
    return fn, [[_randn(gen, 9, n) for n in dims], _randn(gen, 13, math.prod(n + 1 for n in dims)) / 8, _randn(gen, 13)]


CASES = {
    "count_sketch": _count_sketch,
    "signed_sqrt_l2": lambda g: ((lambda z, backend: ff.signed_sqrt_l2(z, backend=backend)), [_randn(g, 9, 41)]),
    "compact_bilinear fft pooled gated": _compact_bilinear,
    "compact_bilinear gram pooled gated": lambda g: _compact_bilinear(g, "gram"),
    "compact_bilinear M=3": lambda g: _compact_bilinear(g, dims=(9, 7, 5), d=31, lead=(12,)),
    "factorized_bilinear": _factorized_bilinear,
    "low_rank_fusion": _low_rank_fusion,
    "tensor_fusion": _tensor_fusion,
}


def _as(inputs, dtype, device):
    """Every floating tensor cast and requiring grad, through lists; the rest as given."""
    if isinstance(inputs, list):
        return [_as(t, dtype, device) for t in inputs]
    return inputs.to(device, dtype).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_every_op_and_backend_matches(gen, case, backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and backend_device(backend).type == "cpu":
        # Measured: its conversions to bfloat16 truncate, with twice the error of rounding to
        # nearest, which is what PyTorch does; no 2x rule can hold. On a GPU this case runs.
        pytest.skip("Triton's CPU interpreter truncates to bfloat16 instead of rounding")
    fn, inputs = CASES[case](gen)
    device = backend_device(backend)
    comparisons = assert_matches_reference(fn, _as(inputs, dtype, device), backend=backend, generator=gen)
    leaves = sum(len(t) if isinstance(t, list) else 1 for t in inputs)
    assert len(comparisons) == 1 + leaves  # the output and every gradient were compared
    assert all(c.error <= c.bound for c in comparisons.values())


def test_gradient_names_follow_the_inputs():
    fn, inputs = _low_rank_fusion(torch.Generator().manual_seed(0))
    xs, factors, w, b = _as(inputs, torch.float64, "cpu")
    names = assert_matches_reference(fn, [xs, factors, w.detach(), b], backend="torch").keys()
    assert list(names) == ["output", "grad 0[0]", "grad 0[1]", "grad 0[2]", "grad 1[0]", "grad 1[1]", "grad 1[2]", "grad 3"]


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["count_sketch", "compact_bilinear gram pooled gated", "compact_bilinear M=3", "low_rank_fusion", "tensor_fusion"])
def test_gradcheck_every_backend(gen, case, backend):
    small = {
        "count_sketch": _count_sketch,
        "compact_bilinear gram pooled gated": lambda g: _compact_bilinear(g, "gram", dims=(3, 2), d=5, lead=(2, 3)),
        "compact_bilinear M=3": lambda g: _compact_bilinear(g, dims=(3, 2, 2), d=7, lead=(2,)),
        "low_rank_fusion": lambda g: _low_rank_fusion(g, dims=(2, 3)),
        "tensor_fusion": lambda g: _tensor_fusion(g, dims=(2, 1, 2)),
    }
    fn, inputs = small[case](gen)
    device = backend_device(backend)
    # float32 inputs: gradcheck itself works on float64 copies.
    assert gradcheck(fn, _as(inputs, torch.float32, device), backend=backend, fast_mode=case == "count_sketch")


def test_gradcheck_catches_a_wrong_gradient():
    x = leaf(3, 4, dtype=torch.float64)
    with pytest.raises(GradcheckError, match="Jacobian mismatch"):
        gradcheck(scaled(1.0, gradient_factor=1.01), [x], backend="other")
    assert gradcheck(scaled(1.0), [x], backend="other")


def test_the_docstring_example():
    def fusion(x, y, weight, backend):
        return ff.tensor_fusion([x, y], weight, None, backend=backend)

    x = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(64, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(128, 33 * 17) / 24).bfloat16().requires_grad_()
    assert set(assert_matches_reference(fusion, [x, y, weight], backend="auto")) == {"output", "grad 0", "grad 1", "grad 2"}
    assert gradcheck(fusion, [x[:3, :4], y[:3, :2], weight[:5, :15]], backend="auto")
