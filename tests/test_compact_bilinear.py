"""tensor_sketch and compact_bilinear (CBP, gated CBGP).

The oracle is the defining identity, built by brute force with numpy loops: the tensor
sketch of x_1..x_M is *exactly* the count sketch of the flattened outer product with hash
(sum_m h_m(i_m)) mod d and sign prod_m s_m(i_m). Pooling, gating and normalisation are
then checked against that oracle, the sketch's statistics against <x,z><y,w>, the sketch
against scikit-learn's PolynomialCountSketch, and every backend's output and gradients
against the float64 "eager" reference by the suite's one rule, in every dtype of the case
table. Every test runs on every backend under test, each on its device.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import fastfusion as ff
import fastfusion.ops.compact_bilinear as compact_bilinear_ops
from fastfusion.ops.compact_bilinear import choose_algorithm

from helpers import (
    ALL_DTYPES,
    F32,
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
    rel_err,
    to_backend,
)
from oracles import explicit_tensor_sketch, signed_sqrt_l2_oracle

BACKENDS = backends_under_test()
ALGORITHMS = ("gram", "fft")  # of two modalities; "auto" picks one of them (tests at the end)


def covering_hashes_signs(gen, in_dims, d):
    """Hashes whose index tuples reach every bucket (sum_m h_m) mod d. An empty bucket is an
    exact 0 of the sketch that the FFT returns as ~1e-17 of either sign, and the signed
    square root jumps by 2 sqrt(eps) there: no tolerance can compare that to the oracle."""
    for _ in range(100):
        hashes, signs = random_hashes_signs(gen, in_dims, d)
        buckets = {sum(t) % d for t in itertools.product(*(h.tolist() for h in hashes))}
        if len(buckets) == d:
            return hashes, signs
    raise AssertionError("no covering hashes found: make d smaller than prod(in_dims)")


def modality_inputs(gen, lead, in_dims, requires_grad=False):
    """One input per modality, cycling through the layouts so most are non-contiguous."""
    return [
        randn(gen, *lead, n, layout=LAYOUTS[(m + 1) % 3], requires_grad=requires_grad)
        for m, n in enumerate(in_dims)
    ]


# --------------------------------------------------------------------------- the identity


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dims", [(7, 5), (4, 3, 5)])
@pytest.mark.parametrize("d", [1, 7, 16, 33])  # d = 1, odd, even, larger than every n_m
def test_equals_count_sketch_of_outer_product(gen, backend, in_dims, d):
    xs = modality_inputs(gen, (3,), in_dims)
    hashes, signs = random_hashes_signs(gen, in_dims, d)
    out = ff.tensor_sketch(*to_backend([xs, hashes, signs], backend), d, backend=backend)
    assert out.shape == (3, d) and out.dtype == torch.float64  # odd d gives d values, not d - 1
    assert_rel_close(out, explicit_tensor_sketch(xs, hashes, signs, d), 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dims, d", [((7, 5), 9), ((6, 4), 10), ((3, 4, 5), 11), ((5, 2, 3), 8)])
def test_identity_is_exact_on_integers(gen, backend, in_dims, d):
    # With small integer inputs the sketch is an integer vector; the FFT only adds rounding
    # far below 0.5, so rounding recovers the brute-force count sketch bit for bit.
    xs = [torch.randint(1, 5, (2, n), generator=gen).double() * (torch.randint(2, (2, n), generator=gen) * 2 - 1) for n in in_dims]
    hashes, signs = random_hashes_signs(gen, in_dims, d, hash_dtype=torch.int32)
    out = ff.tensor_sketch(*to_backend([xs, hashes, signs], backend), d, backend=backend).cpu()
    expected = explicit_tensor_sketch(xs, hashes, signs, d)
    assert (out - expected).abs().max() < 1e-9
    assert torch.equal(out.round(), expected)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    in_dims=st.lists(st.integers(1, 6), min_size=2, max_size=3),
    d=st.integers(1, 24),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    seed=st.integers(0, 2**31),
)
def test_identity_any_shape(in_dims, d, lead, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [randn(gen, *lead, n) for n in in_dims]
    hashes, signs = random_hashes_signs(gen, in_dims, d)
    out = ff.tensor_sketch(xs, hashes, signs, d, backend="torch")
    assert_rel_close(out, explicit_tensor_sketch(xs, hashes, signs, d), 1e-12)


# --------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("pool", ["sum", "mean"])
@pytest.mark.parametrize(
    "lead, pool_dim",
    [((2, 5), 1), ((2, 5), -2), ((5, 2), 0), ((1, 3), 1), ((3, 4, 2), 1), ((3, 2, 4), -2), ((6,), 0)],
)
def test_pooling_equals_sum_of_per_position_sketches(gen, backend, algorithm, pool, lead, pool_dim):
    in_dims, d = (5, 4), 9
    xs = modality_inputs(gen, lead, in_dims)
    hashes, signs = random_hashes_signs(gen, in_dims, d)
    args = to_backend([xs, hashes, signs], backend)
    out = ff.tensor_sketch(*args, d, pool_dim=pool_dim, pool=pool, backend=backend, algorithm=algorithm)
    per_position = explicit_tensor_sketch(xs, hashes, signs, d)  # lead + (d,)
    reduce = per_position.sum if pool == "sum" else per_position.mean
    assert_rel_close(out, reduce(dim=pool_dim), 1e-12)  # same number of dims as x


@pytest.mark.parametrize("backend", BACKENDS)
def test_pooling_three_modalities(gen, backend):
    in_dims, d = (3, 4, 2), 7
    xs = modality_inputs(gen, (2, 6), in_dims)
    hashes, signs = random_hashes_signs(gen, in_dims, d)
    out = ff.tensor_sketch(*to_backend([xs, hashes, signs], backend), d, pool_dim=1, pool="mean", backend=backend)
    assert_rel_close(out, explicit_tensor_sketch(xs, hashes, signs, d).mean(1), 1e-12)


# --------------------------------------------------------------------------- CBP / CBGP


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("pool", [None, "sum", "mean"])
@pytest.mark.parametrize("eps", [1e-12, 0.3])
def test_compact_bilinear_is_gated_normalised_sketch(gen, backend, algorithm, normalize, pool, eps):
    in_dims, d = (6, 5), 11
    xs = modality_inputs(gen, (3, 4), in_dims)
    hashes, signs = covering_hashes_signs(gen, in_dims, d)
    sketch = explicit_tensor_sketch(xs, hashes, signs, d)
    if pool is not None:
        sketch = sketch.sum(1) if pool == "sum" else sketch.mean(1)
    pool_args = {} if pool is None else {"pool_dim": 1, "pool": pool}
    gate = torch.rand(sketch.shape, generator=gen, dtype=torch.float64) + 0.1
    for g in (None, gate):
        out = ff.compact_bilinear(
            *to_backend([xs, hashes, signs], backend), d, gate=to_backend(g, backend), normalize=normalize, eps=eps,
            backend=backend, algorithm=algorithm, **pool_args,
        )
        z = sketch if g is None else g * sketch
        assert_rel_close(out, signed_sqrt_l2_oracle(z, eps) if normalize else z, 1e-12, f"gate={g is not None}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["softmax", "sigmoid"])
def test_gate_activation_reading(gen, backend, act):
    # CBGP as documented: g = act(W [x_1; x_2] + b) multiplies the sketch before normalisation.
    in_dims, d = (5, 3), 8
    xs = modality_inputs(gen, (4,), in_dims)
    hashes, signs = covering_hashes_signs(gen, in_dims, d)
    logits = torch.cat(xs, -1) @ randn(gen, sum(in_dims), d)
    g = torch.softmax(logits, -1) if act == "softmax" else torch.sigmoid(logits)
    out = ff.compact_bilinear(*to_backend([xs, hashes, signs], backend), d, gate=to_backend(g, backend), backend=backend)
    assert_rel_close(out, signed_sqrt_l2_oracle(g * explicit_tensor_sketch(xs, hashes, signs, d)), 1e-12)


def test_tensor_sketch_is_unnormalised_compact_bilinear(gen):
    in_dims, d = (4, 6), 10
    xs = modality_inputs(gen, (2,), in_dims)
    hashes, signs = covering_hashes_signs(gen, in_dims, d)
    ts = ff.tensor_sketch(xs, hashes, signs, d)
    assert torch.equal(ts, ff.compact_bilinear(xs, hashes, signs, d, normalize=False))
    assert_rel_close(ff.compact_bilinear(xs, hashes, signs, d), signed_sqrt_l2_oracle(ts), 1e-14)


# --------------------------------------------------------------------------- statistics


def sketch_inner_products(pair_a, pair_b, d, draws, seed_offset) -> np.ndarray:
    """<TS(a_1..a_M), TS(b_1..b_M)> for ``draws`` independent hash/sign sets."""
    in_dims = [a.shape[-1] for a in pair_a]
    stacked = [torch.stack([a, b]) for a, b in zip(pair_a, pair_b)]
    estimates = np.empty(draws)
    for k in range(draws):
        drawn = ff.draw_hashes_and_signs(in_dims, d, seed_offset + k)
        ts = ff.tensor_sketch(stacked, [h for h, _ in drawn], [s for _, s in drawn], d)
        estimates[k] = (ts[0] @ ts[1]).item()
    return estimates


@pytest.mark.parametrize("in_dims", [(6, 5), (4, 3, 5)])
def test_inner_product_unbiased_and_variance_decays_like_1_over_d(gen, in_dims):
    """E<TS(x, y), TS(z, w)> = <x, z><y, w> (M = 2; likewise for M = 3) and Var = Theta(1/d).

    For a count sketch with fully independent hashes, Var<Cu, Cv> = (sum_{a != b} u_a^2 v_b^2
    + u_a v_a u_b v_b) / d (Weinberger et al. 2009): the collision probability of two
    distinct keys is 1/d. Tensor sketch hashes the pairs (i, j) with (h_1(i) + h_2(j)) mod d,
    whose collisions of distinct keys still have probability exactly 1/d, and Pham & Pagh
    (2013) show its variance is O(1/d) too. So: the mean of K draws must lie within 5
    standard errors of the truth (a failure chance of ~6e-7 under the CLT), and quadrupling
    d must divide the variance by about 4. The sample variance of K = 2000 draws of these
    estimates (kurtosis below ~10) is good to ~7%, so the ratio is good to ~10%; a
    [2.5, 6.4] window is 4 times 1.6 either way, > 4 standard errors.
    """
    xs = [randn(gen, n) for n in in_dims]
    # Correlated second pair, so that the truth is far from 0 and a wrong scale shows.
    zs = [x + 0.3 * randn(gen, x.shape[-1]) for x in xs]
    truth = math.prod((x @ z).item() for x, z in zip(xs, zs))
    draws, d = 2000, 16
    variances = []
    for dim in (d, 4 * d):
        est = sketch_inner_products(xs, zs, dim, draws, seed_offset=1_000_000 * dim)
        standard_error = est.std(ddof=1) / math.sqrt(draws)
        # Power: 5 standard errors < half the truth, so even a factor-2 scale error fails.
        assert standard_error < 0.1 * abs(truth), "test too weak to detect a wrong scale"
        assert abs(est.mean() - truth) <= 5 * standard_error, (dim, est.mean(), truth, standard_error)
        variances.append(est.var(ddof=1))
    ratio = variances[0] / variances[1]
    assert 2.5 <= ratio <= 6.4, f"Var(d={d}) / Var(d={4 * d}) = {ratio:.2f}, expected ~4"


# --------------------------------------------------------------------------- scikit-learn


@pytest.mark.parametrize("degree", [2, 3])
@pytest.mark.parametrize("d", [16, 9])
def test_matches_sklearn_polynomial_count_sketch(gen, degree, d):
    """sklearn's PolynomialCountSketch(degree=p) is this sketch with all p inputs equal to x.

    From sklearn's source (1.x): indexHash_ (p, n) holds hashes in [0, n_components),
    bitHash_ (p, n) holds signs drawn from {-1, +1}; the sketch is
    real(ifft(prod_m fft(C_m(sqrt(gamma) x)))) with scipy's normalised inverse FFT. With
    gamma=1 and coef0=0 (no appended constant feature) no scale differs: factor 1.
    """
    from sklearn.kernel_approximation import PolynomialCountSketch

    x = randn(gen, 5, 7)
    seed = int(torch.randint(2**31, (1,), generator=gen))
    sk = PolynomialCountSketch(degree=degree, n_components=d, gamma=1.0, coef0=0, random_state=seed).fit(x.numpy())
    assert set(np.unique(sk.bitHash_)) <= {-1, 1}
    hashes = [torch.from_numpy(sk.indexHash_[m]).long() for m in range(degree)]
    signs = [torch.from_numpy(sk.bitHash_[m]).long() for m in range(degree)]
    out = ff.tensor_sketch([x] * degree, hashes, signs, d)
    assert_rel_close(out, torch.from_numpy(sk.transform(x.numpy())), 1e-12)


# --------------------------------------------------------------------------- gradients


def draw_away_from_zero(gen, in_dims, d, lead, pool_dim, gated, threshold=0.05):
    """Inputs (and gate) whose gated sketch has no entry within ``threshold`` of 0, where
    the signed square root's finite differences would jump. Redraws deterministically."""
    for _ in range(200):
        xs = modality_inputs(gen, lead, in_dims, requires_grad=True)
        hashes, signs = random_hashes_signs(gen, in_dims, d)
        z = explicit_tensor_sketch(xs, hashes, signs, d)
        z = z if pool_dim is None else z.sum(pool_dim)
        gate = (0.5 + torch.rand(z.shape, generator=gen, dtype=torch.float64)).requires_grad_(True) if gated else None
        if (z.abs() > threshold).all():
            return xs, hashes, signs, gate
    raise AssertionError("could not draw inputs away from zero")


# (id, (in_dims, lead, pool, algorithm, d, gated, normalize), interpretable): the cases of
# the reference backends, then those of the C++ and Triton suites. Each gradcheck of the
# Triton kernels takes seconds in the interpreter: "triton" runs only the interpretable ones
# there, and all where its kernels are compiled.
GRADCHECK = [
    (f"{in_dims}-{lead}-{pool}-{algorithm}-gated={gated}-normalize={normalize}", (in_dims, lead, pool, algorithm, 5, gated, normalize), False)
    for in_dims, lead, pool, algorithm in [
        ((4, 3), (2,), None, "fft"),
        ((3, 4), (2, 3), "sum", "fft"),
        ((3, 2, 4), (1, 3), "mean", "fft"),
        ((3, 2, 2), (2,), None, "fft"),
        ((4, 3), (2,), None, "gram"),
        ((3, 4), (2, 3), "sum", "gram"),
        ((2, 4), (1, 3), "mean", "gram"),
    ]
    for gated in (False, True)
    for normalize in (False, True)
] + [
    ("cpp gate pool", ((3, 2), (2, 2), "sum", "fft", 5, True, False), False),
    ("cpp normalize", ((5, 4), (2,), None, "fft", 3, False, True), False),
    ("cpp M=3 mean", ((2, 2, 3), (1, 2), "mean", "fft", 6, False, True), False),
    ("cpp gram gate pool", ((3, 2), (2, 2), "sum", "gram", 5, True, False), False),
    ("cpp gram normalize mean", ((5, 4), (2, 3), "mean", "gram", 3, False, True), False),
    ("triton mean gate normalize", ((7, 5, 6), (1, 2), "mean", "fft", 9, True, True), True),
    ("triton sum", ((7, 5, 6), (1, 2), "sum", "fft", 9, False, False), True),
    ("triton gram mean gate normalize", ((7, 5), (1, 3), "mean", "gram", 9, True, True), True),
    ("triton gram sum", ((7, 5), (1, 3), "sum", "gram", 9, False, False), True),
]


@pytest.mark.parametrize(
    "backend, in_dims, lead, pool, algorithm, d, gated, normalize",
    [
        pytest.param(backend, *values, id=f"{name}-{backend}")
        for name, values, interpretable in GRADCHECK
        for backend in BACKENDS
        if interpretable or not (backend == "triton" and TRITON_INTERPRETED)
    ],
)
def test_gradcheck(gen, backend, in_dims, lead, pool, algorithm, d, gated, normalize):
    pool_dim = None if pool is None else 1
    xs, hashes, signs, gate = draw_away_from_zero(gen, in_dims, d, lead, pool_dim, gated)
    leaves = to_backend(xs + ([gate] if gated else []), backend)
    hashes, signs = to_backend([hashes, signs], backend)
    kwargs = {} if pool is None else {"pool_dim": 1, "pool": pool}

    def fn(*leaves):
        g = leaves[len(in_dims)] if gated else None
        return ff.compact_bilinear(
            list(leaves[: len(in_dims)]), hashes, signs, d, gate=g, normalize=normalize, backend=backend,
            algorithm=algorithm, **kwargs,
        )

    # Tighter than gradcheck's defaults (the C++ suite's).
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def cbp_case(in_dims, d, lead, pool=None, gate=False, normalize=True, algorithm="fft", layout="contiguous",
             covering=False, pool_dim=1, hash_dtype=torch.int64):
    """A Case builder; normalised cases get covering hashes. The modalities cycle through the layouts from ``layout`` ("permuted":
    (B, T, n) views of (n, T, B) storage, and a transposed gate); the gate is 0.5 + U(0, 1).
    The backend runs ``algorithm``; "eager" runs it too in lower precisions (PyTorch's own
    error of the same algorithm), while the float64 reference is the FFTs as the papers
    state them, so that the Gram path is never checked against itself."""

    def build(gen):
        if covering or normalize:  # see covering_hashes_signs
            hashes, signs = covering_hashes_signs(gen, in_dims, d)
            hashes = [h.to(hash_dtype) for h in hashes]
        else:
            hashes, signs = random_hashes_signs(gen, in_dims, d, hash_dtype=hash_dtype)
        if layout == "permuted":
            storage = [torch.randn((n,) + lead[::-1], generator=gen, dtype=F64) for n in in_dims]
            xs = [t.permute(*range(len(lead), -1, -1)).requires_grad_(True) for t in storage]
        else:
            start = LAYOUTS.index(layout)
            xs = [randn(gen, *lead, n, layout=LAYOUTS[(m + start) % 3], requires_grad=True) for m, n in enumerate(in_dims)]
        inputs = list(xs)
        if gate:
            pooled = None if pool is None else pool_dim % (len(lead) + 1)  # pool_dim counts x's dimensions
            out_lead = tuple(size for dim, size in enumerate(lead) if dim != pooled)
            g = 0.5 + torch.rand(out_lead + (d,), generator=gen, dtype=F64)
            if layout == "permuted":
                g = g.t().contiguous().t()
            inputs.append(g.requires_grad_(True))
        m = len(in_dims)
        pool_args = {} if pool is None else {"pool_dim": pool_dim, "pool": pool}

        def fn(*t, backend):
            chosen = "fft" if backend == "eager" and t[0].dtype == F64 else algorithm
            return ff.compact_bilinear(
                list(t[:m]), [h.to(t[0].device) for h in hashes], [s.to(t[0].device) for s in signs], d,
                gate=t[m] if gate else None, normalize=normalize, backend=backend, algorithm=chosen, **pool_args,
            )

        return fn, inputs

    return build


GRAD_NOISE = "gradients through the signed square root of sketch bins near 0: rounding amplified by 1 / sqrt|z|"

# The one case table. First the reference backends' cases: covering hashes (at an empty
# bucket the signed square root's derivative is 1 / (2 sqrt(eps)) = 5e5 times FFT noise,
# which no two FFT orderings agree on), pooling over a leading dimension channel-first style.
# Then the C++ suite's: B = 1, odd d, M = 3, every layout; 2 * 4096 * 70 values, more than one
# FFT call's budget (no normalisation: with d >> n_1 n_2 most entries are FFT round-off, whose
# signed square roots are noise in any implementation); the Gram path with d prime and more
# hashes than d - 1 (Cauchy-Davenport: no empty bin, which is an exact 0 there and round-off
# in the reference), rows cut into parts with bins of their own (300 / 32 -> 9 parts), and
# rows over two GEMM blocks (2^16 values each). Then the Triton suite's: odd n past any block,
# d past one frequency block (300), the Gram kernels' tiles of 32 to 128 in (i, j, t) with
# ragged last ones (n = 130, 131, T = 150), many (i, j) per bin (d = 31, 97).
CONFORMANCE = {
    **{
        f"{in_dims} {algorithm} B={batch} pool={pool} gated={gated} normalize={normalize}": Case(
            cbp_case(in_dims, 13, (batch, 4), pool, gated, normalize, algorithm, "strided", covering=True), (F64,), interpret=False
        )
        for in_dims, algorithm in [((7, 5), "fft"), ((7, 5), "gram"), ((4, 3, 5), "fft")]
        for batch in (1, 3)
        for pool in (None, "sum", "mean")
        for gated in (False, True)
        for normalize in (False, True)
    },
    **{
        f"pool_dim={pool_dim} of (4, 2, 3)": Case(
            cbp_case((5, 6), 10, (4, 2, 3), "mean", True, True, "fft", "strided", covering=True, pool_dim=pool_dim),
            (F64,),
            interpret=False,
        )
        for pool_dim in (0, -4)
    },
    "cpp B=3": Case(cbp_case((5, 6), 9, (3,), hash_dtype=torch.int32)),
    "cpp B=1 odd d, no normalize": Case(cbp_case((5, 6), 17, (1,), normalize=False, hash_dtype=torch.int32)),
    "cpp M=3 gate": Case(
        cbp_case((3, 4, 5), 16, (3,), gate=True, hash_dtype=torch.int32), loose=(("cpp", F32),), why=GRAD_NOISE
    ),
    "cpp pool sum, transposed": Case(
        cbp_case((5, 6), 9, (3, 4), "sum", layout="transposed", hash_dtype=torch.int32),
        loose=(("cpp", F32),),
        why=GRAD_NOISE,
    ),
    "cpp pool mean gate no normalize": Case(cbp_case((5, 6), 10, (2, 3), "mean", True, False, hash_dtype=torch.int32)),
    "cpp M=3 pool mean": Case(cbp_case((2, 3, 4), 7, (2, 5), "mean", hash_dtype=torch.int32)),
    "cpp long sequence": Case(
        cbp_case((6, 5), 4096, (2, 70), "sum", True, False, hash_dtype=torch.int32), interpret=False
    ),
    "cpp gram": Case(cbp_case((9, 8), 7, (3, 4), "sum", algorithm="gram", hash_dtype=torch.int32)),
    "cpp gram unpooled": Case(cbp_case((5, 6), 9, (4,), algorithm="gram", hash_dtype=torch.int32)),
    "cpp gram B=1 odd d, no normalize": Case(cbp_case((5, 6), 17, (1, 3), "sum", normalize=False, algorithm="gram", hash_dtype=torch.int32)),
    "cpp gram pool mean gate, transposed": Case(
        cbp_case((9, 8), 5, (2, 5), "mean", True, True, "gram", "transposed", hash_dtype=torch.int32)
    ),
    "cpp gram gate no normalize, strided": Case(
        cbp_case((7, 4), 11, (2, 3), "sum", True, False, "gram", "strided", hash_dtype=torch.int32)
    ),
    "cpp gram rows in parts": Case(
        cbp_case((300, 70), 64, (1, 6), "mean", False, False, "gram", hash_dtype=torch.int32), interpret=False
    ),
    "cpp gram rows in blocks": Case(
        cbp_case((40, 3000), 50, (2, 3), "sum", True, True, "gram", hash_dtype=torch.int32), interpret=False
    ),
    "triton B=3 unpooled": Case(cbp_case((37, 29), 31, (3,))),
    "triton B=1 sum gate": Case(cbp_case((37, 29), 31, (1, 1), "sum", True)),
    "triton sum d=33 no normalize": Case(cbp_case((37, 29), 33, (2, 5), "sum", normalize=False)),
    "triton mean gate no normalize": Case(cbp_case((37, 29), 31, (2, 5), "mean", True, False)),
    "triton M=3 mean": Case(cbp_case((19, 23, 17), 27, (2, 3), "mean")),
    "triton M=3 B=1 sum gate": Case(cbp_case((19, 23, 17), 27, (1, 4), "sum", True)),
    "triton M=3 d=300 gate no normalize": Case(cbp_case((19, 23, 17), 300, (2,), gate=True, normalize=False)),
    "triton permuted": Case(
        cbp_case((13, 21), 25, (2, 3), "sum", True, layout="permuted"), loose=(("cpp", F32),), why=GRAD_NOISE
    ),
    "triton M=3 permuted": Case(cbp_case((13, 21, 11), 25, (2, 3), "sum", True, layout="permuted")),
    "triton mean gate": Case(cbp_case((37, 29), 31, (2, 3), "mean", True), ALL_DTYPES),
    "triton gram tiles": Case(cbp_case((130, 131), 97, (2, 150), "mean", True, True, "gram")),
    "triton gram sum no normalize": Case(cbp_case((130, 67), 97, (1, 70), "sum", False, False, "gram")),
    "triton gram unpooled": Case(cbp_case((37, 29), 31, (3,), algorithm="gram")),
    "triton gram sum gate no normalize": Case(cbp_case((37, 29), 33, (2, 5), "sum", True, False, "gram")),
    "triton gram mean": Case(cbp_case((29, 37), 31, (2, 5), "mean", algorithm="gram")),
    "triton gram permuted": Case(cbp_case((130, 21), 25, (2, 40), "mean", True, True, "gram", "permuted")),
    "triton gram half": Case(cbp_case((130, 67), 97, (2, 70), "mean", True, True, "gram"), HALF),
    "triton gram half sum no normalize": Case(cbp_case((130, 67), 97, (2, 70), "sum", False, False, "gram"), HALF),
    # One sample whose forward has several tile programs (the last one runs the epilogue) and
    # whose backward has more dy than dx programs per sample (one launch serves both).
    "triton gram B=1 gate normalize, tiles": Case(cbp_case((67, 130), 97, (1, 20), "sum", True, True, "gram")),
    "triton gram mean gate normalize, strided": Case(cbp_case((37, 29), 33, (3, 5), "mean", True, True, "gram", "strided")),
    "triton gram gate only, transposed": Case(cbp_case((29, 37), 31, (2, 5), "mean", True, False, "gram", "transposed")),
}


@pytest.mark.parametrize("case, backend, dtype", conformance_params(CONFORMANCE))
def test_conforms(gen, case, backend, dtype):
    fn, inputs = CONFORMANCE[case].build(gen)
    assert_conforms(fn, inputs, backend, dtype, gen, **CONFORMANCE[case].tolerance(backend, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_nan_stays_in_its_sample(gen, backend, algorithm):
    fn, inputs = cbp_case((5, 6), 9, (3, 4), "sum", True, algorithm=algorithm)(gen)
    inputs = to_backend(inputs, backend)
    with torch.no_grad():
        inputs[0][1, 2, 0] = float("nan")
    out = fn(*inputs, backend=backend)
    grads = torch.autograd.grad(out, inputs, torch.randn_like(out))
    assert out[1].isnan().all() and out[[0, 2]].isfinite().all()
    for g in grads:
        assert g[1].isnan().any() and g[[0, 2]].isfinite().all()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "eager"])
def test_gram_propagates_nan_only_where_it_lands(gen, backend):
    # A NaN in x[0, t, i] reaches exactly the bins (h1(i) + h2(j)) mod d of sample 0: the Gram
    # path is a count sketch, not a transform that spreads it over every bin.
    hashes, signs = random_hashes_signs(gen, (37, 29), 97)
    x, y = randn(gen, 2, 3, 37).float(), randn(gen, 2, 3, 29).float()
    x[0, 1, 5] = float("nan")
    x_, y_, hashes_, signs_ = to_backend([x, y, hashes, signs], backend)
    out = ff.tensor_sketch([x_, y_], hashes_, signs_, 97, pool_dim=1, backend=backend, algorithm="gram").cpu()
    nan_bins = torch.zeros(97, dtype=torch.bool)
    nan_bins[(hashes[0][5] + hashes[1]) % 97] = True
    assert torch.equal(out.isnan(), torch.stack([nan_bins, torch.zeros_like(nan_bins)]))
    reference = ff.tensor_sketch([x.double(), y.double()], hashes, signs, 97, pool_dim=1, backend="eager", algorithm="gram")
    assert rel_err(out[~out.isnan()], reference[~out.isnan()]) < 1e-6


# --------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("backend, dtype", backend_dtype_params(HALF))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("d", [24, 27])  # 27: half-precision FFTs (cuFFT) only take powers of two
def test_low_precision(gen, backend, dtype, algorithm, normalize, d):
    in_dims = (16, 12)
    inputs = [randn(gen, 4, 3, n) for n in in_dims] + [torch.rand(4, d, generator=gen, dtype=torch.float64)]
    inputs = [t.requires_grad_(True) for t in inputs]
    hashes, signs = random_hashes_signs(gen, in_dims, d)

    def fn(*t, backend):
        hs, ss = [h.to(t[0].device) for h in hashes], [s.to(t[0].device) for s in signs]
        return ff.compact_bilinear(
            list(t[:2]), hs, ss, d, pool_dim=1, gate=t[2], normalize=normalize, backend=backend, algorithm=algorithm
        )

    errors = assert_low_precision(fn, inputs, dtype, gen, backend=backend, cap=1e-2, grad_cap=1e-2)
    # Computed in float32 internally: little more error than rounding the exact output.
    # (Not so for the gradients: the signed square root's derivative amplifies float32
    # rounding of small sketch entries; the 2x rule above covers them.)
    err, _, floor = errors["output"]
    assert err <= 1.5 * floor, (err, floor)


# --------------------------------------------------------------------------- algorithm choice


class RecordAlgorithms(TorchDispatchMode):
    """Records the algorithm that each fastfusion::compact_bilinear call runs."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.fastfusion.compact_bilinear.default:
            self.seen.append(args[8])
        return func(*args, **(kwargs or {}))


# (device type, B, T, dims, d, dtype) -> what the cost model must pick: the Gram path for the
# pooled sequences of benchmarks/shapes.py, the FFT path for single vectors and wide features.
CHOICES = [
    ("cuda", 32, 784, (512, 512), 8192, torch.float32, "gram"),
    ("cuda", 32, 784, (512, 512), 8192, torch.bfloat16, "gram"),
    ("cuda", 512, 1, (2048, 2048), 16384, torch.float32, "fft"),
    ("cpu", 8, 49, (256, 256), 4096, torch.float32, "gram"),
    ("cpu", 8, 196, (256, 256), 4096, torch.float32, "gram"),
    ("cpu", 64, 1, (512, 1024), 8192, torch.float32, "fft"),
    ("cpu", 8, 9, (512, 512), 8192, torch.float32, "fft"),
    ("cpu", 8, 49, (256, 256, 64), 4096, torch.float32, "fft"),  # no Gram path for three modalities
]


@pytest.mark.parametrize("device_type, batch, positions, dims, d, dtype, expected", CHOICES)
def test_auto_picks_the_cheaper_algorithm(device_type, batch, positions, dims, d, dtype, expected):
    chosen = choose_algorithm("auto", device_type, batch, positions, dims, d, dtype)
    assert chosen == expected, compact_bilinear_ops.algorithm_costs(device_type, batch, positions, dims, d, dtype)


@pytest.mark.parametrize("algorithm", ["gram", "fft"])
def test_explicit_algorithm_is_kept(algorithm):
    assert choose_algorithm(algorithm, "cpu", 64, 1, (512, 1024), 8192, torch.float32) == algorithm
    assert choose_algorithm(algorithm, "cpu", 8, 196, (256, 256), 4096, torch.float32) == algorithm


@pytest.mark.parametrize(
    "lead, in_dims, d, pool, expected",
    [((4, 40), (24, 20), 512, "sum", "gram"), ((4,), (96, 80), 64, None, "fft"), ((4, 40), (6, 5, 4), 512, "mean", "fft")],
)
def test_calls_run_the_algorithm_auto_picks(gen, lead, in_dims, d, pool, expected):
    # Checked at the op: the call runs what choose_algorithm said, for both of its answers.
    xs = modality_inputs(gen, lead, in_dims)
    hashes, signs = random_hashes_signs(gen, in_dims, d)
    batch, positions = lead if pool else (lead[0], 1)
    assert choose_algorithm("auto", "cpu", batch, positions, in_dims, d, torch.float64) == expected
    pool_args = {} if pool is None else {"pool_dim": 1, "pool": pool}
    with RecordAlgorithms() as recorded:
        out = ff.tensor_sketch(xs, hashes, signs, d, backend="torch", **pool_args)
    assert recorded.seen == [expected]
    other = ff.tensor_sketch(xs, hashes, signs, d, backend="torch", algorithm="fft", **pool_args)
    assert_rel_close(out, other, 1e-12)


def test_cuda_gram_is_not_deterministic():
    # The CUDA Gram kernel adds into its bins with atomics: under deterministic algorithms
    # "auto" takes the FFT path, and asking for "gram" is PyTorch's nondeterminism alert.
    sizes = (32, 784, (512, 512), 8192, torch.float32)
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert choose_algorithm("auto", "cuda", *sizes) == "fft"
        assert choose_algorithm("auto", "cpu", *sizes) == "gram"  # the C++ kernel's order is fixed
        with pytest.raises(RuntimeError, match="algorithm='gram'"):
            choose_algorithm("gram", "cuda", *sizes)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="algorithm='gram'"):
            assert choose_algorithm("gram", "cuda", *sizes) == "gram"
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@pytest.mark.parametrize("bad", ["GRAM", "", None, 1])
def test_bad_algorithm_names_the_argument(gen, bad):
    xs = modality_inputs(gen, (2, 3), (4, 5))
    hashes, signs = random_hashes_signs(gen, (4, 5), 8)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        ff.compact_bilinear(xs, hashes, signs, 8, pool_dim=1, algorithm=bad)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        ff.CompactBilinearPooling((4, 5), 8, algorithm=bad)


def test_gram_needs_two_modalities(gen):
    in_dims = (4, 5, 3)
    xs = modality_inputs(gen, (2, 3), in_dims)
    hashes, signs = random_hashes_signs(gen, in_dims, 8)
    with pytest.raises(ValueError, match="algorithm='gram' needs exactly 2 modalities, got 3"):
        ff.tensor_sketch(xs, hashes, signs, 8, pool_dim=1, algorithm="gram")
    with pytest.raises(ValueError, match="algorithm"):
        ff.CompactBilinearPooling(in_dims, 8, algorithm="gram")


@pytest.mark.parametrize("module", [ff.CompactBilinearPooling, ff.GatedCompactBilinearPooling])
def test_modules_take_the_algorithm(gen, module):
    in_dims, d = (6, 5), 16
    xs = modality_inputs(gen, (3, 7), in_dims)
    outs, state = {}, None
    for algorithm in ("gram", "fft"):
        # Unnormalised: an empty bin is an exact 0 on the Gram path and FFT noise of either sign.
        m = module(in_dims, d, pool="mean", normalize=False, algorithm=algorithm).double()
        state = state or m.state_dict()  # the same gate weights for both
        m.load_state_dict(state)
        assert f"algorithm={algorithm}" in repr(m)
        with RecordAlgorithms() as recorded:
            outs[algorithm] = m(*xs)
        assert recorded.seen == [algorithm]
    assert_rel_close(outs["gram"], outs["fft"], 1e-12)
