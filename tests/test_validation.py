"""Argument checks of the public functions: every bad argument raises ValueError (bad value
or shape) or TypeError (bad type), and the message names the argument.

Each case takes a set of valid arguments (checked to succeed first) and breaks one thing.
The "meta" device stands in for a second device on a CPU-only machine.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastfusion as ff

from helpers import randn, random_hashes_signs

D = 9


@pytest.fixture
def a(gen):
    """Valid float64 arguments for every op: two modalities (3, 4, 7) and (3, 4, 5)."""
    (h0, h1), (s0, s1) = random_hashes_signs(gen, [7, 5], D)
    return dict(
        x=randn(gen, 3, 4, 7), y=randn(gen, 3, 4, 5), h0=h0, h1=h1, s0=s0, s1=s1, gate=torch.rand(3, 4, D, dtype=torch.float64) + 0.1,
        wx=randn(gen, 6, 7), bx=randn(gen, 6), wy=randn(gen, 6, 5), by=randn(gen, 6), mask=torch.ones(3, 4, 6, dtype=torch.float64),
        factors=[randn(gen, 2, 8, 4), randn(gen, 2, 6, 4)], weights=randn(gen, 1, 2), bias=randn(gen, 1, 4),
        tfn_weight=randn(gen, 4, 8 * 6), tfn_bias=randn(gen, 4),
    )  # fmt: skip


def meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def cs(a, x=None, hash=None, sign=None, out_dim=D):
    return ff.count_sketch(a["x"] if x is None else x, a["h0"] if hash is None else hash, a["s0"] if sign is None else sign, out_dim)


def cbp(a, xs=None, hashes=None, signs=None, out_dim=D, **kwargs):
    xs = [a["x"], a["y"]] if xs is None else xs
    hashes = [a["h0"], a["h1"]] if hashes is None else hashes
    signs = [a["s0"], a["s1"]] if signs is None else signs
    return ff.compact_bilinear(xs, hashes, signs, out_dim, **kwargs)


def mfb(a, **override):
    args = dict(x=a["x"], y=a["y"], weight_x=a["wx"], bias_x=a["bx"], weight_y=a["wy"], bias_y=a["by"], factor=3)
    return ff.factorized_bilinear(**{**args, **override})


def lmf(a, xs=None, factors=None, weights=None, bias=None):
    return ff.low_rank_fusion(
        [a["x"], a["y"]] if xs is None else xs,
        a["factors"] if factors is None else factors,
        a["weights"] if weights is None else weights,
        a["bias"] if bias is None else bias,
    )


def tfn(a, xs=None, weight=None, bias="default"):
    return ff.tensor_fusion(
        [a["x"], a["y"]] if xs is None else xs, a["tfn_weight"] if weight is None else weight, a["tfn_bias"] if bias == "default" else bias
    )


def test_valid_arguments_pass(a):
    # The cases below break exactly one argument of these calls.
    assert cs(a).shape == (3, 4, D)
    assert cbp(a, gate=a["gate"]).shape == (3, 4, D)
    assert cbp(a, pool_dim=1, pool="mean", gate=a["gate"][:, 0]).shape == (3, D)
    assert ff.tensor_sketch([a["x"], a["y"]], [a["h0"], a["h1"]], [a["s0"], a["s1"]], D).shape == (3, 4, D)
    assert ff.signed_sqrt_l2(a["x"]).shape == (3, 4, 7)
    assert mfb(a, dropout_mask=a["mask"]).shape == (3, 4, 2)
    assert lmf(a).shape == (3, 4, 4)
    assert tfn(a).shape == (3, 4, 4)
    assert tfn(a, bias=None).shape == (3, 4, 4)


CASES = {
    # ---- count_sketch
    "cs x not a tensor": (lambda a: cs(a, x=a["x"].tolist()), TypeError, r"\bx\b"),
    "cs x integer": (lambda a: cs(a, x=a["x"].long()), TypeError, r"\bx\b"),
    "cs x 0-dim": (lambda a: cs(a, x=torch.tensor(1.0, dtype=torch.float64)), ValueError, r"\bx\b"),
    "cs x no features": (lambda a: cs(a, x=a["x"][..., :0], hash=a["h0"][:0], sign=a["s0"][:0]), ValueError, r"\bx\b"),
    "cs hash not a tensor": (lambda a: cs(a, hash=a["h0"].tolist()), TypeError, "hash"),
    "cs hash float": (lambda a: cs(a, hash=a["h0"].double()), TypeError, "hash"),
    "cs hash too short": (lambda a: cs(a, hash=a["h0"][:-1]), ValueError, "hash"),
    "cs hash 2-D": (lambda a: cs(a, hash=a["h0"][None]), ValueError, "hash"),
    "cs hash negative": (lambda a: cs(a, hash=torch.cat([a["h0"][:-1], torch.tensor([-1])])), ValueError, "hash"),
    "cs hash == out_dim": (lambda a: cs(a, hash=torch.cat([a["h0"][:-1], torch.tensor([D])])), ValueError, "hash"),
    "cs hash other device": (lambda a: cs(a, hash=meta(a["h0"])), ValueError, "hash"),
    "cs sign zero": (lambda a: cs(a, sign=torch.cat([a["s0"][:-1], torch.tensor([0], dtype=torch.int8)])), ValueError, "sign"),
    "cs sign two": (lambda a: cs(a, sign=a["s0"] * 2), ValueError, "sign"),
    "cs sign half": (lambda a: cs(a, sign=a["s0"].double() / 2), ValueError, "sign"),
    "cs sign bool": (lambda a: cs(a, sign=a["s0"] > 0), TypeError, "sign"),
    "cs sign too long": (lambda a: cs(a, sign=torch.cat([a["s0"], a["s0"][:1]])), ValueError, "sign"),
    "cs sign other device": (lambda a: cs(a, sign=meta(a["s0"])), ValueError, "sign"),
    "cs out_dim zero": (lambda a: cs(a, out_dim=0), ValueError, "out_dim"),
    "cs out_dim negative": (lambda a: cs(a, out_dim=-1), ValueError, "out_dim"),
    "cs out_dim float": (lambda a: cs(a, out_dim=2.5), TypeError, "out_dim"),
    "cs out_dim bool": (lambda a: cs(a, out_dim=True), TypeError, "out_dim"),
    "cs out_dim str": (lambda a: cs(a, out_dim="9"), TypeError, "out_dim"),
    # ---- tensor_sketch / compact_bilinear: modalities
    "cbp xs a tensor": (lambda a: cbp(a, xs=a["x"]), TypeError, "xs"),
    "cbp one modality": (lambda a: cbp(a, xs=[a["x"]], hashes=[a["h0"]], signs=[a["s0"]]), ValueError, "xs"),
    "cbp xs[1] not a tensor": (lambda a: cbp(a, xs=[a["x"], a["y"].tolist()]), TypeError, r"xs\[1\]"),
    "cbp xs[0] integer": (lambda a: cbp(a, xs=[a["x"].int(), a["y"]]), TypeError, r"xs\[0\]"),
    "cbp leading shapes differ": (lambda a: cbp(a, xs=[a["x"], a["y"][:2]]), ValueError, r"xs\[1\]"),
    "cbp dtypes differ": (lambda a: cbp(a, xs=[a["x"], a["y"].float()]), TypeError, r"xs\[1\]"),
    "cbp devices differ": (lambda a: cbp(a, xs=[a["x"], meta(a["y"])]), ValueError, r"xs\[1\]"),
    "cbp too few hashes": (lambda a: cbp(a, hashes=[a["h0"]]), ValueError, "hashes"),
    "cbp hashes a tensor": (lambda a: cbp(a, hashes=a["h0"]), TypeError, "hashes"),
    "cbp too many signs": (lambda a: cbp(a, signs=[a["s0"], a["s1"], a["s1"]]), ValueError, "signs"),
    "cbp hash[1] out of range": (lambda a: cbp(a, hashes=[a["h0"], a["h1"] + D]), ValueError, r"hash\[1\]"),
    "cbp hash[1] swapped lengths": (lambda a: cbp(a, hashes=[a["h0"], a["h0"]]), ValueError, r"hash\[1\]"),
    "cbp sign[0] invalid": (lambda a: cbp(a, signs=[a["s0"] * 0, a["s1"]]), ValueError, r"sign\[0\]"),
    "cbp out_dim zero": (lambda a: cbp(a, out_dim=0), ValueError, "out_dim"),
    "cbp out_dim float": (lambda a: cbp(a, out_dim=9.0), TypeError, "out_dim"),
    # ---- pooling
    "cbp pool unknown": (lambda a: cbp(a, pool_dim=1, pool="max"), ValueError, "pool"),
    "cbp pool None string": (lambda a: cbp(a, pool_dim=1, pool="none"), ValueError, "pool"),
    "cbp pool_dim last": (lambda a: cbp(a, pool_dim=2), ValueError, "pool_dim"),
    "cbp pool_dim -1": (lambda a: cbp(a, pool_dim=-1), ValueError, "pool_dim"),
    "cbp pool_dim too large": (lambda a: cbp(a, pool_dim=3), ValueError, "pool_dim"),
    "cbp pool_dim too small": (lambda a: cbp(a, pool_dim=-4), ValueError, "pool_dim"),
    "cbp pool_dim bool": (lambda a: cbp(a, pool_dim=True), ValueError, "pool_dim"),
    "cbp pool_dim float": (lambda a: cbp(a, pool_dim=1.0), ValueError, "pool_dim"),
    "cbp pool_dim on 1-D": (lambda a: cbp(a, xs=[a["x"][0, 0], a["y"][0, 0]], pool_dim=0), ValueError, r"xs\[0\]"),
    # ---- gate and eps
    "cbp gate wrong shape": (lambda a: cbp(a, gate=a["gate"][:, :, :-1]), ValueError, "gate"),
    "cbp gate unpooled shape when pooled": (lambda a: cbp(a, pool_dim=1, gate=a["gate"]), ValueError, "gate"),
    "cbp gate not a tensor": (lambda a: cbp(a, gate=a["gate"].tolist()), TypeError, "gate"),
    "cbp gate integer": (lambda a: cbp(a, gate=a["gate"].long()), TypeError, "gate"),
    "cbp gate other device": (lambda a: cbp(a, gate=meta(a["gate"])), ValueError, "gate"),
    "cbp eps zero": (lambda a: cbp(a, eps=0.0), ValueError, "eps"),
    "cbp eps negative": (lambda a: cbp(a, eps=-1e-6), ValueError, "eps"),
    "cbp eps str": (lambda a: cbp(a, eps="1e-6"), ValueError, "eps"),
    "tensor_sketch one modality": (
        lambda a: ff.tensor_sketch([a["x"]], [a["h0"]], [a["s0"]], D), ValueError, "xs"),  # fmt: skip
    # ---- signed_sqrt_l2
    "ssl2 z not a tensor": (lambda a: ff.signed_sqrt_l2([1.0, 2.0]), TypeError, r"\bz\b"),
    "ssl2 z integer": (lambda a: ff.signed_sqrt_l2(torch.arange(1, 5)), TypeError, r"\bz\b"),
    "ssl2 eps zero": (lambda a: ff.signed_sqrt_l2(a["x"], 0.0), ValueError, "eps"),
    "ssl2 eps bool": (lambda a: ff.signed_sqrt_l2(a["x"], True), ValueError, "eps"),
    # ---- factorized_bilinear
    "mfb x not a tensor": (lambda a: mfb(a, x=a["x"].numpy()), TypeError, r"\bx\b"),
    "mfb y integer": (lambda a: mfb(a, y=a["y"].long()), TypeError, r"\by\b"),
    "mfb y dtype differs": (lambda a: mfb(a, y=a["y"].float()), TypeError, r"\by\b"),
    "mfb y leading shape differs": (lambda a: mfb(a, y=a["y"][:, :2]), ValueError, r"\by\b"),
    "mfb y other device": (lambda a: mfb(a, y=meta(a["y"])), ValueError, r"\by\b"),
    "mfb hidden not multiple of factor": (lambda a: mfb(a, factor=4), ValueError, "weight_x.*factor|factor.*weight_x"),
    "mfb factor zero": (lambda a: mfb(a, factor=0), ValueError, "factor"),
    "mfb factor float": (lambda a: mfb(a, factor=3.0), TypeError, "factor"),
    "mfb weight_x wrong columns": (lambda a: mfb(a, weight_x=a["wx"][:, :-1]), ValueError, "weight_x"),
    "mfb weight_x 1-D": (lambda a: mfb(a, weight_x=a["wx"][0]), ValueError, "weight_x"),
    "mfb weight_x other device": (lambda a: mfb(a, weight_x=meta(a["wx"])), ValueError, "weight_x"),
    "mfb weight_y wrong rows": (lambda a: mfb(a, weight_y=a["wy"][:3]), ValueError, "weight_y"),
    "mfb weight_y dtype differs": (lambda a: mfb(a, weight_y=a["wy"].float()), TypeError, "weight_y"),
    "mfb bias_x wrong shape": (lambda a: mfb(a, bias_x=a["bx"][:-1]), ValueError, "bias_x"),
    "mfb bias_y dtype differs": (lambda a: mfb(a, bias_y=a["by"].float()), TypeError, "bias_y"),
    "mfb bias_y not a tensor": (lambda a: mfb(a, bias_y=1.0), TypeError, "bias_y"),
    "mfb dropout_mask wrong shape": (lambda a: mfb(a, dropout_mask=a["mask"][:, :, :-1]), ValueError, "dropout_mask"),
    "mfb dropout_mask integer": (lambda a: mfb(a, dropout_mask=a["mask"].long()), TypeError, "dropout_mask"),
    "mfb eps negative": (lambda a: mfb(a, eps=-1.0), ValueError, "eps"),
    # ---- low_rank_fusion
    "lmf one modality": (lambda a: lmf(a, xs=[a["x"]], factors=a["factors"][:1]), ValueError, "xs"),
    "lmf xs dtypes differ": (lambda a: lmf(a, xs=[a["x"], a["y"].float()]), TypeError, r"xs\[1\]"),
    "lmf xs leading shapes differ": (lambda a: lmf(a, xs=[a["x"], a["y"][:, :1]]), ValueError, r"xs\[1\]"),
    "lmf factors count": (lambda a: lmf(a, factors=a["factors"][:1]), ValueError, "factors"),
    "lmf factors a tensor": (lambda a: lmf(a, factors=a["factors"][0]), TypeError, "factors"),
    "lmf factor without constant row": (lambda a: lmf(a, factors=[a["factors"][0][:, 1:], a["factors"][1]]), ValueError, r"factors\[0\]"),
    "lmf factor wrong rank": (lambda a: lmf(a, factors=[a["factors"][0], a["factors"][1][:1]]), ValueError, r"factors\[1\]"),
    "lmf factor wrong hidden": (lambda a: lmf(a, factors=[a["factors"][0], a["factors"][1][..., :-1]]), ValueError, r"factors\[1\]"),
    "lmf factor 2-D": (lambda a: lmf(a, factors=[a["factors"][0][0], a["factors"][1]]), ValueError, r"factors\[0\]"),
    "lmf factor dtype differs": (lambda a: lmf(a, factors=[a["factors"][0], a["factors"][1].float()]), TypeError, r"factors\[1\]"),
    "lmf factor other device": (lambda a: lmf(a, factors=[meta(a["factors"][0]), a["factors"][1]]), ValueError, r"factors\[0\]"),
    "lmf weights (2, rank)": (lambda a: lmf(a, weights=a["weights"].expand(2, 2)), ValueError, "weights"),
    "lmf weights (rank, 1)": (lambda a: lmf(a, weights=a["weights"].T), ValueError, "weights|factors"),
    "lmf weights not a tensor": (lambda a: lmf(a, weights=[1.0, 1.0]), TypeError, "weights"),
    "lmf weights dtype differs": (lambda a: lmf(a, weights=a["weights"].float()), TypeError, "weights"),
    "lmf bias (2, h)": (lambda a: lmf(a, bias=a["bias"].expand(2, 4)), ValueError, "bias"),
    "lmf bias wrong h": (lambda a: lmf(a, bias=a["bias"][:, :-1]), ValueError, "bias|factors"),
    "lmf bias other device": (lambda a: lmf(a, bias=meta(a["bias"])), ValueError, "bias"),
    # ---- tensor_fusion
    "tfn xs a tensor": (lambda a: tfn(a, xs=a["x"]), TypeError, "xs"),
    "tfn one modality": (lambda a: tfn(a, xs=[a["x"]]), ValueError, "xs"),
    "tfn xs[1] integer": (lambda a: tfn(a, xs=[a["x"], a["y"].long()]), TypeError, r"xs\[1\]"),
    "tfn xs devices differ": (lambda a: tfn(a, xs=[a["x"], meta(a["y"])]), ValueError, r"xs\[1\]"),
    "tfn weight columns without constants": (lambda a: tfn(a, weight=a["tfn_weight"][:, : 7 * 5]), ValueError, "weight"),
    "tfn weight columns": (lambda a: tfn(a, weight=a["tfn_weight"][:, :-1]), ValueError, "weight"),
    "tfn weight transposed": (lambda a: tfn(a, weight=a["tfn_weight"].T), ValueError, "weight"),
    "tfn weight 1-D": (lambda a: tfn(a, weight=a["tfn_weight"][0]), ValueError, "weight"),
    "tfn weight dtype differs": (lambda a: tfn(a, weight=a["tfn_weight"].float()), TypeError, "weight"),
    "tfn weight other device": (lambda a: tfn(a, weight=meta(a["tfn_weight"])), ValueError, "weight"),
    "tfn bias wrong shape": (lambda a: tfn(a, bias=a["tfn_bias"][:-1]), ValueError, "bias"),
    "tfn bias not a tensor": (lambda a: tfn(a, bias=0.5), TypeError, "bias"),
    "tfn bias dtype differs": (lambda a: tfn(a, bias=a["tfn_bias"].float()), TypeError, "bias"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_argument_is_named(a, case):
    call, error, pattern = CASES[case]
    with pytest.raises(error, match=pattern):
        call(a)


@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_checks_do_not_depend_on_backend(a, backend):
    # The checks run before dispatch: the plain reference path is guarded too.
    with pytest.raises(ValueError, match="hash"):
        ff.count_sketch(a["x"], a["h0"] + D, a["s0"], D, backend=backend)
    with pytest.raises(TypeError, match=r"xs\[1\]"):
        ff.tensor_fusion([a["x"], a["y"].float()], a["tfn_weight"], None, backend=backend)
    with pytest.raises(ValueError, match="weight_x"):
        ff.factorized_bilinear(a["x"], a["y"], a["wx"], None, a["wy"], None, 4, backend=backend)


# ---- values are read once per version of a hash/sign tensor, and a bad value is still caught

HASH_ERROR = r"hash values must lie in \[0, out_dim=9\), got range"


def _spoil_in_place(t, bad):
    t[0] = bad


def _spoil_through_a_view(t, bad):
    t[1:3].fill_(bad)


def _spoil_by_data_swap(t, bad):
    t.data = torch.full_like(t, bad)


SPOILS = [_spoil_in_place, _spoil_through_a_view, _spoil_by_data_swap]


@pytest.mark.parametrize("spoil", SPOILS, ids=lambda f: f.__name__[len("_spoil_") :])
def test_hash_spoiled_after_a_good_call_is_caught(a, spoil):
    hash = a["h0"].clone()
    cs(a, hash=hash)
    spoil(hash, D)
    for _ in range(2):  # on the first call that sees it, and on every later one
        with pytest.raises(ValueError, match=HASH_ERROR + r" \[\d+, 9\]"):
            cs(a, hash=hash)


@pytest.mark.parametrize("spoil", SPOILS, ids=lambda f: f.__name__[len("_spoil_") :])
def test_sign_spoiled_after_a_good_call_is_caught(a, spoil):
    sign = a["s0"].clone()
    cs(a, sign=sign)
    spoil(sign, 0)
    with pytest.raises(ValueError, match=r"sign values must all be \+1 or -1"):
        cs(a, sign=sign)


def test_spoiled_modality_is_named(a):
    hashes, signs = [a["h0"], a["h1"].clone()], [a["s0"], a["s1"].clone()]
    cbp(a, hashes=hashes, signs=signs)
    hashes[1][0] = -1
    with pytest.raises(ValueError, match=r"hash\[1\] values must lie in \[0, out_dim=9\), got range \[-1, "):
        cbp(a, hashes=hashes, signs=signs)
    hashes[1][0] = 0
    signs[1][2] = 3
    with pytest.raises(ValueError, match=r"sign\[1\] values must all be"):
        ff.tensor_sketch([a["x"], a["y"]], hashes, signs, D)


def test_a_checked_hash_meets_each_call_s_out_dim(a):
    # What is kept is the hash's range, not a verdict for one out_dim.
    hash = torch.arange(7) % 5
    cs(a, hash=hash, out_dim=5)
    with pytest.raises(ValueError, match=r"hash values must lie in \[0, out_dim=4\), got range \[0, 4\]"):
        cs(a, hash=hash, out_dim=4)


def test_inference_hash_spoiled_in_inference_mode_is_caught(a):
    # No version counter records writes to inference tensors: their values are read every call.
    with torch.inference_mode():
        hash = a["h0"].clone()
    cs(a, hash=hash)
    with torch.inference_mode():
        hash[0] = D
    with pytest.raises(ValueError, match=HASH_ERROR):
        cs(a, hash=hash)


class _ValueReads(TorchDispatchMode):
    """Counts reads of tensor values to the host (on CUDA, each a device-to-host sync)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_values_are_read_once_per_version_on_the_cpu_too(a):
    # The cache applies on every device; tests/test_hot_path.py checks the CUDA path.
    hash, sign = a["h0"].clone(), a["s0"].clone()
    counts = []
    for write in (None, None, hash.neg_, None, sign.neg_, None):
        if write is not None:
            write()
            write()  # back to valid values, but a new version
        with _ValueReads() as reads:
            cs(a, hash=hash, sign=sign)
        counts.append(reads.count > 0)
    assert counts == [True, False, True, False, True, False]
