"""The "triton" backend of low_rank_fusion, factorized_bilinear and tensor_fusion.

Runs on helpers.TRITON_DEVICE: CUDA when present, else the CPU under TRITON_INTERPRET=1.
Every output and gradient is compared with the float64 reference; in a dtype the kernel's
error (relative norm, vs float64) must be at most twice the eager reference's own error in
that dtype, plus 4 unit roundoffs of the dtype: some results are one number or a short sum with
cancellation (grad_weights at rank 1), whose error in any summation order is a few ulps,
so the ratio of two such errors is noise.
"""

import pytest
import torch
from helpers import TRITON_DEVICE as DEVICE
from helpers import rel_err, skip_module_unless_triton_runs

skip_module_unless_triton_runs()

import fastfusion  # noqa: E402
from fastfusion import factorized_bilinear, low_rank_fusion, tensor_fusion  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seed():
    # Inputs are drawn on the CPU from a fixed seed: the same values on every device. The
    # 2x rule compares two rounding errors, so an unlucky draw near an ill-conditioned
    # point (signed sqrt near 0) could flip it; a fixed draw keeps CI reproducible.
    torch.manual_seed(0)


def _run(fn, tensors, grad_out):
    """fn(*tensors) and the gradients of <fn, grad_out> w.r.t. every tensor."""
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return [out, *grads]


def _check(op, tensors, dtype, *, noncontiguous=False):
    """op(*tensors, backend=...) with the triton backend vs the float64 reference."""
    tensors64 = [t.to(DEVICE, torch.float64) for t in tensors]
    expected = op(*tensors64, backend="eager")
    grad_out = torch.randn(expected.shape, dtype=torch.float64).to(DEVICE)
    exact = _run(lambda *a: op(*a, backend="eager"), tensors64, grad_out)
    lowered = [t.to(dtype) for t in tensors64]
    if noncontiguous:  # same values, transposed storage
        lowered = [t.t().contiguous().t() if t.dim() == 2 else t for t in lowered]
        assert not lowered[0].is_contiguous()
    eager = _run(lambda *a: op(*a, backend="eager"), lowered, grad_out)
    triton = _run(lambda *a: op(*a, backend="triton"), lowered, grad_out)
    floor = 4 * torch.finfo(dtype).eps
    for i, (got, base, ref) in enumerate(zip(triton, eager, exact)):
        assert got.dtype == dtype and got.shape == ref.shape and got.is_contiguous()
        err, base_err = rel_err(got, ref), rel_err(base, ref)
        assert err <= 2 * base_err + floor, f"result {i}: error {err:.3e}, eager {base_err:.3e} in {dtype}"


def _randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


# ---- low-rank fusion -------------------------------------------------------------------

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


# ---- factorized bilinear pooling -------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "B,nx,ny,o,k,normalize",
    [(3, 4, 3, 5, 3, False), (3, 4, 3, 24, 2, True), (2, 3, 2, 300, 1, True)],  # o = 300 > _MAX_ROW_O
    ids=["unnormalized", "whole-rows", "two-pass"],
)
def test_factorized_bilinear_residuals(B, nx, ny, o, k, normalize, dtype):
    # The forward saves the projections (the op's contract), and the backward from them
    # matches the backward that recomputes them (the kernels' result without residuals).
    x, y = _randn(B, nx).to(DEVICE, dtype), _randn(B, ny).to(DEVICE, dtype)
    wx, wy, bx, by = (_randn(*s).to(DEVICE, dtype) for s in ((o * k, nx), (o * k, ny), (o * k,), (o * k,)))
    mask = ((torch.rand(B, o * k) > 0.3) / 0.7).to(DEVICE, dtype)
    args = (x, y, wx, bx, wy, by, k, mask, normalize, 1e-12)
    out, residuals = torch.ops.fastfusion.factorized_bilinear(*args, True, "triton")
    out_unsaved, none = torch.ops.fastfusion.factorized_bilinear(*args, False, "triton")
    assert none == [] and torch.equal(out, out_unsaved)
    wide = torch.float32 if dtype == torch.bfloat16 else dtype
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    expected = [torch.nn.functional.linear(a.to(wide), w.to(wide), b.to(wide)) for a, w, b in ((x, wx, bx), (y, wy, by))]
    for got, ref in zip(residuals, expected, strict=True):
        assert got.dtype == wide and got.shape == (B, o * k)
        torch.testing.assert_close(got, ref, **tol)
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
