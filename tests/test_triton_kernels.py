"""What is specific to the "triton" backend: its interpreter's limits, the caches and size
limits of its kernels, the residuals its forward kernels hand to their backward, "auto" on
CUDA, float64 (the reference's kernels), autocast and torch.compile through it. The ops'
values and gradients are checked in tests/test_<op>.py, on every backend.

Runs on helpers.TRITON_DEVICE: CUDA when present, else the CPU under Triton's interpreter."""

from unittest import mock

import numpy as np
import pytest
import torch

from helpers import TRITON_DEVICE as DEVICE
from helpers import TRITON_INTERPRETED, assert_rel_close, randn, rel_err, skip_module_unless_triton_runs

skip_module_unless_triton_runs()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import fastfusion  # noqa: E402
from fastfusion import (  # noqa: E402
    _dispatch,
    compact_bilinear,
    count_sketch,
    draw_hashes_and_signs,
    tensor_fusion,
)
from fastfusion.triton_backend import count_sketch as triton_count_sketch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    # Inputs drawn from the global generator, seeded per test: reproducible on every run.
    torch.manual_seed(0)


@triton.jit
def _cast_kernel(x_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, tl.load(x_ptr + i).to(out_ptr.dtype.element_ty))


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="a limit of the interpreter only")
def test_interpreter_truncates_bfloat16_casts():
    # Why helpers.conformance_params leaves out interpreted bfloat16: a float32 -> bfloat16
    # cast in a kernel truncates (about twice the error of PyTorch's round-to-nearest), while
    # float16 rounds to nearest. Should a Triton release fix it, this fails: add them back.
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    for dtype, same in ((torch.bfloat16, False), (torch.float16, True)):
        out = torch.empty(4096, dtype=dtype)
        _cast_kernel[(1,)](x, out, N=4096)
        assert torch.equal(out, x.to(dtype)) == same, dtype
    out = torch.empty(4096, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, out, N=4096)
    assert rel_err(out, x) > 1.8 * rel_err(x.to(torch.bfloat16), x)


def sketch_params(in_dims, out_dim, seed=0):
    hashes, signs = zip(*draw_hashes_and_signs(in_dims, out_dim, seed))
    return [h.to(DEVICE) for h in hashes], [s.to(device=DEVICE, dtype=torch.int8) for s in signs]


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


# The tensor_fusion kernels' limits on the modality sizes: clear errors, not wrong results.


def test_tensor_fusion_rejects_huge_modality():
    xs = [torch.randn(1, 1100, device=DEVICE), torch.randn(1, 1, device=DEVICE)]
    with pytest.raises(ValueError, match="modality sizes up to"):
        tensor_fusion(xs, torch.randn(2, 1101 * 2, device=DEVICE), None, backend="triton")


def test_tensor_fusion_rejects_wide_leading_modalities():
    xs = [torch.randn(1, 600, device=DEVICE), torch.randn(1, 600, device=DEVICE), torch.randn(1, 1, device=DEVICE)]
    with pytest.raises(ValueError, match="all modalities but the last"):
        tensor_fusion(xs, torch.randn(1, 601 * 601 * 2, device=DEVICE), None, backend="triton")


def _randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


# ---- compact bilinear pooling


def test_compact_bilinear_autocast():
    hashes, signs = sketch_params((37, 29), 31)
    inputs = [torch.randn(2, 3, n, device=DEVICE) for n in (37, 29)] + [torch.rand(2, 31, device=DEVICE) + 0.5]

    def fn(x, y, gate, backend):
        return compact_bilinear([x, y], hashes, signs, 31, pool_dim=1, pool="sum", gate=gate, backend=backend)

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


# ---- residuals of the fusion kernels; float64, torch.compile, autocast through the modules


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dims", [(3, 4), (2, 3, 4, 2, 3)], ids=["two", "five"])  # five > _MAX_SAVED
def test_low_rank_fusion_residuals(dims, dtype):
    # The forward saves the projections (the op's contract), and the backward from them
    # matches the backward that recomputes them (the kernels' result without residuals).
    B, rank, h = 6, 3, 10
    xs = [_randn(B, n).to(DEVICE, dtype) for n in dims]
    factors = [_randn(rank, n + 1, h).to(DEVICE, dtype) for n in dims]
    args = (xs, factors, _randn(rank).to(DEVICE, dtype), _randn(h).to(DEVICE, dtype))
    out, residuals = torch.ops.fastfusion.low_rank_fusion(*args, True, "triton")
    out_unsaved, none = torch.ops.fastfusion.low_rank_fusion(*args, False, "triton")
    assert none == [] and torch.equal(out, out_unsaved)
    wide = torch.float32 if dtype == torch.bfloat16 else dtype
    for got, x, w in zip(residuals, xs, factors, strict=True):
        expected = (x.to(wide) @ w[:, 1:].to(wide) + w[:, :1].to(wide)).transpose(0, 1).reshape(B, rank * h)
        assert got.dtype == wide and got.shape == (B, rank * h)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    grad = _randn(*out.shape).to(DEVICE, dtype)
    saved = torch.ops.fastfusion.low_rank_fusion_backward(grad, residuals, *args, "triton")
    recomputed = torch.ops.fastfusion.low_rank_fusion_backward(grad, [], *args, "triton")
    # In bfloat16 the recomputed projections are rounded to bfloat16, the saved ones are not.
    tol = 4 * torch.finfo(dtype).eps if dtype == torch.bfloat16 else 1e-6
    for a, b in zip(saved, recomputed, strict=True):
        assert rel_err(a, b) <= tol



def _lmf_args(dims, B, rank, h, dtype):
    xs = [_randn(B, n).to(DEVICE, dtype) for n in dims]
    factors = [_randn(rank, n + 1, h).to(DEVICE, dtype) for n in dims]
    return xs, factors, _randn(rank).to(DEVICE, dtype), _randn(h).to(DEVICE, dtype)


def _assert_triton_lmf_matches_float64(inputs, xs, factors, weights, bias, saved):
    # The Triton op on ``inputs`` (xs or views of them), forward and backward (from the
    # forward's residuals when ``saved``, else recomputed), against float64 autograd through
    # the eager reference on xs.
    M = len(xs)
    out, residuals = torch.ops.fastfusion.low_rank_fusion(inputs, factors, weights, bias, saved, "triton")
    grad = _randn(*out.shape).to(DEVICE, torch.float32)
    got = torch.ops.fastfusion.low_rank_fusion_backward(grad, residuals, inputs, factors, weights, bias, "triton")
    leaves = [t.detach().cpu().double().requires_grad_() for t in (*xs, *factors, weights, bias)]
    ref = fastfusion.low_rank_fusion(leaves[:M], leaves[M : 2 * M], leaves[2 * M], leaves[2 * M + 1], backend="eager")
    assert_rel_close(out.cpu(), ref.detach(), 1e-5, "out")
    expected = torch.autograd.grad(ref, leaves, grad.cpu().double())
    for k, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert_rel_close(a.cpu(), b, 1e-5, f"gradient {k}")


@pytest.mark.parametrize("dims", [(130, 5, 67), (2, 3, 4, 2, 3)], ids=["tiles", "five"])  # five > _MAX_SAVED
def test_low_rank_fusion_fused_backward(dims):
    # The fused backward at sizes the conformance cases do not reach: n_m over several column
    # tiles of both kernels (constant row only in the first), B over several row blocks, R*H
    # over several column blocks with H no multiple of BLOCK_K; or more modalities than one
    # launch writes (two groups). Against float64 autograd through the eager reference.
    xs, factors, weights, bias = _lmf_args(dims, 70, 2, 45, torch.float32)
    _assert_triton_lmf_matches_float64(xs, xs, factors, weights, bias, saved=True)


def test_low_rank_fusion_backward_reads_the_inputs_it_is_given():
    # The kernels read x_m in place: an in-place change between the forward and the backward
    # is seen, as by a fresh copy of the inputs.
    xs, factors, weights, bias = _lmf_args((3, 4), 6, 3, 10, torch.float32)
    _, residuals = torch.ops.fastfusion.low_rank_fusion(xs, factors, weights, bias, True, "triton")
    xs[0].add_(1.0)
    grad = _randn(6, 10).to(DEVICE, torch.float32)
    got = torch.ops.fastfusion.low_rank_fusion_backward(grad, residuals, xs, factors, weights, bias, "triton")
    fresh = [x.clone() for x in xs]
    expected = torch.ops.fastfusion.low_rank_fusion_backward(grad, residuals, fresh, factors, weights, bias, "triton")
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    # The stale inputs give another grad_W_0: the comparison above could tell them apart.
    stale = [xs[0] - 1.0, xs[1].clone()]
    stale_grads = torch.ops.fastfusion.low_rank_fusion_backward(grad, residuals, stale, factors, weights, bias, "triton")
    assert not torch.equal(got[2], stale_grads[2])


def _strided(x, layout):
    """x (B, n) as a view of another layout with x's values: "transposed" (strides (1, B)), "sliced"
    (a column window of a wider tensor, stride_b > n), "stepped" (every other column,
    stride_n = 2) or "contiguous"."""
    B, n = x.shape
    if layout == "transposed":
        return torch.empty_strided((B, n), (1, B), dtype=x.dtype, device=x.device).copy_(x)
    if layout == "sliced":
        wide = torch.zeros(B, n + 7, dtype=x.dtype, device=x.device)
        wide[:, 3 : 3 + n] = x
        return wide[:, 3 : 3 + n]
    if layout == "stepped":
        wide = torch.zeros(B, 2 * n, dtype=x.dtype, device=x.device)
        wide[:, ::2] = x
        return wide[:, ::2]
    return x


@pytest.mark.parametrize(
    "dims, B",
    [((5, 40, 9), 37), ((2, 3, 4, 2, 3), 37), ((5, 40, 9), 1)],
    ids=["three", "five", "batch-one"],  # five > _MAX_SAVED: two groups in every kernel
)
@pytest.mark.parametrize("saved", [True, False], ids=["saved", "recomputed"])
def test_low_rank_fusion_reads_strided_inputs_in_place(dims, B, saved):
    # Each x_m at its own strides (unit stride along the batch, row padding, column steps),
    # forward and every gradient against float64 autograd through the eager reference; with
    # the forward's residuals and with the projections recomputed.
    layouts = ["transposed", "sliced", "stepped", "contiguous"]
    xs, factors, weights, bias = _lmf_args(dims, B, 2, 45, torch.float32)
    views = [_strided(x, layouts[m % len(layouts)]) for m, x in enumerate(xs)]
    assert [torch.equal(v, x) for v, x in zip(views, xs)] == [True] * len(xs)
    assert views[0].stride() == (1, B) and views[2].stride() == (2 * dims[2], 2)
    _assert_triton_lmf_matches_float64(views, xs, factors, weights, bias, saved)


def test_low_rank_fusion_makes_no_copy_of_its_inputs():
    # Forward and backward through autograd with the factors' flat copy already cached (a
    # training step after the first), strided inputs: no [1, x_0, 1, x_1, ...] packing
    # (new_ones + cat), no contiguous copy (clone), no stacking of the residuals.
    from torch._library.custom_ops import OPDEFS
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            if func.namespace == "fastfusion":
                # The mode is off inside its handler: run the op's implementation under it, to
                # see the ops the backend runs.
                with self:
                    return OPDEFS[func._schema.name]._init_fn(*args, **(kwargs or {}))
            return func(*args, **(kwargs or {}))

    xs, factors, weights, bias = _lmf_args((3, 4, 5), 6, 2, 10, torch.float32)
    fastfusion.low_rank_fusion(xs, factors, weights, bias, backend="triton")  # caches the factors' copy
    xs = [_strided(x, "transposed").requires_grad_() for x in xs]
    with Ops() as ops:
        out = fastfusion.low_rank_fusion(xs, factors, weights, bias, backend="triton")
        out.backward(torch.ones_like(out))
    assert ops.names, "the dispatch mode saw nothing"
    # (The interpreter's own copies to and from numpy show up as empty/set_/copy_.)
    for forbidden in ("cat", "stack", "new_ones", "clone"):
        assert forbidden not in ops.names, f"{forbidden} in {ops.names}"
    assert all(x.grad is not None for x in xs)


# ---- factorized bilinear pooling -------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "B,nx,ny,o,k,normalize",
    [(3, 4, 3, 5, 3, False), (3, 4, 3, 24, 2, True), (2, 3, 2, 300, 1, True)],  # o = 300 > _MAX_ROW_O
    ids=["unnormalized", "whole-rows", "two-pass"],
)
def test_factorized_bilinear_residuals(B, nx, ny, o, k, normalize, dtype):
    # The forward saves the projections, and with normalize z before the normalisation (the
    # op's contract, which the fake kernel promises), and the backward from them matches
    # the backward that recomputes them (the kernels' result without residuals).
    x, y = _randn(B, nx).to(DEVICE, dtype), _randn(B, ny).to(DEVICE, dtype)
    wx, wy, bx, by = (_randn(*s).to(DEVICE, dtype) for s in ((o * k, nx), (o * k, ny), (o * k,), (o * k,)))
    mask = ((torch.rand(B, o * k) > 0.3) / 0.7).to(DEVICE, dtype)
    args = (x, y, wx, bx, wy, by, k, mask, normalize, 1e-12)
    torch.library.opcheck(torch.ops.fastfusion.factorized_bilinear, (*args, True, "triton"),
                          test_utils=("test_schema", "test_faketensor"))
    out, residuals = torch.ops.fastfusion.factorized_bilinear(*args, True, "triton")
    out_unsaved, none = torch.ops.fastfusion.factorized_bilinear(*args, False, "triton")
    assert none == [] and torch.equal(out, out_unsaved)
    wide = torch.float32 if dtype == torch.bfloat16 else dtype
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    # In float64 from the inputs: the projections, and z = the masked products summed over
    # each group of k adjacent columns.
    px, py = (torch.nn.functional.linear(a.double(), w.double(), b.double()) for a, w, b in ((x, wx, bx), (y, wy, by)))
    z = (px * py * mask.double()).unflatten(-1, (o, k)).sum(-1)
    expected = [px, py, z] if normalize else [px, py]
    assert len(residuals) == len(expected)
    for got, ref in zip(residuals, expected, strict=True):
        assert got.dtype == wide and got.shape == ref.shape
        torch.testing.assert_close(got.double(), ref, **tol)
    grad = _randn(*out.shape).to(DEVICE, dtype)
    saved = torch.ops.fastfusion.factorized_bilinear_backward(grad, residuals, *args, "triton")
    recomputed = torch.ops.fastfusion.factorized_bilinear_backward(grad, [], *args, "triton")
    for a, b in zip(saved, recomputed, strict=True):
        torch.testing.assert_close(a, b, **tol)

# ---- float64, torch.compile, autocast --------------------------------------------------

def _modules():
    torch.manual_seed(0)
    return [
        (fastfusion.TensorFusion((3, 4), 5), 2),
        (fastfusion.LowRankFusion((3, 4, 2), 5, rank=2), 3),
        (fastfusion.FactorizedBilinearPooling((3, 5), 4, factor=3).eval(), 2),
    ]


@pytest.mark.parametrize("index", range(3), ids=["tfn", "lmf", "mfb"])
def test_float64_runs_the_reference(index):
    module, M = _modules()[index]
    module = module.to(DEVICE, torch.float64)
    xs = [torch.randn(5, n, device=DEVICE, dtype=torch.float64) for n in module.in_dims[:M]]
    with fastfusion.backend("triton"):
        out = module(*xs)
    with fastfusion.backend("eager"):
        torch.testing.assert_close(out, module(*xs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("index", range(3), ids=["tfn", "lmf", "mfb"])
def test_torch_compile_fullgraph(index):
    module, M = _modules()[index]
    module = module.to(DEVICE)
    xs = [torch.randn(5, n, device=DEVICE) for n in module.in_dims[:M]]
    with fastfusion.backend("triton"):
        expected = module(*xs)
        expected_grads = torch.autograd.grad(expected.sum(), list(module.parameters()))
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        out = compiled(*xs)
        grads = torch.autograd.grad(out.sum(), list(module.parameters()))
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("index", range(3), ids=["tfn", "lmf", "mfb"])
def test_autocast_bfloat16(index):
    module, M = _modules()[index]
    module = module.to(DEVICE)
    xs = [torch.randn(5, n, device=DEVICE) for n in module.in_dims[:M]]
    with fastfusion.backend("triton"):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            out = module(*xs)
        out.float().sum().backward()
        reference = module.to(torch.bfloat16)(*[x.bfloat16() for x in xs])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


# ---- the fused vector CBP kernel (four-step DFT on tensor cores; issue 14, item 2)

from fastfusion.triton_backend import compact_bilinear as triton_cbp  # noqa: E402


def _vector_cbp_inputs(B, dims, out_dim, dtype, layout="contiguous"):
    gen = torch.Generator().manual_seed(5)
    xs = [randn(gen, B, n, dtype=dtype, layout=layout).to(DEVICE) for n in dims]
    hashes, signs = sketch_params(dims, out_dim)
    return xs, hashes, signs


def _unnormalized_cbp64(xs, hashes, signs, out_dim):
    return compact_bilinear([x.double() for x in xs], hashes, signs, out_dim, normalize=False, backend="eager")


# Three levels: 4096 = 16 x 16 x 16 (the default), 8192 = 16 x 16 x 32 (N2 != N3, so a swapped
# index map of the row stages shows).
FUSED_FACTORS = [(256, None), (512, (16, 32)), (512, (32, 16)), (4096, None), (8192, (16, 16, 32))]


@pytest.mark.parametrize("out_dim, factors", FUSED_FACTORS)
@pytest.mark.parametrize("B, programs", [(1, None), (3, None), (3, 2)])  # 3 samples on 2 programs: one runs two
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_fused_vector_cbp_float32_matches_float64(out_dim, factors, B, programs, layout):
    # float32 operands (at IEEE precision under the interpreter, tf32x3 on a GPU): the error of
    # a float32 FFT, whatever the factors and levels.
    xs, hashes, signs = _vector_cbp_inputs(B, (37, 50), out_dim, torch.float32, layout)
    z = triton_cbp.fused_vector_sketch(*xs, hashes, signs, out_dim, factors=factors, programs=programs)
    assert z.dtype == torch.float32
    assert_rel_close(z, _unnormalized_cbp64(xs, hashes, signs, out_dim), 1e-5, f"d={out_dim} {factors}")


# On a GPU the routed dtype, bfloat16, whose dots run in TF32; under the interpreter, whose
# bfloat16 casts truncate, float16 (its dots then run in float32).
FUSED_HALF = torch.float16 if TRITON_INTERPRETED else torch.bfloat16


@pytest.mark.parametrize("out_dim", [256, 2048])
def test_fused_vector_cbp_half_within_twice_torch_error(out_dim):
    # Half inputs are read as such; z rounded to their dtype is compared as the suite compares
    # half-precision results.
    xs, hashes, signs = _vector_cbp_inputs(3, (37, 300), out_dim, FUSED_HALF)
    expected = _unnormalized_cbp64(xs, hashes, signs, out_dim)
    z = triton_cbp.fused_vector_sketch(*xs, hashes, signs, out_dim).to(FUSED_HALF)
    torch_half = compact_bilinear(xs, hashes, signs, out_dim, normalize=False, backend="eager")
    assert torch_half.dtype == FUSED_HALF
    assert rel_err(z, expected) <= 2 * rel_err(torch_half, expected)


def test_fused_vector_cbp_nan_stays_in_its_row():
    # Sample 0 is NaN; its program then runs sample 2 on the same scratch (programs=2).
    xs, hashes, signs = _vector_cbp_inputs(3, (37, 50), 256, torch.float32)
    xs[0][0, 5] = float("nan")
    z = triton_cbp.fused_vector_sketch(*xs, hashes, signs, 256, programs=2)
    assert torch.isnan(z[0]).all()
    assert torch.isfinite(z[1:]).all()
    assert_rel_close(z[1:], _unnormalized_cbp64([x[1:] for x in xs], hashes, signs, 256), 1e-5, "rows 1, 2")
    # Likewise through the epilogue, whose z shares the scratch's plane 0 with phase A, and
    # whose L2 norm would spread a NaN over a row: only sample 0's.
    gate = torch.rand(3, 256, device=DEVICE)
    out = triton_cbp.fused_vector_sketch(*xs, hashes, signs, 256, programs=2, epilogue=(gate, True, 1e-12))
    assert torch.isnan(out[0]).all()
    expected = compact_bilinear([x[1:].double() for x in xs], hashes, signs, 256, gate=gate[1:].double(), eps=1e-12,
                                backend="eager")
    assert_rel_close(out[1:], expected, 1e-5, "epilogue rows 1, 2")


@pytest.mark.parametrize("out_dim", [256, 4096])  # two levels, three levels (16, 16, 16)
@pytest.mark.parametrize("gated, normalize", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("B, programs", [(1, None), (3, 2)])  # 3 samples on 2 programs: one runs two
def test_fused_vector_cbp_epilogue_float32_matches_float64(out_dim, gated, normalize, B, programs):
    # The fused forward finishing its rows in the same launch (gate, signed sqrt, L2), the
    # gate a strided view, against the float64 eager CBP (signed sqrt's eps 1e-12 as the op's).
    # The signed sqrt turns float32 rounding of a bin that is 0 in float64 (an empty one) into
    # sqrt of it (at d = 4096 with 37 x 50 products: 6e-4 off), so, as in
    # test_fused_vector_cbp_backward_epilogue_float32, every bin is kept away from 0: positive
    # inputs, all signs +1, 80 000 products for d <= 4096 bins (none empty; 100 x 400 left one).
    xs, hashes, signs = _vector_cbp_inputs(B, (200, 400), out_dim, torch.float32, "strided")
    xs = [x.abs_().add_(0.5) for x in xs]  # in place: the strided views stay the inputs
    signs = [torch.ones_like(s) for s in signs]
    gate = randn(torch.Generator().manual_seed(6), B, out_dim, dtype=torch.float32, layout="strided").to(DEVICE)
    gate = gate if gated else None
    out = triton_cbp.fused_vector_sketch(*xs, hashes, signs, out_dim, programs=programs,
                                         epilogue=(gate, normalize, 1e-12))
    assert out.dtype == torch.float32 and out.shape == (B, out_dim) and out.is_contiguous()
    expected = compact_bilinear([x.double() for x in xs], hashes, signs, out_dim, normalize=normalize, eps=1e-12,
                                gate=None if gate is None else gate.double(), backend="eager")
    assert_rel_close(out, expected, 1e-5, f"d={out_dim} gate={gated} normalize={normalize}")


def test_fused_vector_cbp_epilogue_in_input_dtype():
    # The output takes the inputs' dtype (the gate's may differ); without samples, no launch.
    xs, hashes, signs = _vector_cbp_inputs(3, (37, 300), 256, FUSED_HALF)
    gate = torch.rand(3, 256, device=DEVICE)
    out = triton_cbp.fused_vector_sketch(*xs, hashes, signs, 256, epilogue=(gate, True, 1e-12))
    expected = compact_bilinear([x.double() for x in xs], hashes, signs, 256, gate=gate.double(), eps=1e-12,
                                backend="eager")
    torch_half = compact_bilinear(xs, hashes, signs, 256, gate=gate.to(FUSED_HALF), eps=1e-12, backend="eager")
    assert out.dtype == torch_half.dtype == FUSED_HALF
    assert rel_err(out, expected) <= 2 * rel_err(torch_half, expected)
    empty = triton_cbp.fused_vector_sketch(*[x[:0] for x in xs], hashes, signs, 256, epilogue=(None, True, 1e-12))
    assert empty.shape == (0, 256) and empty.dtype == FUSED_HALF
    with pytest.raises(ValueError, match="gate"):
        triton_cbp.fused_vector_sketch(*xs, hashes, signs, 256, epilogue=(gate[:, :128], True, 1e-12))


def test_fused_vector_cbp_rejects_bad_factors():
    xs, hashes, signs = _vector_cbp_inputs(1, (5, 6), 96, torch.float32)
    bad = [(96, None), (512, (16, 16)), (512, (8, 64)), (4096, (16, 32, 8)), (4096, (16, 4, 64)),
           (8192, (16, 16, 16)), (4096, (16, 16, 16, 1)), (4096, (4096,)), (2 ** 18, (128, 64, 32))]
    for out_dim, factors in bad:
        with pytest.raises(ValueError, match="factors"):
            triton_cbp.fused_vector_sketch(*xs, hashes, signs, out_dim, factors=factors)
    # D1 + N2 + N3 least (N3 = 1 for two levels), ties to the larger D1, then the larger N2.
    assert triton_cbp.fused_factors(16384) == (32, 32, 16)
    assert triton_cbp.fused_factors(8192) == (32, 16, 16)
    assert triton_cbp.fused_factors(4096) == (16, 16, 16)
    assert triton_cbp.fused_factors(2048) == (64, 32)
    assert triton_cbp.fused_factors(512) == (32, 16)
    assert triton_cbp.fused_factors(128 * 32 * 32) == (128, 32, 32)
    assert triton_cbp.fused_factors(96) is None
    assert triton_cbp.fused_factors(2 ** 18) is None  # above 128 x 32 x 32


def test_fused_vector_cbp_rejects_bad_precision():
    xs, hashes, signs = _vector_cbp_inputs(1, (5, 6), 256, torch.float32)
    for precision in ("ieee", "tf32x2", "TF32"):
        with pytest.raises(ValueError, match="precision"):
            triton_cbp.fused_vector_sketch(*xs, hashes, signs, 256, precision=precision)
        with pytest.raises(ValueError, match="precision"):
            triton_cbp.fused_vector_sketch_backward(torch.ones(1, 256), *xs, hashes, signs, 256, precision=precision)


@pytest.fixture
def fused_calls(monkeypatch):
    # The dtype of every fused launch, "forward" or "backward".
    calls = []
    for name, kind in (("fused_vector_sketch", "forward"), ("fused_vector_sketch_backward", "backward")):
        fused = getattr(triton_cbp, name)
        wrapped = lambda *a, fused=fused, kind=kind, **k: calls.append((kind, a[1].dtype)) or fused(*a, **k)  # noqa: E731
        monkeypatch.setattr(triton_cbp, name, wrapped)
    return calls


def _cbp_op(xs, hashes, signs, out_dim, save_residuals, gate=None):
    # The op the dispatcher runs: xs (B, T, n); save_residuals as autograd asks for it.
    return torch.ops.fastfusion.compact_bilinear(
        xs, hashes, signs, out_dim, False, gate, True, 1e-12, "fft", save_residuals, "triton")


def _cbp_op_backward(grad, xs, hashes, signs, out_dim, gate=None):
    # The backward the dispatcher runs for _cbp_op (no residuals: the FFT algorithm saves none).
    return triton_cbp._backward(grad, [], xs, hashes, signs, out_dim, False, gate, True, 1e-12, "fft")


def test_fused_vector_cbp_routing(fused_calls):
    # Taken exactly on two unpooled bfloat16, float16 or float32 modalities with d = D1 D2 or
    # D1 N2 N3, forward and backward, in inference and training alike.
    B_F, B_B = ("forward", torch.bfloat16), ("backward", torch.bfloat16)
    xs, hashes, signs = _vector_cbp_inputs(3, (37, 50), 256, torch.bfloat16)
    xs = [x[:, None] for x in xs]
    gate = torch.rand(3, 256, device=DEVICE, dtype=torch.bfloat16)
    for save_residuals in (False, True):
        out, residuals = _cbp_op(xs, hashes, signs, 256, save_residuals, gate)
        assert fused_calls == [B_F] and residuals == [] and out.dtype == torch.bfloat16
        fused_calls.clear()
    # The backward recomputes z for the epilogue's backward (by the FFT path with normalisation,
    # see _fused_backward; by the fused forward for a gate only), then runs one fused backward;
    # without gate and normalisation it needs no z.
    grads = _cbp_op_backward(torch.randn_like(out), xs, hashes, signs, 256, gate)
    assert fused_calls == [B_B] and [g.dtype for g in grads] == [torch.bfloat16] * 3
    assert [g.shape for g in grads] == [x.shape for x in xs] + [gate.shape]
    for case_gate, normalize, calls in [(gate, False, [B_F, B_B]), (None, False, [B_B])]:
        fused_calls.clear()
        triton_cbp._backward(torch.randn_like(out), [], xs, hashes, signs, 256, False, case_gate, normalize, 1e-12, "fft")
        assert fused_calls == calls
    # float16 and float32 (at tf32x3, test_fused_vector_cbp_tf32_accuracy_decides_its_dtypes),
    # three levels (4096 = 16 x 16 x 16) too.
    for dtype, out_dim in [(torch.float16, 256), (torch.float32, 256), (torch.bfloat16, 4096)]:
        fused_calls.clear()
        case_xs = [x.to(dtype) for x in xs]
        case_hashes, case_signs = sketch_params([37, 50], out_dim)
        out, _ = _cbp_op(case_xs, case_hashes, case_signs, out_dim, True)
        _cbp_op_backward(torch.randn_like(out), case_xs, case_hashes, case_signs, out_dim)
        assert fused_calls == [("forward", dtype), ("backward", dtype)] and out.dtype == dtype
    fused_calls.clear()
    cases = [
        ([x.double() for x in xs], 256),  # float64: tl.dot has no float64 form
        ([x.expand(-1, 2, -1) for x in xs], 256),  # pooled
        (xs + [xs[0]], 256),  # three modalities
        (xs, 96),  # d without factors in [16, 128]
    ]
    for case_xs, out_dim in cases:
        case_hashes, case_signs = sketch_params([x.shape[-1] for x in case_xs], out_dim)
        out, _ = _cbp_op(case_xs, case_hashes, case_signs, out_dim, True)
        _cbp_op_backward(torch.randn_like(out), case_xs, case_hashes, case_signs, out_dim)
    assert fused_calls == []
    # Through the public function, in inference and under autograd.
    with torch.no_grad():
        compact_bilinear([x[:, 0] for x in xs], hashes, signs, 256, backend="triton", algorithm="fft")
    assert fused_calls == [B_F]
    fused_calls.clear()
    leaf = xs[0][:, 0].detach().requires_grad_()
    out = compact_bilinear([leaf, xs[1][:, 0]], hashes, signs, 256, gate=gate, backend="triton", algorithm="fft")
    out.float().sum().backward()
    assert fused_calls == [B_F, B_B] and leaf.grad is not None and torch.isfinite(leaf.grad).all()


def _cbp_grads64(xs, hashes, signs, out_dim, grad, gate=None, normalize=False):
    # The float64 eager reference's gradients w.r.t. the inputs (and the gate) under grad.
    leaves = [x.detach().double().requires_grad_() for x in xs]
    if gate is not None:
        leaves.append(gate.detach().double().requires_grad_())
    out = compact_bilinear(leaves[:2], hashes, signs, out_dim, gate=leaves[2] if gate is not None else None,
                           normalize=normalize, backend="eager")
    return torch.autograd.grad(out, leaves, grad.double())


@pytest.mark.parametrize("out_dim, factors", FUSED_FACTORS)
@pytest.mark.parametrize("B, programs", [(1, None), (3, None), (3, 2)])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_fused_vector_cbp_backward_float32_matches_float64(out_dim, factors, B, programs, layout):
    xs, hashes, signs = _vector_cbp_inputs(B, (37, 50), out_dim, torch.float32, layout)
    grad = randn(torch.Generator().manual_seed(6), B, out_dim, dtype=torch.float32, layout=layout).to(DEVICE)
    dx, dy = triton_cbp.fused_vector_sketch_backward(grad, *xs, hashes, signs, out_dim, factors=factors,
                                                     programs=programs)
    assert dx.dtype == dy.dtype == torch.float32 and dx.is_contiguous()
    expected = _cbp_grads64(xs, hashes, signs, out_dim, grad)
    for got, want, name in zip((dx, dy), expected, ("dx", "dy")):
        assert_rel_close(got, want, 1e-5, f"{name} d={out_dim} {factors}")


@pytest.mark.parametrize("out_dim", [256, 512])
@pytest.mark.parametrize("gated, normalize", [(False, True), (True, False), (True, True)])
def test_fused_vector_cbp_backward_epilogue_float32(out_dim, gated, normalize):
    # The dispatcher's fused backward (z recomputed, epilogue backward, fused backward) in
    # float32, which the routing leaves out but the kernels take at IEEE precision. The signed
    # sqrt's derivative 1 / (2 sqrt|z|) turns float32 rounding of a z entry near 0 into any
    # error at all (with random signs here, PyTorch's own float32 gradients were 3e-6 to 2e-5
    # off float64, the FFT path's 5e-5, this path's up to 2e-4), so z is kept away from 0:
    # positive inputs, all signs +1, 20 000 products for d <= 512 bins (none empty).
    xs, hashes, signs = _vector_cbp_inputs(3, (100, 200), out_dim, torch.float32, "strided")
    xs = [x.abs_().add_(0.5) for x in xs]  # in place: the strided views stay the inputs
    signs = [torch.ones_like(s) for s in signs]
    gen = torch.Generator().manual_seed(6)
    gate = torch.rand(3, out_dim, generator=gen).to(DEVICE) if gated else None
    grad = randn(gen, 3, out_dim, dtype=torch.float32).to(DEVICE)
    grads = triton_cbp._fused_backward(grad, [x[:, None] for x in xs], hashes, signs, out_dim, gate, normalize, 1e-12)
    expected = _cbp_grads64(xs, hashes, signs, out_dim, grad, gate, normalize)
    assert len(grads) == len(expected)
    for got, want, name in zip(grads, expected, ("dx", "dy", "dgate")):
        assert_rel_close(got.reshape(want.shape), want, 1e-5, name)


@pytest.mark.parametrize("out_dim", [256, 2048])
def test_fused_vector_cbp_backward_half_within_twice_torch_error(out_dim):
    # Every gradient of the gated, normalised CBP in FUSED_HALF, against PyTorch's own
    # gradients in that dtype, both measured against float64.
    xs, hashes, signs = _vector_cbp_inputs(3, (37, 300), out_dim, FUSED_HALF)
    gen = torch.Generator().manual_seed(6)
    gate = torch.rand(3, out_dim, generator=gen).to(device=DEVICE, dtype=FUSED_HALF)
    grad = randn(gen, 3, out_dim, dtype=FUSED_HALF).to(DEVICE)
    expected = _cbp_grads64(xs, hashes, signs, out_dim, grad, gate, True)
    grads = triton_cbp._fused_backward(grad, [x[:, None] for x in xs], hashes, signs, out_dim, gate, True, 1e-12)
    leaves = [x.detach().requires_grad_() for x in xs + [gate]]
    out = compact_bilinear(leaves[:2], hashes, signs, out_dim, gate=leaves[2], backend="eager")
    torch_grads = torch.autograd.grad(out, leaves, grad)
    for got, torch_half, want, name in zip(grads, torch_grads, expected, ("dx", "dy", "dgate")):
        assert got.dtype == torch_half.dtype == FUSED_HALF, name
        assert rel_err(got.reshape(want.shape), want) <= 2 * rel_err(torch_half, want), name


def test_fused_vector_cbp_backward_nan_stays_in_its_row():
    # Sample 0's x holds a NaN; its program then runs sample 2 on the same scratch (programs=2).
    # dy[0] depends on x's sketch, so it is NaN; dx[0] too, through the packed transform of
    # both sketches (u = DFT(a + i b)).
    xs, hashes, signs = _vector_cbp_inputs(3, (37, 50), 256, torch.float32)
    xs[0][0, 5] = float("nan")
    grad = torch.randn(3, 256, device=DEVICE)
    dx, dy = triton_cbp.fused_vector_sketch_backward(grad, *xs, hashes, signs, 256, programs=2)
    assert torch.isnan(dx[0]).all() and torch.isnan(dy[0]).all()
    expected = _cbp_grads64([x[1:] for x in xs], hashes, signs, 256, grad[1:])
    assert_rel_close(dx[1:], expected[0], 1e-5, "dx rows 1, 2")
    assert_rel_close(dy[1:], expected[1], 1e-5, "dy rows 1, 2")
    # A NaN in the incoming gradient likewise stays in its sample.
    xs[0][0, 5] = 0.0
    grad[0, 7] = float("nan")
    dx, dy = triton_cbp.fused_vector_sketch_backward(grad, *xs, hashes, signs, 256, programs=2)
    assert torch.isnan(dx[0]).all() and torch.isnan(dy[0]).all()
    assert torch.isfinite(dx[1:]).all() and torch.isfinite(dy[1:]).all()


def test_fused_vector_cbp_backward_rejects_bad_grad():
    xs, hashes, signs = _vector_cbp_inputs(2, (5, 6), 256, torch.float32)
    with pytest.raises(ValueError, match="grad_z"):
        triton_cbp.fused_vector_sketch_backward(torch.zeros(2, 128, device=DEVICE), *xs, hashes, signs, 256)
    with pytest.raises(ValueError, match="factors"):
        triton_cbp.fused_vector_sketch_backward(torch.zeros(2, 96, device=DEVICE), *xs, hashes, signs, 96)


def _round_tf32(a):
    # To the nearest 10-bit mantissa, ties away from zero, as cvt.rna.tf32.f32 rounds.
    if a.dtype != np.float32:
        return a
    return ((a.view(np.int32) + 0x1000) & ~0x1FFF).astype(np.int32).view(np.float32)


@pytest.fixture
def tf32_dots(monkeypatch):
    # Every interpreted dot as a GPU runs it at its input_precision: "tf32" rounds both operands
    # to TF32; "tf32x3" splits each into a_hi = tf32(a), a_lo = tf32(a - a_hi) and sums
    # a_lo b_hi + a_hi b_lo + a_hi b_hi into the float32 accumulator (small terms first, as
    # Triton orders them). Yields the set of precisions seen, so a test can check it ran them.
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot
    seen = set()

    def emulated_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        seen.add(input_precision.name)

        def dot(x, y, acc):
            x, y = (interpreter.TensorHandle(v, h.dtype.scalar) for v, h in ((x, a), (y, b)))
            return create_dot(self, x, y, acc, input_precision, max_num_imprecise_acc)

        if input_precision.name == "TF32":
            return dot(_round_tf32(a.data), _round_tf32(b.data), d)
        if input_precision.name == "TF32x3":
            a_hi, b_hi = _round_tf32(a.data), _round_tf32(b.data)
            a_lo, b_lo = _round_tf32(a.data - a_hi), _round_tf32(b.data - b_hi)
            return dot(a_hi, b_hi, dot(a_hi, b_lo, dot(a_lo, b_hi, d)))
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", emulated_dot)
    return seen


def _emulated_case(dtype, sparse, out_dim):
    """Inputs of ``dtype``, their float32 copies for the kernels (the interpreter's own
    bfloat16 cast truncates; a GPU's rounds, as torch's .to() does), a gate and an output
    gradient. Dense: n = (512, 1024), no bin of z empty. Sparse: n = (37, 300), where bins of z
    are empty, and the signed sqrt magnifies any transform's noise there (sqrt of it)."""
    xs, hashes, signs = _vector_cbp_inputs(2 if not sparse else 3, (37, 300) if sparse else (512, 1024), out_dim, dtype)
    gen = torch.Generator().manual_seed(6)
    gate = torch.rand(xs[0].shape[0], out_dim, generator=gen).to(device=DEVICE, dtype=dtype)
    grad = randn(gen, xs[0].shape[0], out_dim, dtype=dtype).to(DEVICE)
    return xs, [x.float() for x in xs], hashes, signs, gate, grad


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="emulates a GPU's TF32 dots in the interpreter")
@pytest.mark.parametrize("out_dim", [4096, 16384])  # three levels: (16, 16, 16), (32, 32, 16)
def test_fused_vector_cbp_tf32_accuracy_decides_its_precision(tf32_dots, out_dim):
    # The forward's output with its dots as a GPU runs them, rounded to the input dtype,
    # against PyTorch's own error in that dtype (eager on the FFT path the fused kernel
    # replaces), both against float64: z of dense inputs, and the gated, normalised output of
    # sparse ones. Every dtype is within 2x at tf32x3; one TF32 pass misses it for float16
    # (dense z) and for bfloat16 (sparse, normalised): why every dtype runs tf32x3.
    assert set(triton_cbp._FUSED_PRECISION.values()) == {"tf32x3"}
    one_pass = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for sparse in (False, True):
            xs, xs32, hashes, signs, gate, _ = _emulated_case(dtype, sparse, out_dim)
            epilogue = (gate, True, 1e-12) if sparse else None
            kwargs = dict(gate=gate, normalize=True) if sparse else dict(normalize=False)
            expected = compact_bilinear([x.double() for x in xs], hashes, signs, out_dim, backend="eager",
                                        **{k: v.double() if torch.is_tensor(v) else v for k, v in kwargs.items()})
            torch_own = compact_bilinear(xs, hashes, signs, out_dim, backend="eager", algorithm="fft", **kwargs)
            assert torch_own.dtype == dtype
            for precision in ("tf32x3", "tf32"):
                out = triton_cbp.fused_vector_sketch(*xs32, hashes, signs, out_dim, epilogue=epilogue, precision=precision)
                ratio = rel_err(out.to(dtype), expected) / rel_err(torch_own, expected)
                if precision == "tf32x3":
                    assert ratio <= 2, (dtype, sparse, ratio)
                else:
                    one_pass[dtype, sparse] = ratio
    assert tf32_dots == {"TF32", "TF32x3"}
    assert one_pass[torch.float16, False] > 2 and one_pass[torch.bfloat16, True] > 2, one_pass


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="emulates a GPU's TF32 dots in the interpreter")
@pytest.mark.parametrize("out_dim", [2048, 4096])  # two levels (64, 32); three (16, 16, 16)
def test_fused_vector_cbp_backward_tf32_accuracy(tf32_dots, out_dim):
    # dx, dy, dgate of the gated, normalised CBP of sparse inputs through _fused_backward with
    # its dots as a GPU runs them, rounded to the input dtype, against PyTorch's own gradients
    # in that dtype (eager, FFT path): within 2x at tf32x3 for every dtype; one TF32 pass
    # misses it for bfloat16 (the normalisation's gradient is large at the bins near 0, and
    # the transforms spread one pass's error from there to every input).
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        xs, xs32, hashes, signs, gate, grad = _emulated_case(dtype, True, out_dim)
        expected = _cbp_grads64(xs, hashes, signs, out_dim, grad, gate, True)
        leaves = [x.detach().requires_grad_() for x in xs + [gate]]
        out = compact_bilinear(leaves[:2], hashes, signs, out_dim, gate=leaves[2], backend="eager", algorithm="fft")
        torch_grads = torch.autograd.grad(out, leaves, grad)
        for precision in ("tf32x3", "tf32"):
            # The float32 copies take float32's precision: set it to the one under test (not
            # with monkeypatch, whose undo would also drop tf32_dots' emulation).
            with mock.patch.dict(triton_cbp._FUSED_PRECISION, {torch.float32: precision}):
                grads = triton_cbp._fused_backward(grad.float(), [x[:, None] for x in xs32], hashes, signs, out_dim,
                                                   gate.float(), True, 1e-12)
            ratios = [rel_err(got.reshape(want.shape).to(dtype), want) / rel_err(own, want)
                      for got, own, want in zip(grads, torch_grads, expected)]
            if precision == "tf32x3":
                assert max(ratios) <= 2, (dtype, ratios)
            elif dtype == torch.bfloat16:
                assert max(ratios[:2]) > 2, ratios
    assert tf32_dots == {"TF32", "TF32x3"}
