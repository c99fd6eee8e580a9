"""fastfusion.flops: hand counts on small shapes, and the same count on every backend."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from torch import nn

import fastfusion

pytest.importorskip("fvcore")
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
