"""fastfusion.flops: hand counts on small shapes, the same count on every backend, and
PyTorch's FlopCounterMode counting the fastfusion ops (forward and backward) by the same
formulas."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import fastfusion
from fastfusion import flops
from fastfusion._custom_op import SPECS

from helpers import backends_under_test

pytest.importorskip("fvcore")
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from fastfusion.flops import count_flops, count_flops_by_kind  # noqa: E402


def fft(batch: int, n: int, complex_input: bool = False) -> int:
    """The documented convention: 2.5 N log2 N per real transform, 5 N log2 N per complex one."""
    return round(batch * (5 if complex_input else 2.5) * n * math.log2(n))


def kinds(contraction: int = 0, fft: int = 0, scatter_add: int = 0) -> dict[str, int]:
    return {"contraction": contraction, "fft": fft, "scatter_add": scatter_add}


class Call(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def _sketch_buffers(in_dims, out_dim):
    drawn = fastfusion.draw_hashes_and_signs(in_dims, out_dim, seed=0)
    return [h for h, _ in drawn], [s for _, s in drawn]


def _count_sketch_module():
    (hash,), (sign,) = _sketch_buffers([6], 16)
    return Call(lambda x: fastfusion.count_sketch(x, hash, sign, 16))


def _tensor_sketch_module():
    hashes, signs = _sketch_buffers([6, 5, 4], 15)
    return Call(lambda *xs: fastfusion.tensor_sketch(list(xs), hashes, signs, 15, pool_dim=0, pool="mean"))


# name -> (module factory, inputs, hand count by kind)
CASES = {
    "count_sketch": (_count_sketch_module, (randn(2, 3, 6),), kinds(scatter_add=2 * 3 * 6)),
    "cbp": (
        lambda: fastfusion.CompactBilinearPooling([6, 5], 16, algorithm="fft"),
        (randn(2, 3, 6), randn(2, 3, 5)),  # unpooled, two leading dims: B = 6 sketches
        kinds(fft=2 * fft(6, 16) + fft(6, 16), scatter_add=6 * (6 + 5)),
    ),
    "cbp_three_modalities": (
        lambda: fastfusion.CompactBilinearPooling([6, 5, 4], 16, normalize=False),
        (randn(3, 6), randn(3, 5), randn(3, 4)),
        kinds(fft=3 * fft(3, 16) + fft(3, 16), scatter_add=3 * (6 + 5 + 4)),
    ),
    "cbp_pooled_odd_d": (
        lambda: fastfusion.CompactBilinearPooling([6, 5], 15, pool="mean", algorithm="fft"),
        (randn(3, 4, 6), randn(3, 4, 5)),  # T = 4 positions, one inverse transform per sample
        kinds(fft=2 * fft(12, 15) + fft(3, 15), scatter_add=12 * (6 + 5)),
    ),
    "cbp_pooled_gram": (
        lambda: fastfusion.CompactBilinearPooling([6, 5], 15, pool="mean", algorithm="gram"),
        (randn(3, 4, 6), randn(3, 4, 5)),  # X^T Y per sample (B = 3, T = 4), its 6 * 5 entries scattered
        kinds(contraction=2 * 3 * 4 * 6 * 5, scatter_add=3 * 6 * 5),
    ),
    "cbp_gram": (
        lambda: fastfusion.CompactBilinearPooling([6, 5], 16, algorithm="gram"),
        (randn(2, 3, 6), randn(2, 3, 5)),  # unpooled: T = 1 for each of the 6 sketches
        kinds(contraction=2 * 6 * 6 * 5, scatter_add=6 * 6 * 5),
    ),
    "tensor_sketch_pooled_dim0": (
        _tensor_sketch_module,
        (randn(4, 3, 6), randn(4, 3, 5), randn(4, 3, 4)),  # pooled over dim 0 (T = 4), B = 3
        kinds(fft=3 * fft(12, 15) + fft(3, 15), scatter_add=12 * (6 + 5 + 4)),
    ),
    "cbgp_softmax": (
        lambda: fastfusion.GatedCompactBilinearPooling([6, 5], 16, algorithm="fft"),
        (randn(3, 6), randn(3, 5)),
        kinds(contraction=2 * 3 * (6 + 5) * 16, fft=2 * fft(3, 16) + fft(3, 16), scatter_add=3 * (6 + 5)),
    ),
    "cbgp_sigmoid_pooled": (
        lambda: fastfusion.GatedCompactBilinearPooling([6, 5], 16, gate="sigmoid", pool="sum", algorithm="fft"),
        (randn(3, 4, 6), randn(3, 4, 5)),
        kinds(contraction=2 * 3 * (6 + 5) * 16, fft=2 * fft(12, 16) + fft(3, 16), scatter_add=12 * (6 + 5)),
    ),
    "mfb": (
        lambda: fastfusion.FactorizedBilinearPooling([6, 5], 4, factor=3).eval(),
        (randn(3, 6), randn(3, 5)),
        kinds(contraction=2 * 3 * (4 * 3) * (6 + 5)),
    ),
    "lmf": (
        lambda: fastfusion.LowRankFusion([6, 5, 4], 7, rank=3),
        (randn(3, 6), randn(3, 5), randn(3, 4)),
        # (B, n_m) @ (r, n_m, h) per modality, then the (r) . (r, B, h) fusion-weight sum.
        kinds(contraction=2 * 3 * 3 * 7 * (6 + 5 + 4) + 2 * 3 * 3 * 7),
    ),
    "tfn": (
        lambda: fastfusion.TensorFusion([6, 5, 4], 7),
        (randn(3, 6), randn(3, 5), randn(3, 4)),
        kinds(contraction=2 * 3 * 7 * (7 * 6 * 5)),
    ),
    "signed_sqrt_l2": (lambda: Call(fastfusion.signed_sqrt_l2), (randn(3, 16),), kinds()),
}


# name -> backward FLOPs by hand (module docstring of fastfusion.flops): every input and
# parameter requires grad. Gate and MFB/TFN/LMF layers: each product's two operands get a
# gradient, one product of the forward's size each.
BACKWARD = {
    "count_sketch": 0,  # a gather
    "cbp": fft(6, 16) + 2 * fft(6, 16),  # rfft of the gradient per sketch, irfft per modality and position
    "cbp_three_modalities": fft(3, 16) + 3 * fft(3, 16),
    "cbp_pooled_odd_d": fft(3, 15) + 2 * fft(12, 15),
    "cbp_pooled_gram": 2 * (2 * 3 * 4 * 6 * 5),  # dX = Y dG^T, dY = X dG
    "cbp_gram": 2 * (2 * 6 * 6 * 5),
    "tensor_sketch_pooled_dim0": fft(3, 15) + 3 * fft(12, 15),
    "cbgp_softmax": 2 * (2 * 3 * (6 + 5) * 16) + fft(3, 16) + 2 * fft(3, 16),
    "cbgp_sigmoid_pooled": 2 * (2 * 3 * (6 + 5) * 16) + fft(3, 16) + 2 * fft(12, 16),
    "mfb": 2 * (2 * 3 * (4 * 3) * (6 + 5)),
    # dX_m and dW_m, 2 r B h n_m each, and the fusion weights' gradient, 2 r B h.
    "lmf": 2 * (2 * 3 * 3 * 7 * (6 + 5 + 4)) + 2 * 3 * 3 * 7,
    "tfn": 2 * (2 * 3 * 7 * (7 * 6 * 5)),
    "signed_sqrt_l2": 0,
}


@pytest.mark.parametrize("backend", ["eager", "torch"])
@pytest.mark.parametrize("name", list(CASES))
def test_every_backend_reports_the_hand_count(name, backend, caplog):
    factory, inputs, expected = CASES[name]
    module = factory()
    with fastfusion.backend(backend), caplog.at_level(logging.WARNING):
        assert count_flops_by_kind(module, inputs) == expected
        assert count_flops(module, inputs) == sum(expected.values())
    # Every op on both paths is classified (counted or pointwise), none skipped silently.
    assert not [r for r in caplog.records if "nsupported operator" in r.getMessage()]


@pytest.mark.parametrize("name", list(CASES))
def test_the_torch_backend_path_is_the_custom_op(name):
    """Otherwise the eager-vs-torch agreement above would compare a path with itself."""
    factory, inputs, _ = CASES[name]
    with fastfusion.backend("torch"), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace itself
        graph = torch.jit.trace(factory(), inputs, check_trace=False).inlined_graph
    assert any(node.kind().startswith("fastfusion::") for node in graph.nodes())


def test_matmul_broadcasts_and_linear_ignores_the_bias():
    x, w, layer = randn(5, 6), randn(3, 6, 7), nn.Linear(6, 4)
    assert count_flops_by_kind(Call(torch.matmul), (x, w))["contraction"] == 2 * 3 * 5 * 6 * 7
    assert count_flops(layer, (x,)) == 2 * 5 * 6 * 4
    assert count_flops(Call(lambda a, b, c: torch.addmm(c, a, b)), (x, randn(6, 4), randn(4))) == 2 * 5 * 6 * 4
    assert count_flops(Call(torch.bmm), (randn(2, 5, 6), randn(2, 6, 3))) == 2 * 2 * 5 * 6 * 3


def test_einsum_counts_left_to_right_and_outer_products_are_pointwise():
    a, b, c = randn(5, 6), randn(6, 7), randn(7, 3)
    chain = Call(lambda a, b, c: torch.einsum("bi,ij,jk->bk", a, b, c))
    assert count_flops(chain, (a, b, c)) == 2 * 5 * 6 * 7 + 2 * 5 * 7 * 3
    assert count_flops(Call(lambda a, b: torch.einsum("bi,bj->bij", a, b)), (a, randn(5, 4))) == 0


def test_fft_convention():
    x = randn(3, 4, 16)
    assert count_flops_by_kind(Call(lambda x: torch.fft.rfft(x)), (x,))["fft"] == fft(12, 16)
    assert count_flops(Call(lambda x: torch.fft.rfft(x, n=15, dim=1)), (x,)) == fft(3 * 16, 15)
    spectrum = torch.fft.rfft(x)  # 9 bins: irfft's default length is 2 * (9 - 1) = 16
    assert count_flops(Call(lambda s: torch.fft.irfft(s)), (spectrum,)) == fft(12, 16)
    assert count_flops(Call(lambda s: torch.fft.irfft(s, n=17)), (spectrum,)) == fft(12, 17)
    assert count_flops(Call(lambda s: torch.fft.ifft(s, dim=0)), (spectrum,)) == fft(4 * 9, 3, complex_input=True)


def test_convolution_counts_two_per_multiply_add():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    assert count_flops(conv, (randn(2, 3, 5, 5),)) == 2 * (2 * 8 * 5 * 5) * (3 * 3 * 3)


# --------------------------------------------------------------------------- FlopCounterMode


def _counted(module, inputs, backward: bool) -> tuple[int, set[str]]:
    """FlopCounterMode's total for module(*inputs) (and its backward), and the names of the
    fastfusion ops it saw."""
    leaves = [x.clone().requires_grad_(backward) for x in inputs]
    with FlopCounterMode(display=False) as counter:
        out = module(*leaves)
        if backward:
            out.backward(torch.ones_like(out))
    seen = {str(op) for op in counter.get_flop_counts().get("Global", {}) if str(op).startswith("fastfusion.")}
    return counter.get_total_flops(), seen


def test_every_fastfusion_op_has_a_registered_formula():
    from torch.utils.flop_counter import flop_registry

    ops = set(torch.ops.fastfusion)
    assert {"count_sketch", "tensor_fusion_backward"} <= ops  # the listing is the real one
    assert ops == set(flops._formulas())
    assert all(getattr(torch.ops.fastfusion, op) in flop_registry for op in ops)


CONCRETE_BACKENDS = ["auto", *(b for b in backends_under_test() if b != "eager")]


@pytest.mark.parametrize("backend", CONCRETE_BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_flop_counter_mode_counts_the_ops_as_count_flops_does(name, backend):
    factory, inputs, expected = CASES[name]
    module = factory()
    with fastfusion.backend("torch"):
        forward = count_flops(module, inputs)
    assert forward == sum(expected.values())
    with fastfusion.backend(backend):
        counted, seen = _counted(module, inputs, backward=False)
        counted_with_backward, seen_with_backward = _counted(module, inputs, backward=True)
    assert seen, "no fastfusion op ran: the comparison would be of PyTorch's own ops"
    assert counted == forward
    assert counted_with_backward == forward + BACKWARD[name]
    assert any(op.endswith("_backward") for op in seen_with_backward)
    if name != "signed_sqrt_l2":  # pointwise: 0 either way
        assert counted > 0  # FlopCounterMode counted 0 for every fastfusion op before


def test_the_hand_counts_cover_every_op():
    # Every op is counted by hand in CASES (forward) and BACKWARD, through its custom op.
    assert set(BACKWARD) == set(CASES)
    seen = set()
    with fastfusion.backend("torch"):
        for factory, inputs, _ in CASES.values():
            seen |= _counted(factory(), inputs, backward=False)[1]
    missing = {f"fastfusion.{name}" for name in SPECS} - {op.split(".default")[0] for op in seen}
    assert not missing, f"no hand count exercises {sorted(missing)}"


@pytest.mark.parametrize("name", ["mfb", "tfn"])
def test_backward_counts_agree_with_pytorchs_own_formulas_on_the_plain_path(name):
    """MFB and TFN run only mm/addmm on the plain path, which FlopCounterMode's own formulas
    count (2 per multiply-add); their autograd is the adjoint our formulas count."""
    factory, inputs, _ = CASES[name]
    module = factory()
    with fastfusion.backend("eager"):
        plain, seen = _counted(module, inputs, backward=True)
    assert not seen
    with fastfusion.backend("torch"):
        assert _counted(module, inputs, backward=True)[0] == plain


def test_the_formulas_follow_the_algorithm_not_the_backend_argument():
    # As FlopCounterMode passes them: tensors as their shapes. xs (B, T, n_m) = (2, 3, 4|5).
    xs, per_modality = [torch.Size([2, 3, 4]), torch.Size([2, 3, 5])], [torch.Size([4]), torch.Size([5])]
    call = (xs, per_modality, per_modality, 7, False, None, False, 1e-12)
    fft_count = flops._flop_counter_formula("compact_bilinear")(*call, "fft", False, "cpp")
    assert fft_count == 2 * fft(6, 7) + fft(2, 7) + 2 * 3 * (4 + 5)
    for backend in ("auto", "torch", "some future name"):
        assert flops._flop_counter_formula("compact_bilinear")(*call, "fft", True, backend) == fft_count
    gram = flops._flop_counter_formula("compact_bilinear")(*call, "gram", False, "auto")
    assert gram == 2 * 2 * 3 * 4 * 5 + 2 * 4 * 5
    with pytest.raises(ValueError, match="algorithm='auto'"):
        flops._flop_counter_formula("compact_bilinear")(*call, "auto", False, "torch")


_COUNT_IN_A_FRESH_PROCESS = """
import sys, torch
{first}
{second}
from torch.utils.flop_counter import FlopCounterMode
assert "fvcore" not in sys.modules
x, w = torch.randn(3, 4), torch.randn(2, 5 * 5)
with FlopCounterMode(display=False) as counter:
    fastfusion.tensor_fusion([x, x], w, None, backend="torch")
print(counter.get_total_flops())
"""


@pytest.mark.parametrize("fastfusion_first", [True, False])
def test_registration_whichever_is_imported_first(fastfusion_first):
    """The formulas are registered when torch.utils.flop_counter is imported after fastfusion
    (a hook: fastfusion does not import it, it costs ~0.5 s), and when it was imported before."""
    lines = ["import fastfusion", "import torch.utils.flop_counter"]
    first, second = lines if fastfusion_first else lines[::-1]
    script = _COUNT_IN_A_FRESH_PROCESS.format(first=first, second=second)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) == 2 * 3 * 2 * 25
