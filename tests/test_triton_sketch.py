"""The Triton count sketch, compact bilinear pooling and signed sqrt + L2 kernels against the
float64 reference: outputs and every gradient.

Runs on helpers.TRITON_DEVICE: CUDA when present, else the CPU under Triton's interpreter
(conftest.py sets TRITON_INTERPRET=1 before fastfusion is imported). Shapes are tiny and odd on
purpose (odd d, n not a multiple of any block, B = 1, T = 1).
"""

import pytest
import torch
from helpers import TRITON_DEVICE as DEVICE
from helpers import rel_err, skip_module_unless_triton_runs

skip_module_unless_triton_runs()

import fastfusion  # noqa: E402
from fastfusion import (  # noqa: E402
    _dispatch,
    compact_bilinear,
    count_sketch,
    draw_hashes_and_signs,
    signed_sqrt_l2,
    tensor_sketch,
)
from fastfusion.triton_backend import count_sketch as triton_count_sketch  # noqa: E402

HALF_DTYPES = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # fresh inputs per check, reproducible per test


def sketch_params(in_dims, out_dim, seed=0, sign_dtype=torch.int8):
    hashes, signs = zip(*draw_hashes_and_signs(in_dims, out_dim, seed))
    return [h.to(DEVICE) for h in hashes], [s.to(device=DEVICE, dtype=sign_dtype) for s in signs]


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def run(fn, inputs, grad_out=None):
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> w.r.t. every input."""
    inputs = [leaf(t) for t in inputs]
    out = fn(*inputs)
    if grad_out is None:
        grad_out = torch.randn_like(out, dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    return out, list(grads), grad_out


def check_against_float64(fn, inputs, dtype, tol=1e-12):
    """Triton in ``dtype`` vs the eager reference in float64, outputs and every gradient.

    float64 must agree to ``tol``. Other dtypes follow the rule "our error <= 2x the eager
    reference's own error in that dtype" (both against float64): the gradients of signed sqrt
    + L2 amplify rounding by the conditioning of the input, for eager as for us. The floor of
    two epsilons of the dtype (the kernel's rounding and the final cast's) covers inputs
    where eager happens to round luckily."""
    reference = [t.double() for t in inputs]
    ref_out, ref_grads, grad_out = run(lambda *a: fn(*a, backend="eager"), reference)
    out, grads, _ = run(lambda *a: fn(*a, backend="triton"), [t.to(dtype) for t in inputs], grad_out)
    assert out.dtype == dtype and out.is_contiguous()
    ours = [out] + grads
    assert [t.dtype for t in grads] == [dtype] * len(grads)
    if dtype == torch.float64:
        bounds = [tol] * len(ours)
    else:
        eager_out, eager_grads, _ = run(lambda *a: fn(*a, backend="eager"), [t.to(dtype) for t in inputs], grad_out)
        floor = 2 * torch.finfo(dtype).eps
        bounds = [2 * rel_err(t, ref) + floor for t, ref in zip([eager_out] + eager_grads, [ref_out] + ref_grads)]
    for i, (t, ref, bound) in enumerate(zip(ours, [ref_out] + ref_grads, bounds)):
        assert rel_err(t, ref) <= bound, f"tensor {i}: error {rel_err(t, ref):.3g} > bound {bound:.3g}"


# ------------------------------------------------------------------------------ count sketch

@pytest.mark.parametrize("shape, out_dim", [((1, 37), 13), ((3, 5, 131), 67), ((4, 300), 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_count_sketch_matches_reference(shape, out_dim, dtype):
    (hash,), (sign,) = sketch_params([shape[-1]], out_dim)
    x = torch.randn(shape, device=DEVICE)
    check_against_float64(lambda x, backend: count_sketch(x, hash, sign, out_dim, backend=backend), [x], dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_count_sketch_half(dtype):
    (hash,), (sign,) = sketch_params([53], 29)
    x = torch.randn(3, 53, device=DEVICE)
    check_against_float64(lambda x, backend: count_sketch(x, hash, sign, 29, backend=backend), [x], dtype)


def test_count_sketch_non_contiguous_and_sign_dtypes():
    hash = torch.randint(0, 19, (41,), device=DEVICE)[::1]
    sign = (torch.randint(0, 2, (82,), device=DEVICE) * 2 - 1).float()[::2]  # strided sign
    x = torch.randn(41, 6, device=DEVICE).t()  # column stride != 1
    check_against_float64(lambda x, backend: count_sketch(x, hash, sign, 19, backend=backend), [x], torch.float32)


def test_count_sketch_is_deterministic():
    (hash,), (sign,) = sketch_params([257], 11)  # ~23 inputs per bucket
    x = torch.randn(5, 257, device=DEVICE)
    assert torch.equal(count_sketch(x, hash, sign, 11, backend="triton"), count_sketch(x, hash, sign, 11, backend="triton"))


def test_inverse_table_follows_in_place_hash_changes():
    (hash,), (sign,) = sketch_params([29], 17)
    x = torch.randn(2, 29, device=DEVICE)
    count_sketch(x, hash, sign, 17, backend="triton")
    hash.copy_(torch.randint(0, 17, (29,), device=DEVICE))
    sign.neg_()
    expected = count_sketch(x.double(), hash, sign, 17, backend="eager")
    assert rel_err(count_sketch(x, hash, sign, 17, backend="triton"), expected) < 1e-6
    table = triton_count_sketch.inverse_table(hash, sign, 17)
    assert triton_count_sketch.inverse_table(hash, sign, 17) is table


def test_count_sketch_takes_inference_tensors():
    # Inference tensors have no version counter, so their inverse table is rebuilt on every
    # call: a write inside inference mode, invisible to any counter, is still seen.
    with torch.inference_mode():
        (hash,), (sign,) = sketch_params([29], 17)
    x = torch.randn(2, 29, device=DEVICE)
    for _ in range(2):
        expected = count_sketch(x.double(), hash, sign, 17, backend="eager")
        assert rel_err(count_sketch(x, hash, sign, 17, backend="triton"), expected) < 1e-6
        with torch.inference_mode():
            hash.copy_(torch.randint(0, 17, (29,), device=DEVICE))


def test_count_sketch_gradcheck_float64():
    (hash,), (sign,) = sketch_params([23], 9)
    x = torch.randn(2, 23, device=DEVICE, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: count_sketch(x, hash, sign, 9, backend="triton"), (x,))


# --------------------------------------------------------------------------- signed sqrt + L2

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF_DTYPES])
def test_signed_sqrt_l2_matches_reference(dtype):
    z = torch.randn(3, 2, 1029, device=DEVICE)  # d spans two blocks and a partial one
    z[0, 0, :7] = 0  # finite gradients at exact zeros
    z[1, 1] = 0  # an all-zero row divides by eps
    check_against_float64(lambda z, backend: signed_sqrt_l2(z, backend=backend), [z], dtype)


def test_signed_sqrt_l2_non_contiguous_and_gradcheck():
    z = torch.randn(37, 4, device=DEVICE).t()
    check_against_float64(lambda z, backend: signed_sqrt_l2(z, backend=backend), [z], torch.float32)
    z = torch.randn(2, 13, device=DEVICE, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: signed_sqrt_l2(z, 1e-3, backend="triton"), (z,))


# ---------------------------------------------------------------------- compact bilinear pooling

def cbp_case(in_dims, out_dim, batch, positions, *, pool, gate, normalize, non_contiguous=False, algorithm="fft"):
    """(fn, inputs): fn(*xs, [gate], backend) -> compact bilinear output. Triton runs
    ``algorithm``; so does eager in lower precisions (PyTorch's own error, for
    check_against_float64's rule, of the same algorithm), while the float64 reference is the
    FFTs as the papers state them."""
    hashes, signs = sketch_params(in_dims, out_dim)
    if non_contiguous:  # (B, T, n) views of (n, T, B) storage, and a transposed gate
        xs = [torch.randn(n, positions, batch, device=DEVICE).permute(2, 1, 0) for n in in_dims]
    else:
        xs = [torch.randn(batch, positions, n, device=DEVICE) for n in in_dims]
    if pool is None:
        xs = [x[:, 0] for x in xs]
    inputs = list(xs)
    if gate:
        g = torch.rand(out_dim, batch, device=DEVICE).t() if non_contiguous else torch.rand(batch, out_dim, device=DEVICE)
        inputs.append(g + 0.5)
    m = len(in_dims)

    def fn(*args, backend):
        return compact_bilinear(
            list(args[:m]), hashes, signs, out_dim, pool_dim=None if pool is None else 1, pool=pool or "sum",
            gate=args[m] if gate else None, normalize=normalize, backend=backend,
            algorithm="fft" if backend == "eager" and args[0].dtype == torch.float64 else algorithm,
        )

    return fn, inputs


CBP_CASES = [
    # in_dims, out_dim, B, T, pool, gate, normalize
    ((37, 29), 31, 3, 1, None, False, True),
    ((37, 29), 31, 1, 1, "sum", True, True),
    ((37, 29), 33, 2, 5, "sum", False, False),  # tensor_sketch
    ((37, 29), 31, 2, 5, "mean", True, False),
    ((19, 23, 17), 27, 2, 3, "mean", False, True),
    ((19, 23, 17), 27, 1, 4, "sum", True, True),
    ((19, 23, 17), 300, 2, 1, None, True, False),  # d > one frequency block
]


@pytest.mark.parametrize("in_dims, out_dim, batch, positions, pool, gate, normalize", CBP_CASES)
def test_compact_bilinear_matches_reference(in_dims, out_dim, batch, positions, pool, gate, normalize):
    fn, inputs = cbp_case(in_dims, out_dim, batch, positions, pool=pool, gate=gate, normalize=normalize)
    check_against_float64(fn, inputs, torch.float32)


@pytest.mark.parametrize("modalities", [2, 3])
def test_compact_bilinear_non_contiguous(modalities):
    fn, inputs = cbp_case((13, 21, 11)[:modalities], 25, 2, 3, pool="sum", gate=True, normalize=True, non_contiguous=True)
    assert not any(t.is_contiguous() for t in inputs)
    check_against_float64(fn, inputs, torch.float32)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_compact_bilinear_half(dtype):
    fn, inputs = cbp_case((37, 29), 31, 2, 3, pool="mean", gate=True, normalize=True)
    check_against_float64(fn, inputs, dtype)


@pytest.mark.parametrize("pool, gate, normalize", [("mean", True, True), ("sum", False, False)])
def test_compact_bilinear_gradcheck_float64(pool, gate, normalize):
    fn, inputs = cbp_case((7, 5, 6), 9, 1, 2, pool=pool, gate=gate, normalize=normalize)
    inputs = [leaf(t.double()) for t in inputs]
    assert torch.autograd.gradcheck(lambda *a: fn(*a, backend="triton"), inputs)
    check_against_float64(fn, inputs, torch.float64)


def test_compact_bilinear_autocast():
    fn, inputs = cbp_case((37, 29), 31, 2, 3, pool="sum", gate=True, normalize=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = fn(*inputs, backend="triton")
    assert out.dtype == torch.float32
    assert rel_err(out, fn(*[t.double() for t in inputs], backend="eager")) < 1e-5


def test_compiled_module_with_triton_backend():
    torch._dynamo.reset()
    module = fastfusion.CompactBilinearPooling((13, 11), 21, pool="mean").to(DEVICE)
    a = torch.randn(2, 3, 13, device=DEVICE, requires_grad=True)
    v = torch.randn(2, 3, 11, device=DEVICE, requires_grad=True)
    with fastfusion.backend("triton"):
        compiled = torch.compile(module, fullgraph=True)
        out = compiled(a, v)
        weights = torch.randn_like(out)  # not out.square(): its sum is 1 after L2 normalisation
        grads = torch.autograd.grad((out * weights).sum(), (a, v))
    with fastfusion.backend("eager"):
        ref = module(a.double(), v.double())
        ref_grads = torch.autograd.grad((ref * weights).sum(), (a, v))
    assert rel_err(out, ref) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5


# The Gram path (two modalities): forward and backward kernels tile (i, j, t) and (i, t, j)
# in blocks of 32 to 128 (the interpreter runs the first config, 128 x 128 x 32), so n = 130,
# 131 and T = 150 need several tiles in every dimension with ragged last ones; d = 31 and 97
# make many (i, j) share a bin.
GRAM_CASES = [
    # in_dims, out_dim, B, T, pool, gate, normalize
    ((130, 131), 97, 2, 150, "mean", True, True),
    ((130, 67), 97, 1, 70, "sum", False, False),  # tensor_sketch
    ((37, 29), 31, 3, 1, None, False, True),
    ((37, 29), 33, 2, 5, "sum", True, False),
    ((29, 37), 31, 2, 5, "mean", False, True),
]


@pytest.mark.parametrize("in_dims, out_dim, batch, positions, pool, gate, normalize", GRAM_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compact_bilinear_gram_matches_reference(in_dims, out_dim, batch, positions, pool, gate, normalize, dtype):
    fn, inputs = cbp_case(in_dims, out_dim, batch, positions, pool=pool, gate=gate, normalize=normalize, algorithm="gram")
    check_against_float64(fn, inputs, dtype)


@pytest.mark.parametrize("pool, gate, normalize", [("mean", True, True), ("sum", False, False)])
def test_compact_bilinear_gram_gradcheck_float64(pool, gate, normalize):
    # float64 Gram calls run the "torch" kernels: the dispatcher routes them (tl.dot has no float64).
    fn, inputs = cbp_case((7, 5), 9, 1, 3, pool=pool, gate=gate, normalize=normalize, algorithm="gram")
    inputs = [leaf(t.double()) for t in inputs]
    assert torch.autograd.gradcheck(lambda *a: fn(*a, backend="triton"), inputs)


def test_compact_bilinear_gram_non_contiguous():
    fn, inputs = cbp_case((130, 21), 25, 2, 40, pool="mean", gate=True, normalize=True, non_contiguous=True,
                          algorithm="gram")
    assert not any(t.is_contiguous() for t in inputs)
    check_against_float64(fn, inputs, torch.float32)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("pool, gate, normalize", [("mean", True, True), ("sum", False, False)])
def test_compact_bilinear_gram_half(dtype, pool, gate, normalize):
    fn, inputs = cbp_case((130, 67), 97, 2, 70, pool=pool, gate=gate, normalize=normalize, algorithm="gram")
    check_against_float64(fn, inputs, dtype)


def test_compact_bilinear_gram_propagates_nan_only_where_it_lands():
    # A NaN in x[0, t, i] reaches exactly the bins (h1(i) + h2(j)) mod d of sample 0: the Gram
    # path is a count sketch, not a transform that spreads it over every bin.
    hashes, signs = sketch_params((37, 29), 97)
    x, y = torch.randn(2, 3, 37, device=DEVICE), torch.randn(2, 3, 29, device=DEVICE)
    x[0, 1, 5] = float("nan")
    out = tensor_sketch([x, y], hashes, signs, 97, pool_dim=1, backend="triton", algorithm="gram")
    nan_bins = torch.zeros(97, dtype=torch.bool, device=DEVICE)
    nan_bins[(hashes[0][5] + hashes[1]) % 97] = True
    assert torch.equal(out.isnan(), torch.stack([nan_bins, torch.zeros_like(nan_bins)]))
    reference = tensor_sketch([x.double(), y.double()], hashes, signs, 97, pool_dim=1, backend="eager", algorithm="gram")
    assert rel_err(out[~out.isnan()], reference[~out.isnan()]) < 1e-6


@pytest.mark.skipif(DEVICE.type != "cuda", reason="'auto' prefers Triton only on CUDA")
@pytest.mark.parametrize("op", ["count_sketch", "compact_bilinear", "signed_sqrt_l2"])
def test_auto_resolves_to_triton_on_cuda(op):
    assert _dispatch.resolve_backend(op, "cuda", "auto") == "triton"


@pytest.mark.parametrize("algorithm", ["gram", "fft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compact_bilinear_residuals_agree_with_the_fake_kernel(algorithm, dtype):
    # The Triton kernel saves z on the Gram path only (a predicate the fake kernel asks too),
    # and its backward gives the same gradients from it as when it recomputes.
    gen = torch.Generator().manual_seed(11)
    in_dims, out_dim = (9, 6), 13
    xs = [torch.randn(3, 4, n, generator=gen, dtype=dtype).to(DEVICE).requires_grad_() for n in in_dims]
    hashes = [torch.randint(0, out_dim, (n,), generator=gen).to(DEVICE) for n in in_dims]
    signs = [(torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(DEVICE, dtype) for n in in_dims]
    gate = torch.rand(3, out_dim, generator=gen, dtype=dtype).to(DEVICE).requires_grad_()
    args = (xs, hashes, signs, out_dim, True, gate, True, 1e-12, algorithm)
    op, backward = torch.ops.fastfusion.compact_bilinear, torch.ops.fastfusion.compact_bilinear_backward
    torch.library.opcheck(op, (*args, True, "triton"), test_utils=("test_schema", "test_faketensor"))
    out, residuals = op(*args, True, "triton")
    # float64 Gram calls run the "torch" kernels (tl.dot has no float64), which save nothing.
    assert len(residuals) == (1 if algorithm == "gram" and dtype != torch.float64 else 0)
    grad = torch.randn(3, out_dim, generator=gen, dtype=dtype).to(DEVICE)
    detached = ([x.detach() for x in xs], hashes, signs, out_dim, True, gate.detach(), True, 1e-12, algorithm)
    saved = backward(grad, residuals, *detached, "triton")
    recomputed = backward(grad, [], *detached, "triton")
    for a, b in zip(saved, recomputed, strict=True):
        assert rel_err(a, b) < (1e-12 if dtype == torch.float64 else 1e-6)
