"""Bad input, for every op and every backend, each on its test device (helpers.backend_device:
Triton on CUDA when present, else under its interpreter on the CPU): rows whose squares
overflow, rows holding inf or NaN, meta tensors, empty batches.

The rules:
- signed sqrt + L2, alone and as the epilogue of compact and factorized bilinear pooling, gives
  the reference's answer for any finite row, however close to the dtype's maximum (the
  squares of the signed roots may overflow; the norm is taken of s / max|s|), forward and
  backward. A row holding +-inf or NaN comes out all NaN, and so does its gradient.
- Elsewhere NaN reaches exactly the outputs and gradients that it reaches in the reference.
- Meta tensors: every function and module gives outputs, and gradients, of the right shape and
  dtype on "meta", whatever the backend; nothing reads values.
- Empty leading dimensions (B = 0, or any other): empty outputs of the right shape and, under
  autograd, gradients of the right shapes, zeros for the parameters, in every backend; no C++
  or Triton kernel runs. Pooling over an empty dimension gives the sum's zeros or the mean's
  NaN, as torch.sum and torch.mean do. An empty feature dimension (or parameter) is an error
  naming the argument.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import fastfusion as ff
from fastfusion import _dispatch
from fastfusion._custom_op import SPECS

from helpers import F64, assert_rel_close, backend_device, backends_under_test, randn, random_hashes_signs
from oracles import explicit_tensor_sketch, mfb_oracle, signed_sqrt_l2_oracle

F32 = torch.float32
BACKENDS = backends_under_test()
COMPILED = tuple(b for b in BACKENDS if b in ("cpp", "triton"))
EPS = 1e-12
# Multiplying by a power of two is exact: the references see rows scaled down by it, where
# nothing can overflow, with eps scaled alike, which leaves the output unchanged.
SCALE = 2.0**-600
# Relative error bounds against the float64 reference, (output, gradients): about 10x the
# largest seen over five seeds and all backends (float64 4e-16 and 2e-15, float32 2e-7 and 1e-6).
TOL = {F64: (1e-14, 1e-13), F32: (1e-6, 1e-5)}


def _output_and_grads(fn, leaves, cotangent, device=None):
    """fn(leaves) and the gradients of <output, cotangent> w.r.t. every leaf, on ``device``
    (default: where the leaves are)."""
    leaves = [t.detach().to(device).requires_grad_(True) for t in leaves]
    out = fn(leaves)
    return out, torch.autograd.grad(out, leaves, cotangent.to(out.device, out.dtype))


def _assert_matches(out, grads, expected, expected_grads, dtype):
    tol_out, tol_grad = TOL[dtype]
    assert out.dtype == dtype
    assert_rel_close(out, expected, tol_out, "output")
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        assert g.dtype == dtype
        assert_rel_close(g, e, tol_grad, f"grad of leaf {i}")


def _powers_to_near_max(z: torch.Tensor, dtype) -> torch.Tensor:
    """Integers p with |z| 2^p between 0.45 and 0.9 of the dtype's maximum (in logs: 0.9 max / |z|
    itself may overflow)."""
    return torch.floor(math.log2(0.9 * torch.finfo(dtype).max) - torch.log2(z.abs()))


def _overflows(z: torch.Tensor, dtype) -> torch.Tensor:
    """Per row: the sum of the squares of the signed roots, sum |z|, exceeds the dtype's maximum."""
    return z.double().abs().sum(-1) > torch.finfo(dtype).max


# --------------------------------------------------------------------------- overflow


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_signed_sqrt_l2_rows_near_the_maximum(gen, backend, dtype):
    top = torch.finfo(dtype).max
    z = torch.empty(3, 8, dtype=F64)
    z[0] = 0.95 * top  # the row: 1.7e308 everywhere must give 1 / sqrt(8) everywhere
    signs = torch.randint(2, (8,), generator=gen) * 2 - 1
    z[1] = (0.25 + 0.75 * torch.rand(8, generator=gen, dtype=F64)) * top * signs
    z[1, 3] = 0.0
    z[2] = randn(gen, 8)  # an ordinary row beside them
    z = z.to(dtype)
    assert _overflows(z, dtype)[:2].all()
    cotangent = randn(gen, 3, 8)
    device = backend_device(backend)
    out, grads = _output_and_grads(lambda t: ff.signed_sqrt_l2(t[0], EPS, backend=backend), [z], cotangent, device)
    # Reference: the same rows scaled down; the output is unchanged and the gradient scales back.
    _, (grad_mid,) = _output_and_grads(
        lambda t: ff.signed_sqrt_l2(t[0], EPS * SCALE, backend="eager"), [z.double() * SCALE], cotangent
    )
    expected = signed_sqrt_l2_oracle(z.double() * SCALE, EPS * SCALE)
    _assert_matches(out, grads, expected, [grad_mid * SCALE], dtype)
    if dtype == F64:
        assert torch.allclose(out[0].cpu(), torch.full((8,), 8**-0.5, dtype=F64), rtol=1e-15, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_gated_compact_bilinear_rows_near_the_maximum(gen, backend, dtype):
    # The gate brings the pooled sketch near the maximum after the FFTs. (Inputs that large
    # would overflow the FFTs themselves, in the reference too: the DC term sums all of z.)
    # Sketches of size 5 from modalities of 3 and 4 with these hashes reach every bucket: no
    # exact zero of the sketch, whose FFT round-off the signed root would turn into noise.
    dims, d = (3, 4), 5
    device = backend_device(backend)
    hashes = [torch.arange(n) % d for n in dims]
    _, signs = random_hashes_signs(gen, dims, d)
    # Inputs of about max^(1/4), so that the sketch and the gate that brings each of its
    # entries to 0.45-0.9 of the maximum (every row overflows) are both about max^(1/2).
    xs = [(randn(gen, 2, n) * 2.0 ** (math.log2(torch.finfo(dtype).max) // 4)).to(dtype) for n in dims]
    pooled = explicit_tensor_sketch(xs, hashes, signs, d)
    gate = torch.exp2(_powers_to_near_max(pooled, dtype)).to(dtype)
    z = pooled * gate.double()
    assert _overflows(z, dtype).all()
    cotangent = randn(gen, 2, d)

    on_device = [h.to(device) for h in hashes], [s.to(device) for s in signs]

    def fn(eps, be):
        return lambda t: ff.compact_bilinear(t[:2], *on_device, d, gate=t[2], eps=eps, backend=be)

    out, grads = _output_and_grads(fn(EPS, backend), xs + [gate], cotangent, device)
    # The gate scaled down by SCALE scales z alike: the inputs' gradients are unchanged.
    mid = [x.double() for x in xs] + [gate.double() * SCALE]
    _, grads_mid = _output_and_grads(fn(EPS * SCALE, "eager"), mid, cotangent, device)
    expected = signed_sqrt_l2_oracle(z * SCALE, EPS * SCALE)
    _assert_matches(out, grads, expected, [grads_mid[0], grads_mid[1], grads_mid[2] * SCALE], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_factorized_bilinear_rows_near_the_maximum(gen, backend, dtype):
    # factor 1: z_j = px_j py_j with no group sum, whose terms could overflow before z does.
    # Diagonal weights and inputs of magnitudes in [0.8, 1] keep the entries of a row within a
    # factor 2.5 of each other, so that scaling its largest to 0.45-0.9 of the maximum makes
    # every row overflow.
    o = 8

    def balanced(*shape):
        signs = torch.randint(2, shape, generator=gen) * 2 - 1
        return (0.8 + 0.2 * torch.rand(shape, generator=gen, dtype=F64)) * signs

    x, y = balanced(2, o).to(dtype), balanced(2, o).to(dtype)
    wx, wy = torch.diag(balanced(o)).to(dtype), torch.diag(balanced(o)).to(dtype)
    z = mfb_oracle(x, y, wx, None, wy, None, 1, normalize=False)
    # Row b of x scaled by 2^a_b and of y by 2^c_b scales z's row b by 2^(a_b + c_b).
    power = _powers_to_near_max(z.abs().amax(-1, keepdim=True), dtype)
    a = torch.floor(power / 2)
    x_big, y_big = (x * torch.exp2(a)).to(dtype), (y * torch.exp2(power - a)).to(dtype)
    z = z * torch.exp2(a) * torch.exp2(power - a)  # 2^power alone may overflow
    assert _overflows(z, dtype).all()
    cotangent = randn(gen, 2, o)

    def fn(eps, be):
        return lambda t: ff.factorized_bilinear(t[0], t[1], t[2], None, t[3], None, 1, eps=eps, backend=be)

    out, grads = _output_and_grads(fn(EPS, backend), [x_big, y_big, wx, wy], cotangent, backend_device(backend))
    # x and y scaled by sqrt(SCALE) each scale z by SCALE.
    mid = [x_big.double() * SCALE**0.5, y_big.double() * SCALE**0.5, wx.double(), wy.double()]
    _, grads_mid = _output_and_grads(fn(EPS * SCALE, "eager"), mid, cotangent)
    expected = signed_sqrt_l2_oracle(z * SCALE, EPS * SCALE)
    scales = [SCALE**0.5, SCALE**0.5, 1.0, 1.0]
    _assert_matches(out, grads, expected, [g * s for g, s in zip(grads_mid, scales)], dtype)


# --------------------------------------------------------------------------- inf and NaN


def _assert_rows_nan(t: torch.Tensor, bad_rows, what: str) -> None:
    good = [r for r in range(t.shape[0]) if r not in bad_rows]
    assert t[list(bad_rows)].isnan().all(), f"{what}: rows {bad_rows} must be all NaN"
    assert t[good].isfinite().all(), f"{what}: rows {good} must stay finite"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_signed_sqrt_l2_rows_with_inf_or_nan_are_nan(gen, backend, dtype):
    z = randn(gen, 4, 7)
    z[:, 3] = 0.0  # an exact zero in every row: its gradient is 0 only in a finite row
    z[1, 1], z[2, 5], z[3, 2] = math.inf, -math.inf, math.nan
    z = z.to(dtype)
    cotangent = randn(gen, 4, 7)
    out, (grad,) = _output_and_grads(
        lambda t: ff.signed_sqrt_l2(t[0], backend=backend), [z], cotangent, backend_device(backend)
    )
    _assert_rows_nan(out, (1, 2, 3), "output")
    _assert_rows_nan(grad, (1, 2, 3), "gradient")
    _, (grad_ref,) = _output_and_grads(
        lambda t: ff.signed_sqrt_l2(t[0], backend="eager"), [z[:1].double()], cotangent[:1]
    )
    _assert_matches(out[:1], [grad[:1]], signed_sqrt_l2_oracle(z[:1]), [grad_ref], dtype)


def _cbp_with_bad_rows(gen, dtype, device, gated):
    hashes, signs = random_hashes_signs(gen, [5, 4], 7)
    hashes, signs = [h.to(device) for h in hashes], [s.to(device) for s in signs]
    leaves = [randn(gen, 3, 5, dtype=dtype), randn(gen, 3, 4, dtype=dtype)]
    if gated:
        leaves.append((torch.rand(3, 7, generator=gen) + 0.5).to(dtype))
    leaves = [t.to(device) for t in leaves]
    with torch.no_grad():
        leaves[0][1, 2] = math.nan
        leaves[1][2, 0] = math.inf

    def fn(t, be):
        gate = t[2] if gated else None
        return ff.compact_bilinear(t[:2], hashes, signs, 7, gate=gate, normalize=True, backend=be)

    return fn, leaves, len(leaves)


def _mfb_with_bad_rows(gen, dtype, device):
    leaves = [randn(gen, 3, 5, dtype=dtype), randn(gen, 3, 4, dtype=dtype)]
    leaves += [randn(gen, *shape, dtype=dtype) for shape in [(6, 5), (6,), (6, 4), (6,)]]
    leaves = [t.to(device) for t in leaves]
    with torch.no_grad():
        leaves[0][1, 2] = math.nan
        leaves[1][2, 0] = -math.inf

    def fn(t, be):
        return ff.factorized_bilinear(t[0], t[1], t[2], t[3], t[4], t[5], 2, normalize=True, backend=be)

    return fn, leaves, 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize(
    "make", [lambda *a: _cbp_with_bad_rows(*a, gated=False), lambda *a: _cbp_with_bad_rows(*a, gated=True),
             _mfb_with_bad_rows], ids=["cbp", "cbgp", "mfb"],
)  # fmt: skip
def test_normalised_poolings_turn_inf_and_nan_rows_into_nan(gen, backend, dtype, make):
    # Sample 1 holds a NaN, sample 2 an inf: both come out all NaN, sample 0 untouched.
    fn, leaves, per_sample = make(gen, dtype, backend_device(backend))
    out, grads = _output_and_grads(lambda t: fn(t, backend), leaves, randn(gen, 3, fn(leaves, "eager").shape[-1]))
    _assert_rows_nan(out, (1, 2), "output")
    for i, g in enumerate(grads[:per_sample]):
        _assert_rows_nan(g, (1, 2), f"grad of input {i}")
    # Parameters are shared by the samples: their gradients sum in the NaN ones.
    for i, g in enumerate(grads[per_sample:]):
        assert g.isnan().all(), f"grad of parameter {i}"


# --------------------------------------------------------------------------- cases
# Each case: (fn(leaves, backend) -> output, leaves, how many leading leaves are per-sample
# inputs (the rest are parameters)). Hashes and signs live on ``device``; so do the leaves.

D = 6


def _sketch_args(gen, dims, device):
    hashes, signs = random_hashes_signs(gen, dims, D)
    return [h.to(device) for h in hashes], [s.to(device) for s in signs]


def _leaf(gen, *shape, dtype, device):
    return randn(gen, *shape, dtype=dtype).to(device)


def count_sketch_case(gen, lead, dtype, device):
    (h,), (s,) = _sketch_args(gen, [7], device)
    x = _leaf(gen, *lead, 7, dtype=dtype, device=device)
    return (lambda t, be: ff.count_sketch(t[0], h, s, D, backend=be)), [x], 1


def tensor_sketch_case(gen, lead, dtype, device):
    hashes, signs = _sketch_args(gen, [5, 4], device)
    xs = [_leaf(gen, *lead, n, dtype=dtype, device=device) for n in (5, 4)]
    return (lambda t, be: ff.tensor_sketch(t, hashes, signs, D, backend=be)), xs, 2


def compact_bilinear_case(gen, lead, dtype, device, pool=None):
    """Gated and normalised; with ``pool`` the last leading dimension is pooled."""
    hashes, signs = _sketch_args(gen, [5, 4], device)
    out_lead = lead if pool is None else lead[:-1]
    leaves = [_leaf(gen, *lead, n, dtype=dtype, device=device) for n in (5, 4)]
    leaves.append((torch.rand(*out_lead, D, generator=gen) + 0.5).to(dtype=dtype, device=device))
    pool_dim = None if pool is None else len(lead) - 1

    def fn(t, be):
        pooling = dict(pool_dim=pool_dim, pool=pool or "sum")
        return ff.compact_bilinear(t[:2], hashes, signs, D, **pooling, gate=t[2], backend=be)

    return fn, leaves, 3


def signed_sqrt_l2_case(gen, lead, dtype, device):
    return (lambda t, be: ff.signed_sqrt_l2(t[0], backend=be)), [_leaf(gen, *lead, D, dtype=dtype, device=device)], 1


def factorized_bilinear_case(gen, lead, dtype, device):
    leaves = [_leaf(gen, *lead, n, dtype=dtype, device=device) for n in (5, 4)]
    leaves += [_leaf(gen, *shape, dtype=dtype, device=device) for shape in [(6, 5), (6,), (6, 4), (6,)]]
    mask = ((torch.rand(*lead, 6, generator=gen) > 0.3) / 0.7).to(dtype=dtype, device=device)

    def fn(t, be):
        return ff.factorized_bilinear(t[0], t[1], t[2], t[3], t[4], t[5], 2, dropout_mask=mask, backend=be)

    return fn, leaves, 2


def low_rank_fusion_case(gen, lead, dtype, device):
    leaves = [_leaf(gen, *lead, n, dtype=dtype, device=device) for n in (5, 4)]
    leaves += [_leaf(gen, *shape, dtype=dtype, device=device) for shape in [(2, 6, 3), (2, 5, 3), (1, 2), (1, 3)]]
    return (lambda t, be: ff.low_rank_fusion(t[:2], t[2:4], t[4], t[5], backend=be)), leaves, 2


def tensor_fusion_case(gen, lead, dtype, device):
    leaves = [_leaf(gen, *lead, n, dtype=dtype, device=device) for n in (5, 4)]
    leaves += [_leaf(gen, 3, 30, dtype=dtype, device=device), _leaf(gen, 3, dtype=dtype, device=device)]
    return (lambda t, be: ff.tensor_fusion(t[:2], t[2], t[3], backend=be)), leaves, 2


CASES = {
    "count_sketch": count_sketch_case,
    "tensor_sketch": tensor_sketch_case,
    "compact_bilinear": compact_bilinear_case,
    "compact_bilinear pooled": lambda *a: compact_bilinear_case(*a, pool="mean"),
    "signed_sqrt_l2": signed_sqrt_l2_case,
    "factorized_bilinear": factorized_bilinear_case,
    "low_rank_fusion": low_rank_fusion_case,
    "tensor_fusion": tensor_fusion_case,
}
# The op of each case, as the kernel table names it.
OPS = {
    "count_sketch": "count_sketch",
    "tensor_sketch": "compact_bilinear",
    "compact_bilinear": "compact_bilinear",
    "compact_bilinear pooled": "compact_bilinear",
    "signed_sqrt_l2": "signed_sqrt_l2",
    "factorized_bilinear": "factorized_bilinear",
    "low_rank_fusion": "low_rank_fusion",
    "tensor_fusion": "tensor_fusion",
}

def test_every_op_has_bad_input_cases():
    # The case lists name ops by hand: a new op (a spec) must join them.
    assert set(OPS.values()) == set(SPECS) and {name.split()[0] for name in EMPTY_FEATURES} >= set(SPECS)


# name -> (factory, input feature sizes); pooling modules take (B, T, n) inputs.
MODULES = {
    "cbp": (lambda: ff.CompactBilinearPooling([5, 4], D), (5, 4)),
    "cbp pooled": (lambda: ff.CompactBilinearPooling([5, 4], D, pool="mean"), (5, 4)),
    "cbgp": (lambda: ff.GatedCompactBilinearPooling([5, 4], D), (5, 4)),
    "cbgp pooled": (lambda: ff.GatedCompactBilinearPooling([5, 4], D, pool="sum"), (5, 4)),
    "mfb training": (lambda: ff.FactorizedBilinearPooling([5, 4], 3, factor=2).train(), (5, 4)),
    "lmf": (lambda: ff.LowRankFusion([5, 4], 3, rank=2), (5, 4)),
    "tfn": (lambda: ff.TensorFusion([5, 4], 3), (5, 4)),
}


def _module_lead(name, batch):
    return (batch, 3) if "pooled" in name else (batch,)


# --------------------------------------------------------------------------- NaN elsewhere


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "eager"])
@pytest.mark.parametrize("case", [c for c in CASES if c != "compact_bilinear pooled"])
def test_nan_reaches_what_it_reaches_in_the_reference(gen, backend, case):
    fn, leaves, _ = CASES[case](gen, (3,), F32, backend_device(backend))
    with torch.no_grad():
        leaves[0][1, 2] = math.nan
    cotangent = randn(gen, *fn(leaves, "eager").shape)
    out, grads = _output_and_grads(lambda t: fn(t, backend), leaves, cotangent)
    ref, ref_grads = _output_and_grads(lambda t: fn(t, "eager"), leaves, cotangent)
    assert out[1].isnan().any() and out[[0, 2]].isfinite().all()
    for i, (t, r) in enumerate(zip([out, *grads], [ref, *ref_grads])):
        what = "output" if i == 0 else f"grad of leaf {i - 1}"
        assert torch.equal(t.isnan(), r.isnan()), f"{what}: NaN pattern"
        assert torch.equal(t.isfinite(), r.isfinite()), f"{what}: finite pattern"


# --------------------------------------------------------------------------- meta


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


@pytest.mark.parametrize("backend", ("auto",) + BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_functions_on_meta_give_shapes(gen, backend, case):
    fn, leaves, _ = CASES[case](gen, (2, 3), F32, "cpu")
    cotangent = torch.ones(fn(leaves, "torch").shape)
    expected, expected_grads = _output_and_grads(lambda t: fn(t, "torch"), leaves, cotangent)
    fn, meta_leaves, _ = CASES[case](gen, (2, 3), F32, "meta")
    out, grads = _output_and_grads(lambda t: fn(t, backend), meta_leaves, torch.empty(expected.shape, device="meta"))
    assert out.device.type == "meta" and out.shape == expected.shape and out.dtype == F32
    for g, e in zip(grads, expected_grads):
        assert g.device.type == "meta" and g.shape == e.shape and g.dtype == e.dtype


@pytest.mark.parametrize("backend", ("auto",) + BACKENDS)
@pytest.mark.parametrize("name", MODULES)
def test_modules_on_meta_give_shapes(gen, backend, name):
    factory, dims = MODULES[name]
    module = factory().to("meta")
    xs = [torch.empty(*_module_lead(name, 2), n, device="meta", requires_grad=True) for n in dims]
    with ff.backend(backend):
        out = module(*xs)
    assert out.device.type == "meta" and out.shape == _module_lead(name, 2)[:1] + (module.out_dim,)
    params = list(module.parameters())
    grads = torch.autograd.grad(out, xs + params, torch.empty(out.shape, device="meta"))
    for g, t in zip(grads, xs + params):
        assert g.device.type == "meta" and g.shape == t.shape


# --------------------------------------------------------------------------- empty batches

EMPTY_LEADS = [(0,), (0, 3), (2, 0)]


# Pooling over an empty dimension has a non-empty output: the next test covers it.
EMPTY_BATCH_CASES = [
    pytest.param(case, lead, id=f"{case}-{lead}")
    for case in CASES
    for lead in EMPTY_LEADS
    if not (case == "compact_bilinear pooled" and lead[-1] == 0)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, lead", EMPTY_BATCH_CASES)
def test_empty_batches_give_empty_outputs_and_zero_parameter_gradients(gen, backend, lead, case):
    fn, leaves, per_sample = CASES[case](gen, lead, F32, backend_device(backend))
    out_lead = lead[:-1] if case == "compact_bilinear pooled" else lead
    out = fn([t.detach().requires_grad_(True) for t in leaves], backend)
    assert out.shape[:-1] == out_lead and out.numel() == 0 and out.dtype == F32
    out, grads = _output_and_grads(lambda t: fn(t, backend), leaves, torch.empty(out.shape))
    for i, (g, t) in enumerate(zip(grads, leaves)):
        assert g.shape == t.shape and g.dtype == t.dtype, f"grad of leaf {i}"
        if i >= per_sample:
            assert torch.equal(g, torch.zeros_like(t)), f"grad of parameter {i}: an empty batch contributes 0"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool", ["sum", "mean"])
def test_pooling_over_an_empty_dimension_is_the_sum_or_mean_of_nothing(gen, backend, pool):
    # As torch.sum and torch.mean of nothing: 0 (its signed sqrt + L2 is 0 too), or NaN.
    fn, leaves, _ = compact_bilinear_case(gen, (2, 0), F64, backend_device(backend), pool=pool)
    out, grads = _output_and_grads(lambda t: fn(t, backend), leaves, randn(gen, 2, D))
    assert out.shape == (2, D)
    if pool == "sum":
        zeros = torch.zeros(2, D, dtype=F64, device=out.device)
        assert torch.equal(out, zeros) and torch.equal(grads[2], zeros)
    else:
        assert out.isnan().all() and grads[2].isnan().all()
    assert grads[0].shape == (2, 0, 5) and grads[1].shape == (2, 0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODULES)
def test_modules_take_empty_batches(gen, backend, name):
    factory, dims = MODULES[name]
    device = backend_device(backend)
    module = factory().to(device)
    xs = [torch.randn(*_module_lead(name, 0), n, device=device, requires_grad=True) for n in dims]
    with ff.backend(backend):
        out = module(*xs)
    assert out.shape == (0, module.out_dim)
    params = list(module.parameters())
    grads = torch.autograd.grad(out, xs + params, torch.empty(out.shape, device=device))
    for g, t in zip(grads, xs + params):
        assert g.shape == t.shape
    assert all(torch.equal(g, torch.zeros_like(p)) for g, p in zip(grads[len(xs) :], params))


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("case", CASES)
def test_empty_batches_launch_no_compiled_kernel(gen, monkeypatch, backend, case):
    def refuse(*args):
        raise AssertionError(f"a {backend} kernel was launched on an empty batch")

    op = OPS[case]
    kernel = _dispatch._KERNELS[op][backend]
    refusing = dataclasses.replace(kernel, forward=refuse, backward=refuse)
    monkeypatch.setitem(_dispatch._KERNELS[op], backend, refusing)
    fn, leaves, _ = CASES[case](gen, (0, 3), F32, backend_device(backend))
    out, _ = _output_and_grads(lambda t: fn(t, backend), leaves, torch.empty(fn(leaves, backend).shape))
    assert out.numel() == 0


EMPTY_FEATURES = {
    "count_sketch x": (lambda a: ff.count_sketch(a.x[:, :0], a.h[:0], a.s[:0], D), r"\bx\b"),
    "signed_sqrt_l2 z": (lambda a: ff.signed_sqrt_l2(a.x[:, :0]), r"\bz\b"),
    "compact_bilinear xs[1]": (
        lambda a: ff.compact_bilinear([a.x, a.y[:, :0]], [a.h, a.h[:0]], [a.s, a.s[:0]], D), r"xs\[1\]"
    ),
    "compact_bilinear gate": (
        lambda a: ff.compact_bilinear([a.x, a.y], [a.h, a.h], [a.s, a.s], D, gate=a.x[:, :0]), "gate"
    ),
    "factorized_bilinear y": (
        lambda a: ff.factorized_bilinear(a.x, a.y[:, :0], a.w, None, a.w[:, :0], None, 2), r"\by\b"
    ),
    "factorized_bilinear weight_x": (
        lambda a: ff.factorized_bilinear(a.x, a.y, a.w[:0], None, a.w[:0], None, 2), "weight_x"
    ),
    "low_rank_fusion weights": (
        lambda a: ff.low_rank_fusion([a.x, a.y], [a.f[:0], a.f[:0]], a.x[:1, :0], a.x[0, :3]), "weights"
    ),
    "tensor_fusion weight": (lambda a: ff.tensor_fusion([a.x, a.y], a.w[:0, :0], None), "weight"),
}


class _Args:
    def __init__(self, gen):
        self.x, self.y = randn(gen, 2, 4), randn(gen, 2, 4)
        (self.h,), (self.s,) = random_hashes_signs(gen, [4], D)
        self.w, self.f = randn(gen, 4, 4), randn(gen, 2, 5, 3)


@pytest.mark.parametrize("case", EMPTY_FEATURES)
def test_empty_features_and_parameters_are_errors_naming_the_argument(gen, case):
    call, name = EMPTY_FEATURES[case]
    with pytest.raises(ValueError, match=name):
        call(_Args(gen))
