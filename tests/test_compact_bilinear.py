"""tensor_sketch and compact_bilinear (CBP, gated CBGP).

The oracle is the defining identity, built by brute force with numpy loops: the tensor
sketch of x_1..x_M is *exactly* the count sketch of the flattened outer product with hash
(sum_m h_m(i_m)) mod d and sign prod_m s_m(i_m). Pooling, gating and normalisation are
then checked against that oracle, the sketch's statistics against <x,z><y,w>, and the
sketch against scikit-learn's PolynomialCountSketch.
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
from helpers import LAYOUTS, assert_backends_agree, assert_rel_close, assert_low_precision, randn, random_hashes_signs
from oracles import explicit_tensor_sketch, signed_sqrt_l2_oracle

BACKENDS = ("torch", "eager")
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
    out = ff.tensor_sketch(xs, hashes, signs, d, backend=backend)
    assert out.shape == (3, d) and out.dtype == torch.float64  # odd d gives d values, not d - 1
    assert_rel_close(out, explicit_tensor_sketch(xs, hashes, signs, d), 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dims, d", [((7, 5), 9), ((6, 4), 10), ((3, 4, 5), 11), ((5, 2, 3), 8)])
def test_identity_is_exact_on_integers(gen, backend, in_dims, d):
    # With small integer inputs the sketch is an integer vector; the FFT only adds rounding
    # far below 0.5, so rounding recovers the brute-force count sketch bit for bit.
    xs = [torch.randint(1, 5, (2, n), generator=gen).double() * (torch.randint(2, (2, n), generator=gen) * 2 - 1) for n in in_dims]
    hashes, signs = random_hashes_signs(gen, in_dims, d, hash_dtype=torch.int32)
    out = ff.tensor_sketch(xs, hashes, signs, d, backend=backend)
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
    out = ff.tensor_sketch(xs, hashes, signs, d, pool_dim=pool_dim, pool=pool, backend=backend, algorithm=algorithm)
    per_position = explicit_tensor_sketch(xs, hashes, signs, d)  # lead + (d,)
    reduce = per_position.sum if pool == "sum" else per_position.mean
    assert_rel_close(out, reduce(dim=pool_dim), 1e-12)  # same number of dims as x


@pytest.mark.parametrize("backend", BACKENDS)
def test_pooling_three_modalities(gen, backend):
    in_dims, d = (3, 4, 2), 7
    xs = modality_inputs(gen, (2, 6), in_dims)
    hashes, signs = random_hashes_signs(gen, in_dims, d)
    out = ff.tensor_sketch(xs, hashes, signs, d, pool_dim=1, pool="mean", backend=backend)
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
            xs, hashes, signs, d, gate=g, normalize=normalize, eps=eps, backend=backend, algorithm=algorithm, **pool_args
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
    out = ff.compact_bilinear(xs, hashes, signs, d, gate=g, backend=backend)
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "in_dims, lead, pool, algorithm",
    [
        ((4, 3), (2,), None, "fft"),
        ((3, 4), (2, 3), "sum", "fft"),
        ((3, 2, 4), (1, 3), "mean", "fft"),
        ((3, 2, 2), (2,), None, "fft"),
        ((4, 3), (2,), None, "gram"),
        ((3, 4), (2, 3), "sum", "gram"),
        ((2, 4), (1, 3), "mean", "gram"),
    ],
)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck(gen, backend, in_dims, lead, pool, algorithm, gated, normalize):
    d = 5
    pool_dim = None if pool is None else 1
    xs, hashes, signs, gate = draw_away_from_zero(gen, in_dims, d, lead, pool_dim, gated)
    leaves = xs + ([gate] if gated else [])
    kwargs = {} if pool is None else {"pool_dim": 1, "pool": pool}

    def fn(*leaves):
        g = leaves[len(in_dims)] if gated else None
        return ff.compact_bilinear(
            list(leaves[: len(in_dims)]), hashes, signs, d, gate=g, normalize=normalize, backend=backend,
            algorithm=algorithm, **kwargs,
        )

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("in_dims, algorithm", [((7, 5), "fft"), ((7, 5), "gram"), ((4, 3, 5), "fft")])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("pool", [None, "sum", "mean"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_torch_backend_gradients_equal_eager(gen, in_dims, algorithm, batch, pool, gated, normalize):
    d = 13
    lead = (batch, 4)
    xs = modality_inputs(gen, lead, in_dims, requires_grad=True)
    # Covering hashes: at an empty bucket the signed square root's derivative is
    # 1 / (2 sqrt(eps)) = 5e5 times FFT noise, which no two FFT orderings agree on to 1e-12.
    hashes, signs = covering_hashes_signs(gen, in_dims, d)
    out_lead = lead if pool is None else lead[:1]
    gate = torch.rand(out_lead + (d,), generator=gen, dtype=torch.float64).requires_grad_(gated)
    kwargs = {} if pool is None else {"pool_dim": 1, "pool": pool}
    assert_backends_agree(
        lambda b: ff.compact_bilinear(
            xs, hashes, signs, d, gate=gate if gated else None, normalize=normalize, backend=b, algorithm=algorithm,
            **kwargs,
        ),
        xs + ([gate] if gated else []),
        gen,
    )


@pytest.mark.parametrize("pool_dim", [0, -4])
def test_torch_backend_gradients_equal_eager_pooling_leading_dim(gen, pool_dim):
    # (T, B, C, n): pooling over the first of three leading dimensions, channel-first style.
    in_dims, d = (5, 6), 10
    xs = modality_inputs(gen, (4, 2, 3), in_dims, requires_grad=True)
    hashes, signs = covering_hashes_signs(gen, in_dims, d)
    gate = torch.rand(2, 3, d, generator=gen, dtype=torch.float64).requires_grad_(True)
    assert_backends_agree(
        lambda b: ff.compact_bilinear(xs, hashes, signs, d, pool_dim=pool_dim, pool="mean", gate=gate, backend=b),
        xs + [gate],
        gen,
    )


# --------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("d", [24, 27])  # 27: half-precision FFTs (cuFFT) only take powers of two
def test_low_precision(gen, dtype, algorithm, normalize, d):
    in_dims = (16, 12)
    inputs = [randn(gen, 4, 3, n) for n in in_dims] + [torch.rand(4, d, generator=gen, dtype=torch.float64)]
    hashes, signs = random_hashes_signs(gen, in_dims, d)

    def fn(t, b):
        return ff.compact_bilinear(
            t[:2], hashes, signs, d, pool_dim=1, gate=t[2], normalize=normalize, backend=b, algorithm=algorithm
        )

    errors = assert_low_precision(fn, inputs, dtype, gen, cap=1e-2, grad_cap=1e-2)
    # Computed in float32 internally: little more error than rounding the exact output.
    # (Not so for the gradients: the signed square root's derivative amplifies float32
    # rounding of small sketch entries; the 2x rule above covers them.)
    err_torch, _, floor = errors["output"]
    assert err_torch <= 1.5 * floor, (err_torch, floor)


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
