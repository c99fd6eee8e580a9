"""low_rank_fusion (LMF): out = sum_r w_r prod_m ([1; x_m] W_m[r]) + b, with factors
W_m (rank, n_m + 1, h) in the official layout (constant row first). Checked against the
definition written as loops, and against TFN with W = sum_r w_r (x)_m W_m[r]."""

import math

import pytest
import torch

import fastfusion as ff
from helpers import LAYOUTS, assert_backends_agree, assert_rel_close, assert_low_precision, randn
from oracles import lmf_oracle

BACKENDS = ("torch", "eager")


def lmf_params(gen, in_dims, rank, hidden, *, flat_shapes=False, requires_grad=False):
    """factors, weights (1, rank) and bias (1, h) as the official code, or (rank,) and (h,)."""
    factors = [randn(gen, rank, n + 1, hidden, layout=LAYOUTS[m % 3], requires_grad=requires_grad) for m, n in enumerate(in_dims)]
    weights = randn(gen, rank, requires_grad=requires_grad) if flat_shapes else randn(gen, 1, rank, requires_grad=requires_grad)
    bias = randn(gen, hidden, requires_grad=requires_grad) if flat_shapes else randn(gen, 1, hidden, requires_grad=requires_grad)
    return factors, weights, bias



def modality_inputs(gen, lead, in_dims, requires_grad=False):
    return [randn(gen, *lead, n, layout=LAYOUTS[(m + 1) % 3], requires_grad=requires_grad) for m, n in enumerate(in_dims)]


CASES = [((1,), (3, 4), 1), ((5,), (2, 3, 4), 3), ((2, 3), (4, 1), 2), ((3,), (2, 2, 1, 3), 4)]  # lead, in_dims, rank


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead, in_dims, rank", CASES)
@pytest.mark.parametrize("flat_shapes", [False, True])
def test_matches_definition(gen, backend, lead, in_dims, rank, flat_shapes):
    xs = modality_inputs(gen, lead, in_dims)
    factors, weights, bias = lmf_params(gen, in_dims, rank, 5, flat_shapes=flat_shapes)
    out = ff.low_rank_fusion(xs, factors, weights, bias, backend=backend)
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
    expected = ff.tensor_fusion(xs, tfn_weight, bias.reshape(-1), backend=backend)
    out = ff.low_rank_fusion(xs, factors, weights, bias, backend=backend)
    assert_rel_close(out, expected, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dims, rank", [((3, 2), 2), ((2, 1, 3), 3)])
def test_gradcheck(gen, backend, in_dims, rank):
    m = len(in_dims)
    xs = modality_inputs(gen, (2,), in_dims, requires_grad=True)
    factors, weights, bias = lmf_params(gen, in_dims, rank, 3, requires_grad=True)

    def fn(*leaves):
        return ff.low_rank_fusion(list(leaves[:m]), list(leaves[m : 2 * m]), leaves[2 * m], leaves[2 * m + 1], backend=backend)

    assert torch.autograd.gradcheck(fn, xs + factors + [weights, bias])


@pytest.mark.parametrize("lead, in_dims, rank", CASES)
@pytest.mark.parametrize("flat_shapes", [False, True])
def test_torch_backend_gradients_equal_eager(gen, lead, in_dims, rank, flat_shapes):
    xs = modality_inputs(gen, lead, in_dims, requires_grad=True)
    factors, weights, bias = lmf_params(gen, in_dims, rank, 7, flat_shapes=flat_shapes, requires_grad=True)
    assert_backends_agree(
        lambda b: ff.low_rank_fusion(xs, factors, weights, bias, backend=b), xs + factors + [weights, bias], gen
    )


@pytest.mark.parametrize("dtype, cap", [(torch.bfloat16, 1.5e-2), (torch.float16, 2e-3)])
def test_low_precision(gen, dtype, cap):
    in_dims = (12, 10, 8)
    xs = [randn(gen, 8, n) for n in in_dims]
    factors, weights, bias = lmf_params(gen, in_dims, 4, 9)

    def fn(t, b):
        return ff.low_rank_fusion(t[:3], t[3:6], t[6], t[7], backend=b)

    assert_low_precision(fn, xs + [f / 3 for f in factors] + [weights, bias], dtype, gen, cap=cap, grad_cap=cap)
