"""What is specific to the "cpp" backend, the C++/OpenMP CPU kernels of fastfusion/csrc/cpu:
half precision computed in float32, the kernels' own argument checks, identical results for
1 and 2 threads, "auto" and torch.compile(fullgraph=True), the residuals its forward kernels
hand to their backward, the ATen FFT fallback, and the JIT build and its fallback paths.
The ops' values and gradients are checked in tests/test_<op>.py, on every backend.

The first test builds the extension (about a minute on two cores; cached in
$FASTFUSION_CACHE_DIR or ~/.cache/fastfusion afterwards). The suite skips only when there
is no C++ compiler, and says so; any other build failure fails it.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch

import fastfusion as ff
from fastfusion import _dispatch, _extension, cpp_backend  # noqa: F401 - registers "cpp"

from helpers import F64, LAYOUTS, assert_rel_close, custom_op_ran, randn, random_hashes_signs


@pytest.fixture(scope="module", autouse=True)
def built():
    reason = _extension.unavailable_reason()
    if reason is not None and "no C++ compiler" in reason:
        pytest.skip(f"the C++ extension cannot be built here: {reason}")
    assert reason is None, f"the C++ extension failed to build or load: {reason}"


# --------------------------------------------------------------------------- cases
# Each case builds (fn(leaves, backend) -> output, leaves) from a generator; leaves are
# float64, possibly non-contiguous views.


def count_sketch_case(gen, lead=(3,), n=7, d=5, layout="contiguous", hash_dtype=torch.int64, sign_dtype=torch.int8):
    (h,), (s,) = random_hashes_signs(gen, [n], d, hash_dtype=hash_dtype, sign_dtype=sign_dtype)
    x = randn(gen, *lead, n, layout=layout)
    return (lambda t, be: ff.count_sketch(t[0], h, s, d, backend=be)), [x]


def compact_bilinear_case(
    gen, B=3, T=None, dims=(5, 6), d=9, pool="sum", gate=False, normalize=True, layout="contiguous", algorithm="fft"
):
    """The cpp kernels run ``algorithm``; every other backend is a reference and runs the FFT
    path, as the papers state it, so the Gram path is never checked against itself."""
    hashes, signs = random_hashes_signs(gen, dims, d, hash_dtype=torch.int32)
    lead = (B,) if T is None else (B, T)
    xs = [randn(gen, *lead, n, layout=LAYOUTS[(m + LAYOUTS.index(layout)) % 3]) for m, n in enumerate(dims)]
    leaves = list(xs)
    if gate:
        leaves.append(torch.rand(B, d, generator=gen, dtype=F64) + 0.5)
    pool_dim = None if T is None else 1

    def fn(t, be):
        g = t[len(dims)] if gate else None
        return ff.compact_bilinear(
            t[: len(dims)], hashes, signs, d, pool_dim=pool_dim, pool=pool, gate=g, normalize=normalize, backend=be,
            algorithm=algorithm if be == "cpp" else "fft",
        )

    return fn, leaves


def signed_sqrt_l2_case(gen, lead=(4,), d=11, layout="contiguous", zeros=True):
    z = randn(gen, *lead, d, layout=layout)
    if zeros:  # exact zeros and one all-zero row: the finite-gradient and below-eps paths
        with torch.no_grad():
            z[..., ::3] = 0
            z[(0,) * len(lead)] = 0
    return (lambda t, be: ff.signed_sqrt_l2(t[0], backend=be)), [z]


def factorized_bilinear_case(gen, B=4, nx=5, ny=6, o=3, k=2, bias=True, mask=False, normalize=True, layout="contiguous"):
    x, y = randn(gen, B, nx, layout=layout), randn(gen, B, ny)
    wx, wy = randn(gen, o * k, nx), randn(gen, o * k, ny, layout="strided")
    leaves = [x, y, wx, wy]
    if bias:
        leaves += [randn(gen, o * k), randn(gen, o * k)]
    drop = (torch.rand(B, o * k, generator=gen, dtype=F64) > 0.3).to(F64) / 0.7 if mask else None

    def fn(t, be):
        bx, by = (t[4], t[5]) if bias else (None, None)
        return ff.factorized_bilinear(t[0], t[1], t[2], bx, t[3], by, k, normalize, dropout_mask=drop, backend=be)

    return fn, leaves


def low_rank_fusion_case(gen, B=3, dims=(2, 3, 4), rank=3, hidden=5, layout="contiguous"):
    xs = [randn(gen, B, n, layout=LAYOUTS[(m + LAYOUTS.index(layout)) % 3]) for m, n in enumerate(dims)]
    factors = [randn(gen, rank, n + 1, hidden) for n in dims]
    leaves = xs + factors + [randn(gen, rank), randn(gen, hidden)]
    M = len(dims)
    return (lambda t, be: ff.low_rank_fusion(t[:M], t[M : 2 * M], t[2 * M], t[2 * M + 1], backend=be)), leaves


def tensor_fusion_case(gen, B=3, dims=(2, 3, 4), hidden=5, bias=True, layout="contiguous"):
    xs = [randn(gen, B, n, layout=LAYOUTS[(m + LAYOUTS.index(layout)) % 3]) for m, n in enumerate(dims)]
    weight = randn(gen, hidden, math.prod(n + 1 for n in dims), layout="strided")
    leaves = xs + [weight] + ([randn(gen, hidden)] if bias else [])
    M = len(dims)
    return (lambda t, be: ff.tensor_fusion(t[:M], t[M], t[M + 1] if bias else None, backend=be)), leaves


def _grads(fn, leaves, backend, cotangent=None):
    leaves = [t.detach().clone().requires_grad_(True) if t.is_contiguous() else _as_view_leaf(t) for t in leaves]
    out = fn(leaves, backend)
    if cotangent is None:
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    return out, torch.autograd.grad(out, leaves, cotangent.to(out.dtype)), cotangent


def _as_view_leaf(t):
    # Keep the kernels' view of a non-contiguous input: rebuild the same strides.
    base = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
    base.copy_(t.detach())
    return base.requires_grad_(True)


@pytest.mark.parametrize("make", [
    lambda g: tensor_fusion_case(g, B=4),
    lambda g: compact_bilinear_case(g, T=4, gate=True, algorithm="gram"),
], ids=["tensor_fusion", "compact_bilinear gram"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_float32(gen, dtype, make):
    fn, leaves = make(gen)
    low = [t.detach().to(dtype) for t in leaves]
    out, grads, cot = _grads(fn, low, "cpp")
    ref, ref_grads, _ = _grads(fn, [t.float() for t in low], "cpp", cot.float())
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0)


def test_other_dtypes_are_rejected_by_name():
    x = torch.ones(2, 3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="ComplexFloat"):
        torch.ops.fastfusion_cpu.signed_sqrt_l2(x, 1e-12)


def test_direct_call_without_positions_is_an_error_not_a_crash():
    # The fastfusion:: ops hand empty inputs to the "torch" kernels; the C++ kernel called
    # directly with T = 0 divided by zero (SIGFPE). In a child process, so a crash is reported.
    code = (
        "import torch, fastfusion._extension as e\n"
        "assert e.unavailable_reason() is None\n"
        "xs = [torch.randn(2, 0, 5), torch.randn(2, 0, 4)]\n"
        "hashes, signs = [torch.zeros(5, dtype=torch.long), torch.zeros(4, dtype=torch.long)], [torch.ones(5), torch.ones(4)]\n"
        "try:\n"
        "    torch.ops.fastfusion_cpu.compact_bilinear(xs, hashes, signs, 8, False, None, True, 1e-12, 'fft', False)\n"
        "except RuntimeError as err:\n"
        "    print('raised:', err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-500:]}"
    assert "raised:" in result.stdout and "got T = 0" in result.stdout


def test_compact_bilinear_algorithm_is_checked_by_name(gen):
    (h0, h1, h2), (s0, s1, s2) = random_hashes_signs(gen, [3, 4, 5], 8)
    xs = [randn(gen, 2, 3, n) for n in (3, 4, 5)]
    forward = torch.ops.fastfusion_cpu.compact_bilinear
    with pytest.raises(RuntimeError, match="algorithm must be 'fft' or 'gram', got 'fast'"):
        forward(xs[:2], [h0, h1], [s0, s1], 8, False, None, True, 1e-12, "fast", False)
    with pytest.raises(RuntimeError, match="algorithm 'gram' needs exactly 2 modalities \\(xs\\), got 3"):
        forward(xs, [h0, h1, h2], [s0, s1, s2], 8, False, None, True, 1e-12, "gram", False)
    backward = torch.ops.fastfusion_cpu.compact_bilinear_backward
    with pytest.raises(RuntimeError, match="algorithm 'gram' needs exactly 2 modalities"):
        backward(randn(gen, 2, 8), [], xs, [h0, h1, h2], [s0, s1, s2], 8, False, None, True, 1e-12, "gram")


# The weight gradients are reductions over the batch: the cases include outputs small next to
# the batch (6 x 64 over B = 300, LMF's 13 x 128 over B = 700), which a multithreaded BLAS
# splits across threads on some CPUs (MKL on AMD), and B = 1, whose GEMMs are row vectors.
DETERMINISM = {
    "count_sketch": lambda g: count_sketch_case(g, lead=(64,), n=300, d=1000),
    "compact_bilinear": lambda g: compact_bilinear_case(g, B=130, dims=(40, 30), d=4096, gate=True),
    "compact_bilinear pooled": lambda g: compact_bilinear_case(g, B=9, T=20, dims=(40, 30), d=2048, pool="mean"),
    # One sample of a long, non-power-of-two transform: MKL would split it across threads.
    "compact_bilinear B=1 d=16000": lambda g: compact_bilinear_case(g, B=1, dims=(50, 60), d=16000),
    # Parts of rows with bins of their own (B = 3: 6 and 5 parts), and a batch of one part each.
    "compact_bilinear gram parts": lambda g: compact_bilinear_case(
        g, B=3, T=20, dims=(300, 200), d=512, gate=True, algorithm="gram"
    ),
    "compact_bilinear gram batch": lambda g: compact_bilinear_case(
        g, B=40, T=5, dims=(64, 48), d=256, pool="mean", algorithm="gram"
    ),
    "signed_sqrt_l2": lambda g: signed_sqrt_l2_case(g, lead=(64,), d=3000),
    "factorized_bilinear": lambda g: factorized_bilinear_case(g, B=300, nx=64, ny=48, o=40, k=5, mask=True),
    "factorized_bilinear small output": lambda g: factorized_bilinear_case(g, B=300, nx=64, ny=48, o=2, k=3),
    "low_rank_fusion": lambda g: low_rank_fusion_case(g, B=700, dims=(16, 8, 12), rank=4, hidden=32),
    "low_rank_fusion B=1": lambda g: low_rank_fusion_case(g, B=1, dims=(300, 200), rank=4, hidden=32),
    "tensor_fusion": lambda g: tensor_fusion_case(g, B=200, dims=(8, 6, 10), hidden=32),
    # residual_split: B=1 (40, 60) at h = 64 and B=5 take split 0 (Y = z W^T); the others split.
    "tensor_fusion B=1": lambda g: tensor_fusion_case(g, B=1, dims=(40, 60), hidden=64),
    "tensor_fusion B=1 split": lambda g: tensor_fusion_case(g, B=1, dims=(40, 60), hidden=8),
    # Small batches too: these gave other bits with 2 threads on an AMD EPYC before tiled_mm.
    "factorized_bilinear B=7": lambda g: factorized_bilinear_case(g, B=7, nx=217, ny=15, o=34, k=2),
    "tensor_fusion B=5": lambda g: tensor_fusion_case(g, B=5, dims=(2, 15, 2), hidden=51),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(DETERMINISM))
def test_same_bits_for_one_and_two_threads(gen, case, dtype):
    fn, leaves = DETERMINISM[case](gen)
    leaves = [t.detach().to(dtype) for t in leaves]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            out, grads, _ = _grads(fn, leaves, "cpp")
            results.append([out, *grads])
    finally:
        torch.set_num_threads(threads)
    for run in results[1:]:
        for i, (a, b) in enumerate(zip(results[0], run)):
            assert torch.equal(a, b), f"{'output' if i == 0 else f'grad {i - 1}'} differs"


def test_auto_prefers_cpp_on_cpu(gen):
    fn, leaves = tensor_fusion_case(gen)
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    assert "cpp" in ff.available_backends("cpu")
    assert _dispatch.resolve_backend("tensor_fusion", "cpu", "auto") == "cpp"
    assert custom_op_ran(fn(leaves, "auto"))


def test_torch_compile_fullgraph(gen, monkeypatch):
    fn, leaves = compact_bilinear_case(gen, B=2, T=3, gate=True)
    leaves = [t.detach().float().requires_grad_(True) for t in leaves]
    expected = fn(leaves, "cpp")
    # The availability probe is first asked while dynamo traces the "auto" resolution.
    monkeypatch.setattr(_extension, "_status", _extension._UNTRIED)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *t: fn(list(t), "auto"), fullgraph=True, backend="eager")
    out = compiled(*leaves)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    assert all(t.grad is not None for t in leaves)
    torch._dynamo.reset()


# --------------------------------------------------------------------------- residuals
# The cpp forward kernels of these ops hand intermediates to their backward (residuals);
# without them the backward recomputes. Both paths must give the same bits.


def residual_cases(gen):
    """op name -> (forward args before save_residuals, backward args after the residuals, output shape)."""
    (h0, h1, h2), (s0, s1, s2) = random_hashes_signs(gen, [6, 5, 4], 9)
    (lh0, lh1), (ls0, ls1) = random_hashes_signs(gen, [6, 5], 4096)
    gate = torch.rand(2, 4096, generator=gen, dtype=F64) + 0.5
    xs3 = [randn(gen, 3, 1, n) for n in (6, 5, 4)]
    long_xs = [randn(gen, 2, 70, n) for n in (6, 5)]  # positions split across FFT calls
    x, y = randn(gen, 4, 5), randn(gen, 4, 6)
    wx, bx, wy, by = randn(gen, 6, 5), randn(gen, 6), randn(gen, 6, 6), randn(gen, 6)
    mask = (torch.rand(4, 6, generator=gen, dtype=F64) > 0.3).to(F64) * 2
    lmf_xs, factors = [randn(gen, 4, 3), randn(gen, 4, 2)], [randn(gen, 2, 4, 3), randn(gen, 2, 3, 3)]
    lmf_w, lmf_b = randn(gen, 2), randn(gen, 3)
    cbp3 = (xs3, [h0, h1, h2], [s0, s1, s2], 9, True, None, True, 1e-12, "fft")
    cbp_long = (long_xs, [lh0, lh1], [ls0, ls1], 4096, False, gate, False, 1e-12, "fft")
    gram_xs = [randn(gen, 3, 4, n) for n in (6, 5)]
    gram_gate = torch.rand(3, 9, generator=gen, dtype=F64) + 0.5
    gram = (gram_xs, [h0, h1], [s0, s1], 9, True, gram_gate, True, 1e-12, "gram")
    mfb = (x, y, wx, bx, wy, by, 2, mask, True, 1e-12)
    lmf = (lmf_xs, factors, lmf_w, lmf_b)
    # The residual's width depends on where the modalities are split (the op's argument): after
    # the first here, after the second in the next case (the fake kernel must agree with the C++).
    tfn = ([randn(gen, 4, 3), randn(gen, 4, 2), randn(gen, 4, 4)], randn(gen, 5, 60), randn(gen, 5), 1)
    tfn_late_split = ([randn(gen, 3, 1), randn(gen, 3, 1), randn(gen, 3, 40)], randn(gen, 2, 164), None, 2)
    tfn_no_split = ([randn(gen, 3, 4), randn(gen, 3, 5)], randn(gen, 7, 30), randn(gen, 7), 0)  # Y = z W^T
    return {
        "compact_bilinear M=3 mean normalize": ("compact_bilinear", cbp3, (3, 9)),
        "compact_bilinear long sequence gate": ("compact_bilinear", cbp_long, (2, 4096)),
        "compact_bilinear gram mean gate normalize": ("compact_bilinear", gram, (3, 9)),
        "factorized_bilinear": ("factorized_bilinear", mfb, (4, 3)),
        "low_rank_fusion": ("low_rank_fusion", lmf, (4, 3)),
        "tensor_fusion": ("tensor_fusion", tfn, (4, 5)),
        "tensor_fusion split after two": ("tensor_fusion", tfn_late_split, (3, 2)),
        "tensor_fusion split before the first": ("tensor_fusion", tfn_no_split, (3, 7)),
    }


@pytest.mark.parametrize("case", ["compact_bilinear M=3 mean normalize", "compact_bilinear long sequence gate",
                                  "compact_bilinear gram mean gate normalize", "factorized_bilinear", "low_rank_fusion", "tensor_fusion",
                                  "tensor_fusion split after two", "tensor_fusion split before the first"])
def test_backward_gives_the_same_bits_with_and_without_residuals(gen, case):
    name, args, out_shape = residual_cases(gen)[case]
    forward, backward = getattr(torch.ops.fastfusion, name), getattr(torch.ops.fastfusion, name + "_backward")
    out_saving, residuals = forward(*args, True, "cpp")
    out_plain, none = forward(*args, False, "cpp")
    assert len(residuals) > 0 and len(none) == 0
    assert torch.equal(out_saving, out_plain)
    grad = randn(gen, *out_shape)
    with_residuals = backward(grad, residuals, *args, "cpp")
    recomputed = backward(grad, [], *args, "cpp")
    for a, b in zip(with_residuals, recomputed, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["compact_bilinear M=3 mean normalize", "compact_bilinear gram mean gate normalize",
                                  "factorized_bilinear", "low_rank_fusion", "tensor_fusion", "tensor_fusion split after two",
                                  "tensor_fusion split before the first"])
def test_opcheck_with_residuals(gen, case):
    # The fake kernels must promise exactly the residuals that the cpp kernels save.
    name, args, out_shape = residual_cases(gen)[case]
    leaves = lambda a: [t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in a]  # noqa: E731
    args = tuple(leaves(a) if isinstance(a, list) else leaves([a])[0] for a in args)
    torch.library.opcheck(getattr(torch.ops.fastfusion, name), (*args, True, "cpp"))
    _, residuals = getattr(torch.ops.fastfusion, name)(*args, True, "cpp")
    detached = tuple([t.detach() for t in a] if isinstance(a, list) else a.detach() if isinstance(a, torch.Tensor) else a
                     for a in args)
    torch.library.opcheck(getattr(torch.ops.fastfusion, name + "_backward"), (randn(gen, *out_shape), residuals, *detached, "cpp"))


def test_tensor_fusion_kernels_take_any_split(gen):
    # The split is the op's argument (fastfusion.ops.tensor_fusion.residual_split chooses it):
    # every split computes the same TFN, and one outside [1, M) is refused by name.
    xs, weight, bias = [randn(gen, 3, 2), randn(gen, 3, 4), randn(gen, 3, 1)], randn(gen, 4, 30), randn(gen, 4)
    grad = randn(gen, 3, 4)
    expected = torch.ops.fastfusion.tensor_fusion_backward(grad, [], xs, weight, bias, 1, "torch")
    reference = ff.tensor_fusion(xs, weight, bias, backend="eager")
    for split in (0, 1, 2):
        out, residuals = torch.ops.fastfusion.tensor_fusion(xs, weight, bias, split, True, "cpp")
        assert_rel_close(out, reference, 1e-14, f"split {split}")
        grads = torch.ops.fastfusion.tensor_fusion_backward(grad, residuals, xs, weight, bias, split, "cpp")
        for got, want in zip(grads, expected, strict=True):
            assert_rel_close(got, want, 1e-14, f"split {split} gradient")
        recomputed = torch.ops.fastfusion.tensor_fusion_backward(grad, [], xs, weight, bias, split, "cpp")
        for got, want in zip(recomputed, expected, strict=True):
            assert_rel_close(got, want, 1e-14, f"split {split} gradient without residuals")
    for split in (-1, 3):
        with pytest.raises(RuntimeError, match=rf"split must be in \[0, 3\) for 3 modalities, got {split}"):
            torch.ops.fastfusion.tensor_fusion(xs, weight, bias, split, False, "cpp")


def test_foreign_residuals_are_rejected_by_name(gen):
    name, args, out_shape = residual_cases(gen)["factorized_bilinear"]
    _, residuals = torch.ops.fastfusion.factorized_bilinear(*args, True, "cpp")
    backward = torch.ops.fastfusion_cpu.factorized_bilinear_backward
    # Normalised: the projections and z before the normalisation.
    with pytest.raises(RuntimeError, match="expects 3 residuals from its forward, got 2"):
        backward(randn(gen, *out_shape), residuals[:2], *args)
    with pytest.raises(RuntimeError, match=r"residual 1 should be a contiguous Double tensor of shape \[4, 6\]"):
        backward(randn(gen, *out_shape), [residuals[0], residuals[1].t(), residuals[2]], *args)
    with pytest.raises(RuntimeError, match=r"residual 2 should be a contiguous Double tensor of shape \[4, 3\], got Double \[4, 6\]"):
        backward(randn(gen, *out_shape), [residuals[0], residuals[1], residuals[0]], *args)
    with pytest.raises(RuntimeError, match=r"residual 2 should be a contiguous Double tensor of shape \[4, 3\], got Float"):
        backward(randn(gen, *out_shape), [residuals[0], residuals[1], residuals[2].float()], *args)
    # Unnormalised: the projections alone.
    plain = (*args[:8], False, args[9])
    _, two = torch.ops.fastfusion.factorized_bilinear(*plain, True, "cpp")
    assert len(two) == 2
    with pytest.raises(RuntimeError, match="expects 2 residuals from its forward, got 3"):
        backward(randn(gen, *out_shape), residuals, *plain)


@pytest.mark.parametrize("make", [
    lambda g: compact_bilinear_case(g, B=2, T=3, gate=True),
    lambda g: compact_bilinear_case(g, B=2, T=3, gate=True, algorithm="gram"),
    lambda g: factorized_bilinear_case(g, mask=True),
    low_rank_fusion_case,
    tensor_fusion_case,
], ids=["compact_bilinear", "compact_bilinear gram", "factorized_bilinear", "low_rank_fusion", "tensor_fusion"])
def test_residuals_survive_a_retained_graph(gen, make):
    # A second backward through the same graph reads the same residuals: the backward
    # kernels must not overwrite them (they are autograd's, not scratch).
    fn, leaves = make(gen)
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(leaves, "cpp")
    cotangent = randn(gen, *out.shape)
    first = torch.autograd.grad(out, leaves, cotangent, retain_graph=True)
    second = torch.autograd.grad(out, leaves, cotangent)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_residuals_are_saved_only_when_autograd_records(gen):
    x, w = randn(gen, 3, 4), randn(gen, 4, 4, requires_grad=True)
    assert _dispatch.wants_residuals(x, w)
    assert not _dispatch.wants_residuals(x, w.detach())
    with torch.no_grad():
        assert not _dispatch.wants_residuals(x, w)
    # Asked for, residuals come from the backends that keep them: "cpp" does, "torch" recomputes.
    assert _dispatch.residuals_saved("factorized_bilinear", "cpp", True, x)
    assert _dispatch.residuals_saved("factorized_bilinear", "auto", True, x)  # "auto" is "cpp" here
    assert not _dispatch.residuals_saved("factorized_bilinear", "cpp", False, x)
    assert not _dispatch.residuals_saved("factorized_bilinear", "torch", True, x)


def test_aten_fft_fallback_matches(gen, monkeypatch):
    # Builds of torch without MKL transform through ATen; the environment variable forces that
    # path here. It must compute what the MKL path computes (to round-off).
    fn, leaves = compact_bilinear_case(gen, B=3, T=4, gate=True, pool="mean")
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    out, grads, cotangent = _grads(fn, leaves, "cpp")
    monkeypatch.setenv("FASTFUSION_CPP_ATEN_FFT", "1")
    out_aten, grads_aten, _ = _grads(fn, leaves, "cpp", cotangent)
    assert_rel_close(out_aten, out, 1e-13, "output")
    for i, (a, b) in enumerate(zip(grads_aten, grads)):
        assert_rel_close(a, b, 1e-13, f"grad {i}")


# --------------------------------------------------------------------------- the build


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A process state in which the extension has not been tried, with an empty cache."""
    monkeypatch.setattr(_extension, "_status", _extension._UNTRIED)
    monkeypatch.setattr(_dispatch, "_FALLBACK_WARNED", set())
    monkeypatch.setenv("FASTFUSION_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_extension, "_PACKAGE_DIR", tmp_path)  # no ahead-of-time build there
    return tmp_path


def _broken_sources(monkeypatch, tmp_path):
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "broken.cpp").write_text("#error simulated build failure\n")
    monkeypatch.setattr(_extension, "_SOURCE_DIR", src)


def test_failed_build_warns_once_and_falls_back(gen, monkeypatch, fresh_build):
    _broken_sources(monkeypatch, fresh_build)
    fn, leaves = tensor_fusion_case(gen)
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    with pytest.warns(RuntimeWarning, match="simulated build failure") as record:
        out = fn(leaves, "auto")
        fn(leaves, "auto")
        ff.count_sketch(leaves[0], torch.zeros(2, dtype=torch.long), torch.ones(2), 3)
    assert len([w for w in record if "fastfusion" in str(w.message)]) == 1
    assert custom_op_ran(out) and _dispatch.resolve_backend("tensor_fusion", "cpu", "auto") == "torch"
    assert "cpp" not in ff.available_backends("cpu")
    assert (fresh_build / "cache").exists() and list((fresh_build / "cache").glob("*/build.log"))


@pytest.mark.parametrize("how", ["argument", "context", "set_backend"])
def test_failed_build_raises_when_cpp_requested(gen, monkeypatch, fresh_build, how):
    _broken_sources(monkeypatch, fresh_build)
    fn, leaves = tensor_fusion_case(gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit request raises instead of warning
        with pytest.raises(ff.BackendUnavailableError, match="simulated build failure"):
            if how == "argument":
                fn(leaves, "cpp")
            elif how == "context":
                with ff.backend("cpp"):
                    fn(leaves, None)
            else:
                ff.set_backend("cpp")
                fn(leaves, None)


def test_environment_variable_cpp_raises(fresh_build):
    code = (
        "import torch, fastfusion as ff, fastfusion.cpp_backend, fastfusion._extension as e\n"
        "e._SOURCE_DIR = e.pathlib.Path('/nonexistent')\n"
        "e._PACKAGE_DIR = e.pathlib.Path('/nonexistent')\n"
        "try:\n"
        "    ff.signed_sqrt_l2(torch.ones(2, 3))\n"
        "except ff.BackendUnavailableError as err:\n"
        "    print('raised:', err)\n"
    )
    env = {**__import__("os").environ, "FASTFUSION_BACKEND": "cpp"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "raised:" in result.stdout and "sources are not installed" in result.stdout, result.stderr


def test_missing_compiler_is_named(monkeypatch, fresh_build):
    src = fresh_build / "csrc"
    src.mkdir()
    (src / "ok.cpp").write_text("int f() { return 0; }\n")
    monkeypatch.setattr(_extension, "_SOURCE_DIR", src)
    monkeypatch.setenv("CXX", "no-such-compiler-fastfusion")
    assert "no C++ compiler" in _extension.unavailable_reason()


def test_import_builds_nothing():
    code = "import fastfusion, fastfusion.cpp_backend as c, fastfusion._extension as e; print(e._status is e._UNTRIED)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "True", result.stderr


def test_ahead_of_time_library_needs_matching_torch(monkeypatch, tmp_path):
    monkeypatch.setattr(_extension, "_PACKAGE_DIR", tmp_path)
    assert _extension._aot_library() == (None, None)  # none installed: nothing to explain
    library = tmp_path / f"{_extension.AOT_MODULE}.cpython-311-x86_64-linux-gnu.so"
    library.write_bytes(b"")
    path, passed_over = _extension._aot_library()
    assert path is None and f"{library} has no {tmp_path / _extension.AOT_TORCH_VERSION_FILE}" in passed_over
    (tmp_path / _extension.AOT_TORCH_VERSION_FILE).write_text("0.0.1\n")
    path, passed_over = _extension._aot_library()
    assert path is None and f"built for torch 0.0.1, not the running torch {torch.__version__}" in passed_over
    (tmp_path / _extension.AOT_TORCH_VERSION_FILE).write_text(torch.__version__ + "\n")
    assert _extension._aot_library() == (str(library), None)


@pytest.mark.parametrize("capability, vector_flags", [("DEFAULT", False), ("AVX2", True), ("AVX512", True)])
def test_jit_vector_flags_follow_torch_cpu_capability(monkeypatch, capability, vector_flags):
    monkeypatch.setattr(_extension.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert ("-mavx2" in _extension._jit_cflags()) == vector_flags
    key = _extension._build_key(_extension._sources())
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT" if vector_flags else "AVX2")
    # A cache shared across machines must not hand one ISA's build to another.
    assert _extension._build_key(_extension._sources()) != key
