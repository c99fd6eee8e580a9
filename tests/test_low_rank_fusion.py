"""low_rank_fusion (LMF): out = sum_r w_r prod_m ([1; x_m] W_m[r]) + b, with factors
W_m (rank, n_m + 1, h) in the official layout (constant row first). Checked against the
definition written as loops, against TFN with W = sum_r w_r (x)_m W_m[r], and every backend's
output and gradients against the float64 "eager" reference by the suite's one rule, in every
dtype of the case table. Every test runs on every backend under test, each on its device."""

import math

import pytest
import torch

import fastfusion as ff

from helpers import (
    ALL_DTYPES,
    F32,
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
from oracles import lmf_oracle

BACKENDS = backends_under_test()


def lmf_params(gen, in_dims, rank, hidden, *, flat_shapes=False, requires_grad=False):
    """factors, weights (1, rank) and bias (1, h) as the official code, or (rank,) and (h,)."""
    factors = [randn(gen, rank, n + 1, hidden, layout=LAYOUTS[m % 3], requires_grad=requires_grad) for m, n in enumerate(in_dims)]
    weights = randn(gen, rank, requires_grad=requires_grad) if flat_shapes else randn(gen, 1, rank, requires_grad=requires_grad)
    bias = randn(gen, hidden, requires_grad=requires_grad) if flat_shapes else randn(gen, 1, hidden, requires_grad=requires_grad)
    return factors, weights, bias



def modality_inputs(gen, lead, in_dims, requires_grad=False):
    return [randn(gen, *lead, n, layout=LAYOUTS[(m + 1) % 3], requires_grad=requires_grad) for m, n in enumerate(in_dims)]


CASES = [((1,), (3, 4), 1), ((5,), (2, 3, 4), 3), ((2, 3), (4, 1), 2), ((3,), (2, 2, 1, 3), 4)]  # lead, in_dims, rank


def fusion_case(lead, in_dims, rank, hidden, flat_shapes=True, layout=None):
    """A Case builder: modalities and factors cycle through the layouts (modalities all in
    ``layout`` when given, the factors contiguous)."""

    def build(gen):
        if layout is None:
            xs = modality_inputs(gen, lead, in_dims, requires_grad=True)
            factors, weights, bias = lmf_params(gen, in_dims, rank, hidden, flat_shapes=flat_shapes, requires_grad=True)
        else:
            xs = [randn(gen, *lead, n, layout=layout, requires_grad=True) for n in in_dims]
            factors = [randn(gen, rank, n + 1, hidden, requires_grad=True) for n in in_dims]
            weights, bias = randn(gen, rank, requires_grad=True), randn(gen, hidden, requires_grad=True)
        m = len(in_dims)

        def fn(*t, backend):
            return ff.low_rank_fusion(list(t[:m]), list(t[m : 2 * m]), t[2 * m], t[2 * m + 1], backend=backend)

        return fn, xs + factors + [weights, bias]

    return build


ONE = "a result of one value: below the rule's resolution"
FEW = "a result of at most 10 values: below the rule's resolution"

# The one case table: official and flat parameter shapes, B = 1, rank 1, M = 2 to 4, every
# layout; several B, h and K blocks of the Triton forward and B blocks of its backward
# (B = 37, n = 33, h = 40), several h blocks of its grad_proj kernel (h = 130).
CONFORMANCE = {
    **{
        f"{lead} {in_dims} rank {rank} {'flat' if flat else 'official'}": Case(fusion_case(lead, in_dims, rank, 7, flat), (F64,))
        for lead, in_dims, rank in CASES
        for flat in (False, True)
    },
    "B=3 (2, 3, 4) rank 3": Case(fusion_case((3,), (2, 3, 4), 3, 5)),
    # grad of x_1 (1, 1): one value.
    "M=2 B=1 rank 1": Case(fusion_case((1,), (3, 1), 1, 5), loose=(("cpp", F32), ("triton", F32)), why=ONE),
    "B=4 (5, 2) transposed": Case(fusion_case((4,), (5, 2), 3, 5, layout="transposed")),
    # grad of the weights (rank 1): one value.
    "B=1 (3, 4) rank 1": Case(fusion_case((1,), (3, 4), 1, 5), ALL_DTYPES, loose=(("torch", HALF[0]),), why=ONE),
    "B=5 (5, 2, 6) rank 3, transposed": Case(fusion_case((5,), (5, 2, 6), 3, 7, layout="transposed"), ALL_DTYPES),
    # grad of the weights (rank 2): two values.
    "B=5 (33, 2) rank 2, transposed": Case(
        fusion_case((5,), (33, 2), 2, 17, layout="transposed"), ALL_DTYPES, loose=(("triton", F32),), why=FEW
    ),
    "B=37 (3, 33) rank 2 h=40, transposed": Case(fusion_case((37,), (3, 33), 2, 40, layout="transposed"), ALL_DTYPES),
    # grad of x_0 (5, 2): ten values.
    "B=5 (2, 3, 4, 2) rank 2 h=130, transposed": Case(
        fusion_case((5,), (2, 3, 4, 2), 2, 130, layout="transposed"), ALL_DTYPES, loose=(("torch", F32),), why=FEW
    ),
}


@pytest.mark.parametrize("case, backend, dtype", conformance_params(CONFORMANCE))
def test_conforms(gen, case, backend, dtype):
    fn, inputs = CONFORMANCE[case].build(gen)
    assert_conforms(fn, inputs, backend, dtype, gen, **CONFORMANCE[case].tolerance(backend, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead, in_dims, rank", CASES)
@pytest.mark.parametrize("flat_shapes", [False, True])
def test_matches_definition(gen, backend, lead, in_dims, rank, flat_shapes):
    xs = modality_inputs(gen, lead, in_dims)
    factors, weights, bias = lmf_params(gen, in_dims, rank, 5, flat_shapes=flat_shapes)
    out = ff.low_rank_fusion(*to_backend([xs, factors, weights, bias], backend), backend=backend)
    assert_rel_close(out, lmf_oracle(xs, factors, weights, bias), 1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dims", [(3, 4), (2, 3, 4)])
@pytest.mark.parametrize("flat_shapes", [False, True])
def test_equals_tensor_fusion_with_summed_factor_tensor(gen, backend, in_dims, flat_shapes):
    rank, hidden = 3, 6
    xs = modality_inputs(gen, (4,), in_dims)
    factors, weights, bias = lmf_params(gen, in_dims, rank, hidden, flat_shapes=flat_shapes)
    # W[i_1, ..., i_M, :] = sum_r w_r prod_m W_m[r, i_m, :]; TFN wants (h, prod(n_m + 1)) with
    # the index tuple flattened modality-0-major, i.e. C order.
    letters = "abcdefgh"[: len(in_dims)]
    spec = ",".join(f"r{c}z" for c in letters) + f",r->{letters}z"
    full = torch.einsum(spec, *factors, weights.reshape(-1))
    tfn_weight = full.reshape(math.prod(n + 1 for n in in_dims), hidden).T
    # Both on the CPU's reference backend: the identity is checked, not a kernel.
    expected = ff.tensor_fusion(xs, tfn_weight, bias.reshape(-1), backend="eager")
    out = ff.low_rank_fusion(*to_backend([xs, factors, weights, bias], backend), backend=backend)
    assert_rel_close(out, expected, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dims, rank", [((3, 2), 2), ((2, 1, 3), 3), ((2, 1, 2), 2)])
def test_gradcheck(gen, backend, in_dims, rank):
    m = len(in_dims)
    xs = modality_inputs(gen, (2,), in_dims, requires_grad=True)
    factors, weights, bias = lmf_params(gen, in_dims, rank, 3, requires_grad=True)

    def fn(*leaves):
        return ff.low_rank_fusion(list(leaves[:m]), list(leaves[m : 2 * m]), leaves[2 * m], leaves[2 * m + 1], backend=backend)

    # Tighter than gradcheck's defaults (the C++ suite's): the op is a polynomial.
    leaves = to_backend(xs + factors + [weights, bias], backend)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend, dtype", backend_dtype_params(HALF))
def test_low_precision(gen, backend, dtype):
    cap = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3}[dtype]
    in_dims = (12, 10, 8)
    xs = [randn(gen, 8, n, requires_grad=True) for n in in_dims]
    factors, weights, bias = lmf_params(gen, in_dims, 4, 9)

    def fn(*t, backend):
        return ff.low_rank_fusion(list(t[:3]), list(t[3:6]), t[6], t[7], backend=backend)

    inputs = xs + [(f / 3).requires_grad_(True) for f in factors] + [weights.requires_grad_(True), bias.requires_grad_(True)]
    assert_low_precision(fn, inputs, dtype, gen, backend=backend, cap=cap, grad_cap=cap)
