"""count_sketch: C(x)_j = sum_{i: h(i) = j} s(i) x_i, checked against the dense matrix form
x @ S with S[i, h(i)] = s(i), plus gradients (gradcheck, and the "torch" backend's explicit
adjoint against PyTorch's autograd of the reference) and low precision."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastfusion as ff
from helpers import LAYOUTS, assert_backends_agree, assert_rel_close, assert_low_precision, randn, random_hashes_signs
from oracles import dense_sketch_matrix

BACKENDS = ("torch", "eager")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "lead, n, d",
    [((1,), 7, 5), ((4,), 13, 16), ((3, 2), 5, 11), ((), 9, 1), ((2,), 3, 31)],  # B = 1, d = 1, d > n
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_dense_matrix(gen, backend, lead, n, d, layout):
    x = randn(gen, *lead, n, layout=layout)
    (hash,), (sign,) = random_hashes_signs(gen, [n], d)
    out = ff.count_sketch(x, hash, sign, d, backend=backend)
    expected = x.contiguous() @ dense_sketch_matrix(hash, sign, d)
    assert out.dtype == x.dtype
    # Every bucket sums at most n float64 values: only the summation order may differ.
    assert_rel_close(out, expected, 1e-14)


@pytest.mark.parametrize("hash_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("sign_dtype", [torch.int8, torch.int64, torch.float32, torch.float64])
def test_index_and_sign_dtypes(gen, hash_dtype, sign_dtype):
    x = randn(gen, 3, 10)
    (hash,), (sign,) = random_hashes_signs(gen, [10], 7, hash_dtype=hash_dtype, sign_dtype=sign_dtype)
    expected = x @ dense_sketch_matrix(hash, sign, 7)
    for backend in BACKENDS:
        assert_rel_close(ff.count_sketch(x, hash, sign, 7, backend=backend), expected, 1e-14, backend)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    n=st.integers(1, 20),
    d=st.integers(1, 20),
    seed=st.integers(0, 2**31),
)
def test_matches_dense_matrix_any_shape(lead, n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, *lead, n)
    (hash,), (sign,) = random_hashes_signs(gen, [n], d)
    expected = x @ dense_sketch_matrix(hash, sign, d)
    assert_rel_close(ff.count_sketch(x, hash, sign, d, backend="torch"), expected, 1e-14)


def test_adjoint_identity(gen):
    # <C x, g> = <x, C^T g>, with C^T g = S g: the backward must be the exact adjoint.
    x = randn(gen, 4, 9, requires_grad=True)
    (hash,), (sign,) = random_hashes_signs(gen, [9], 6)
    g = randn(gen, 4, 6)
    (grad,) = torch.autograd.grad(ff.count_sketch(x, hash, sign, 6, backend="torch"), x, g)
    assert_rel_close(grad, g @ dense_sketch_matrix(hash, sign, 6).T, 1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(gen, backend):
    x = randn(gen, 3, 7, layout="strided", requires_grad=True)
    (hash,), (sign,) = random_hashes_signs(gen, [7], 5)
    assert torch.autograd.gradcheck(lambda t: ff.count_sketch(t, hash, sign, 5, backend=backend), (x,))


@pytest.mark.parametrize("lead, n, d", [((1,), 7, 5), ((3, 2), 6, 9)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_backend_gradients_equal_eager(gen, lead, n, d, layout):
    x = randn(gen, *lead, n, layout=layout, requires_grad=True)
    (hash,), (sign,) = random_hashes_signs(gen, [n], d)
    assert_backends_agree(lambda b: ff.count_sketch(x, hash, sign, d, backend=b), [x], gen)


@pytest.mark.parametrize("dtype, cap", [(torch.bfloat16, 8e-3), (torch.float16, 1e-3)])
def test_low_precision(gen, dtype, cap):
    x = randn(gen, 16, 64)
    (hash,), (sign,) = random_hashes_signs(gen, [64], 24)
    errors = assert_low_precision(lambda t, b: ff.count_sketch(t[0], hash, sign, 24, backend=b), [x], dtype, gen, cap=cap, grad_cap=0)
    assert errors["grad 0"][0] == 0  # the backward is a signed gather: exact in any dtype
