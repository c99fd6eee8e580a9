"""tensor_fusion (TFN): out = W vec([1; x_1] (x) ... (x) [1; x_M]) + b, flattened
modality-0-major, W in nn.Linear layout (h, prod_m (n_m + 1)); checked against an explicit
loop over index tuples, and every backend's output and gradients against the float64
"eager" reference by the suite's one rule, in every dtype of the case table. Every test runs
on every backend under test, each on its device."""

import itertools
import math

import pytest
import torch

import fastfusion as ff

from helpers import (
    ALL_DTYPES,
    F64,
    HALF,
    LAYOUTS,
    Case,
    assert_conforms,
    assert_low_precision,
    assert_rel_close,
    backend_dtype_params,
    backends_under_test,
    conformance_params,
    randn,
    to_backend,
)
from oracles import tfn_oracle

BACKENDS = backends_under_test()



def tfn_params(gen, in_dims, hidden, with_bias=True, requires_grad=False):
    fused = math.prod(n + 1 for n in in_dims)
    weight = randn(gen, hidden, fused, layout="strided", requires_grad=requires_grad)
    bias = randn(gen, hidden, requires_grad=requires_grad) if with_bias else None
    return weight, bias


def modality_inputs(gen, lead, in_dims, requires_grad=False):
    return [randn(gen, *lead, n, layout=LAYOUTS[m % 3], requires_grad=requires_grad) for m, n in enumerate(in_dims)]


def fusion_case(lead, in_dims, hidden, with_bias=True, layout=None):
    """A Case builder: the modalities cycle through the layouts (all ``layout`` when given,
    the weight too), the weight is strided otherwise."""

    def build(gen):
        if layout is None:
            xs = modality_inputs(gen, lead, in_dims, requires_grad=True)
            weight, bias = tfn_params(gen, in_dims, hidden, with_bias, requires_grad=True)
        else:
            xs = [randn(gen, *lead, n, layout=layout, requires_grad=True) for n in in_dims]
            weight = randn(gen, hidden, math.prod(n + 1 for n in in_dims), layout=layout, requires_grad=True)
            bias = randn(gen, hidden, requires_grad=True) if with_bias else None
        m = len(in_dims)

        def fn(*t, backend):
            return ff.tensor_fusion(list(t[:m]), t[m], t[m + 1] if with_bias else None, backend=backend)

        return fn, xs + [weight] + ([bias] if with_bias else [])

    return build


CASES = [((1,), (3, 4)), ((5,), (2, 3, 4)), ((2, 3), (4, 1)), ((3,), (2, 2, 1, 3))]  # lead, in_dims

# The one case table: B = 1, M = 2 to 4, leading dimensions, every layout; the split of the
# modalities into two groups not after the first ((1, 1, 40)); more rows than one batch chunk
# of the C++ kernels (they bound the buffers at 2^22 values); a trailing modality across two
# of the Triton dx kernel's j chunks ((2, 1, 20)).
CONFORMANCE = {
    **{
        f"{lead} {in_dims} bias={with_bias}": Case(fusion_case(lead, in_dims, 7, with_bias), (F64,))
        for lead, in_dims in CASES
        for with_bias in (True, False)
    },
    "B=3 (2, 3, 4)": Case(fusion_case((3,), (2, 3, 4), 5)),
    "M=2 B=1 no bias": Case(fusion_case((1,), (3, 2), 5, False)),
    "M=4 strided": Case(fusion_case((2,), (2, 1, 3, 2), 5)),
    "split after two": Case(fusion_case((3,), (1, 1, 40), 2)),
    "two batch chunks": Case(fusion_case((300,), (255, 3), 64), interpret=False),
    "B=1 (3, 4)": Case(fusion_case((1,), (3, 4), 5), ALL_DTYPES),
    "B=5 (5, 2, 6) no bias, transposed": Case(fusion_case((5,), (5, 2, 6), 7, False, "transposed"), ALL_DTYPES),
    "B=5 (17, 2), transposed": Case(fusion_case((5,), (17, 2), 19, True, "transposed"), ALL_DTYPES),
    "B=3 (2, 1, 20) no bias, transposed": Case(fusion_case((3,), (2, 1, 20), 6, False, "transposed"), ALL_DTYPES),
}


@pytest.mark.parametrize("case, backend, dtype", conformance_params(CONFORMANCE))
def test_conforms(gen, case, backend, dtype):
    fn, inputs = CONFORMANCE[case].build(gen)
    assert_conforms(fn, inputs, backend, dtype, gen, **CONFORMANCE[case].tolerance(backend, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead, in_dims", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_definition(gen, backend, lead, in_dims, with_bias):
    xs = modality_inputs(gen, lead, in_dims)
    weight, bias = tfn_params(gen, in_dims, 5, with_bias)
    out = ff.tensor_fusion(*to_backend([xs, weight, bias], backend), backend=backend)
    assert_rel_close(out, tfn_oracle(xs, weight, bias), 1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_first_modality_zero_major(gen, backend):
    # One weight column at a time picks one product of the [1; x_m] entries; column
    # i_0 * (n_1 + 1) + i_1 must be x~_0[i_0] x~_1[i_1] with the constant at index 0.
    x0, x1 = randn(gen, 2, 3), randn(gen, 2, 2)
    for i0, i1 in itertools.product(range(4), range(3)):
        weight = torch.zeros(1, 12, dtype=torch.float64)
        weight[0, i0 * 3 + i1] = 1.0
        out = ff.tensor_fusion(*to_backend([[x0, x1], weight], backend), None, backend=backend).cpu()
        left = torch.ones(2) if i0 == 0 else x0[:, i0 - 1]
        right = torch.ones(2) if i1 == 0 else x1[:, i1 - 1]
        assert torch.equal(out[:, 0], left * right)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dims", [(3, 2), (2, 1, 3), (2, 1, 2)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck(gen, backend, in_dims, with_bias):
    xs = modality_inputs(gen, (2,), in_dims, requires_grad=True)
    weight, bias = tfn_params(gen, in_dims, 3, with_bias, requires_grad=True)
    m = len(xs)

    def fn(*leaves):
        return ff.tensor_fusion(list(leaves[:m]), leaves[m], leaves[m + 1] if with_bias else None, backend=backend)

    leaves = to_backend(xs + [weight] + ([bias] if with_bias else []), backend)
    # Tighter than gradcheck's defaults (the C++ suite's): the op is a polynomial.
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend, dtype", backend_dtype_params(HALF))
def test_low_precision(gen, backend, dtype):
    cap = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3}[dtype]
    in_dims = (6, 5, 4)
    xs = [randn(gen, 8, n, requires_grad=True) for n in in_dims]
    weight, bias = tfn_params(gen, in_dims, 9)

    def fn(*t, backend):
        return ff.tensor_fusion(list(t[:3]), t[3], t[4], backend=backend)

    inputs = xs + [(weight / 8).requires_grad_(True), bias.requires_grad_(True)]
    assert_low_precision(fn, inputs, dtype, gen, backend=backend, cap=cap, grad_cap=cap)


@pytest.mark.parametrize(
    "in_dims, hidden, expected",
    [
        # sizes n + 1 = (4, 3, 5), h = 5: h P_A + P_B is 5 + 60 = 65 before the first,
        # 5*4 + 15 = 35 after it, 5*12 + 5 = 65 after the second
        ((3, 2, 4), 5, 1),
        # (2, 2, 41), h = 2: 2 + 164 = 166, 2*2 + 82 = 86, 2*4 + 41 = 49
        ((1, 1, 40), 2, 2),
        # (2, 2, 2), h = 1: 1 + 8 = 9, then 2 + 4 = 6 either way; the first of equals
        ((1, 1, 1), 1, 1),
        ((7, 9), 3, 1),  # 3 + 80 = 83, 3*8 + 10 = 34
        # the models' heads: (33, 33), h = 128: 128 + 1089 = 1217 before the first, 128*33 + 33 = 4257 after
        ((32, 32), 128, 0),
    ],
)
def test_residual_split_minimises_the_buffers(in_dims, hidden, expected):
    from fastfusion.ops.tensor_fusion import residual_split

    assert residual_split(in_dims, hidden) == expected
