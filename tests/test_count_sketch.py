"""count_sketch: C(x)_j = sum_{i: h(i) = j} s(i) x_i, checked against the dense matrix form
x @ S with S[i, h(i)] = s(i), plus gradients (gradcheck, and every backend's output and
gradients against the float64 "eager" reference by the suite's one rule, in every dtype of
the case table) and low precision.

Every test runs on every backend under test (helpers.backends_under_test), each on its
device (helpers.backend_device); the expected values are computed on the CPU."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
    backend_dtype_params,
    backends_under_test,
    conformance_params,
    randn,
    random_hashes_signs,
    to_backend,
)
from oracles import dense_sketch_matrix

BACKENDS = backends_under_test()


def sketch_case(lead, n, d, layout="contiguous", hash_dtype=torch.int64, sign_dtype=torch.int8, strided_sign=False):
    """A Case builder: x (lead + (n,)) in ``layout``, one hash and sign vector."""

    def build(gen):
        (h,), (s,) = random_hashes_signs(gen, [n], d, hash_dtype=hash_dtype, sign_dtype=sign_dtype)
        if strided_sign:  # a sign vector with stride 2
            s = torch.stack([s, -s], -1).reshape(-1)[::2]
        x = randn(gen, *lead, n, layout=layout, requires_grad=True)
        return (lambda x, backend: ff.count_sketch(x, h.to(x.device), s.to(x.device), d, backend=backend)), [x]

    return build


# The one case table: odd shapes, B = 1, d = 1, d > n, leading dimensions, every layout,
# index and sign dtypes, n past one block of the Triton kernels (131, 300).
CASES = {
    "3x7 d5": Case(sketch_case((3,), 7, 5)),
    "B=1 d>n": Case(sketch_case((1,), 4, 33)),
    "leading dims, int32 hash, float sign, strided": Case(
        sketch_case((2, 3), 9, 4, "strided", hash_dtype=torch.int32, sign_dtype=torch.float64)
    ),
    "transposed, strided float sign": Case(sketch_case((6,), 41, 19, "transposed", sign_dtype=torch.float32, strided_sign=True)),
    "1x37 d13": Case(sketch_case((1,), 37, 13)),
    "3x5x131 d67": Case(sketch_case((3, 5), 131, 67)),
    "4x300 d7": Case(sketch_case((4,), 300, 7)),
    "3x53 d29": Case(sketch_case((3,), 53, 29), ALL_DTYPES),
    **{
        f"{'x'.join(map(str, lead))}x{n} d{d} {layout}": Case(sketch_case(lead, n, d, layout), (F64,))
        for lead, n, d in [((1,), 7, 5), ((3, 2), 6, 9)]
        for layout in LAYOUTS
    },
}


@pytest.mark.parametrize("case, backend, dtype", conformance_params(CASES))
def test_conforms(gen, case, backend, dtype):
    fn, inputs = CASES[case].build(gen)
    assert_conforms(fn, inputs, backend, dtype, gen, **CASES[case].tolerance(backend, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "lead, n, d",
    [((1,), 7, 5), ((4,), 13, 16), ((3, 2), 5, 11), ((), 9, 1), ((2,), 3, 31)],  # B = 1, d = 1, d > n
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_dense_matrix(gen, backend, lead, n, d, layout):
    x = randn(gen, *lead, n, layout=layout)
    (hash,), (sign,) = random_hashes_signs(gen, [n], d)
    out = ff.count_sketch(*to_backend([x, hash, sign], backend), d, backend=backend)
    expected = x.contiguous() @ dense_sketch_matrix(hash, sign, d)
    assert out.dtype == x.dtype
    # Every bucket sums at most n float64 values: only the summation order may differ.
    assert_rel_close(out, expected, 1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hash_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("sign_dtype", [torch.int8, torch.int64, torch.float32, torch.float64])
def test_index_and_sign_dtypes(gen, backend, hash_dtype, sign_dtype):
    x = randn(gen, 3, 10)
    (hash,), (sign,) = random_hashes_signs(gen, [10], 7, hash_dtype=hash_dtype, sign_dtype=sign_dtype)
    expected = x @ dense_sketch_matrix(hash, sign, 7)
    assert_rel_close(ff.count_sketch(*to_backend([x, hash, sign], backend), 7, backend=backend), expected, 1e-14)


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_adjoint_identity(gen, backend):
    # <C x, g> = <x, C^T g>, with C^T g = S g: the backward must be the exact adjoint.
    x = randn(gen, 4, 9, requires_grad=True)
    (hash,), (sign,) = random_hashes_signs(gen, [9], 6)
    g = randn(gen, 4, 6)
    x_, hash_, sign_, g_ = to_backend([x, hash, sign, g], backend)
    (grad,) = torch.autograd.grad(ff.count_sketch(x_, hash_, sign_, 6, backend=backend), x_, g_)
    assert_rel_close(grad, g @ dense_sketch_matrix(hash, sign, 6).T, 1e-14)


@pytest.mark.parametrize(
    "backend, lead, n, d, layout",
    [
        (backend, *case)
        for *case, interpret in [((3,), 7, 5, "strided", False), ((2,), 5, 3, "contiguous", False), ((2,), 23, 9, "contiguous", True)]
        for backend in BACKENDS
        # Seconds per gradcheck in Triton's interpreter: there it runs the last case only.
        if interpret or backend != "triton" or not TRITON_INTERPRETED
    ],
)
def test_gradcheck(gen, backend, lead, n, d, layout):
    x = randn(gen, *lead, n, layout=layout, requires_grad=True)
    (hash,), (sign,) = random_hashes_signs(gen, [n], d)
    x, hash, sign = to_backend([x, hash, sign], backend)
    # Tighter than gradcheck's defaults (the C++ suite's): the op is linear.
    assert torch.autograd.gradcheck(
        lambda t: ff.count_sketch(t, hash, sign, d, backend=backend), (x,), eps=1e-6, atol=1e-7, rtol=1e-5
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(gen, backend):
    x = randn(gen, 5, 257)  # ~23 inputs per bucket
    (hash,), (sign,) = random_hashes_signs(gen, [257], 11)
    args = to_backend([x, hash, sign], backend)
    assert torch.equal(ff.count_sketch(*args, 11, backend=backend), ff.count_sketch(*args, 11, backend=backend))


@pytest.mark.parametrize("backend, dtype", backend_dtype_params(HALF))
def test_low_precision(gen, backend, dtype):
    cap = {torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    x = randn(gen, 16, 64, requires_grad=True)
    (hash,), (sign,) = random_hashes_signs(gen, [64], 24)

    def fn(x, backend):
        return ff.count_sketch(x, hash.to(x.device), sign.to(x.device), 24, backend=backend)

    errors = assert_low_precision(fn, [x], dtype, gen, backend=backend, cap=cap, grad_cap=0)
    assert errors["grad 0"][0] == 0  # the backward is a signed gather: exact in any dtype
