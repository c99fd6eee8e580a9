"""tensor_fusion (TFN): out = W vec([1; x_1] (x) ... (x) [1; x_M]) + b, flattened
modality-0-major, W in nn.Linear layout (h, prod_m (n_m + 1)); checked against an explicit
loop over index tuples."""

import itertools
import math

import pytest
import torch

import fastfusion as ff
from helpers import LAYOUTS, assert_backends_agree, assert_rel_close, assert_low_precision, randn
from oracles import tfn_oracle

BACKENDS = ("torch", "eager")



def tfn_params(gen, in_dims, hidden, with_bias=True, requires_grad=False):
    fused = math.prod(n + 1 for n in in_dims)
    weight = randn(gen, hidden, fused, layout="strided", requires_grad=requires_grad)
    bias = randn(gen, hidden, requires_grad=requires_grad) if with_bias else None
    return weight, bias


def modality_inputs(gen, lead, in_dims, requires_grad=False):
    return [randn(gen, *lead, n, layout=LAYOUTS[m % 3], requires_grad=requires_grad) for m, n in enumerate(in_dims)]


CASES = [((1,), (3, 4)), ((5,), (2, 3, 4)), ((2, 3), (4, 1)), ((3,), (2, 2, 1, 3))]  # lead, in_dims


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead, in_dims", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_definition(gen, backend, lead, in_dims, with_bias):
    xs = modality_inputs(gen, lead, in_dims)
    weight, bias = tfn_params(gen, in_dims, 5, with_bias)
    out = ff.tensor_fusion(xs, weight, bias, backend=backend)
    assert_rel_close(out, tfn_oracle(xs, weight, bias), 1e-13)


def test_constant_first_modality_zero_major(gen):
    # One weight column at a time picks one product of the [1; x_m] entries; column
    # i_0 * (n_1 + 1) + i_1 must be x~_0[i_0] x~_1[i_1] with the constant at index 0.
    x0, x1 = randn(gen, 2, 3), randn(gen, 2, 2)
    for i0, i1 in itertools.product(range(4), range(3)):
        weight = torch.zeros(1, 12, dtype=torch.float64)
        weight[0, i0 * 3 + i1] = 1.0
        out = ff.tensor_fusion([x0, x1], weight, None)
        left = torch.ones(2) if i0 == 0 else x0[:, i0 - 1]
        right = torch.ones(2) if i1 == 0 else x1[:, i1 - 1]
        assert torch.equal(out[:, 0], left * right)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dims", [(3, 2), (2, 1, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck(gen, backend, in_dims, with_bias):
    xs = modality_inputs(gen, (2,), in_dims, requires_grad=True)
    weight, bias = tfn_params(gen, in_dims, 3, with_bias, requires_grad=True)
    m = len(xs)

    def fn(*leaves):
        return ff.tensor_fusion(list(leaves[:m]), leaves[m], leaves[m + 1] if with_bias else None, backend=backend)

    assert torch.autograd.gradcheck(fn, xs + [weight] + ([bias] if with_bias else []))


@pytest.mark.parametrize("lead, in_dims", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_torch_backend_gradients_equal_eager(gen, lead, in_dims, with_bias):
    xs = modality_inputs(gen, lead, in_dims, requires_grad=True)
    weight, bias = tfn_params(gen, in_dims, 7, with_bias, requires_grad=True)
    leaves = xs + [weight] + ([bias] if with_bias else [])
    assert_backends_agree(lambda b: ff.tensor_fusion(xs, weight, bias, backend=b), leaves, gen)


@pytest.mark.parametrize("dtype, cap", [(torch.bfloat16, 1.5e-2), (torch.float16, 2e-3)])
def test_low_precision(gen, dtype, cap):
    in_dims = (6, 5, 4)
    xs = [randn(gen, 8, n) for n in in_dims]
    weight, bias = tfn_params(gen, in_dims, 9)

    def fn(t, b):
        return ff.tensor_fusion(t[:3], t[3], t[4], backend=b)

    assert_low_precision(fn, xs + [weight / 8, bias], dtype, gen, cap=cap, grad_cap=cap)
