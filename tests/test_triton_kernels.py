"""What is specific to the "triton" backend: its interpreter's limits and the caches of its
kernels. The ops' values and gradients are checked in tests/test_<op>.py, on every backend.

Runs on helpers.TRITON_DEVICE: CUDA when present, else the CPU under Triton's interpreter."""

import pytest
import torch
from helpers import TRITON_DEVICE as DEVICE
from helpers import TRITON_INTERPRETED, rel_err, skip_module_unless_triton_runs

skip_module_unless_triton_runs()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastfusion import count_sketch, draw_hashes_and_signs, tensor_fusion  # noqa: E402
from fastfusion.triton_backend import count_sketch as triton_count_sketch  # noqa: E402


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
    torch.manual_seed(0)
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
    torch.manual_seed(0)
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
