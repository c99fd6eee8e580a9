"""The nn.Modules: hash/sign buffers (seeded, saved, moved), input shapes and pooling, the
CBGP gate, MFB dropout, LMF factor registration, M = 3, autocast. What a load checks is in
test_module_state.py."""

import itertools

import pytest
import scipy.stats
import torch

import fastfusion as ff

from helpers import assert_rel_close, randn
from oracles import explicit_tensor_sketch, lmf_oracle, mfb_oracle, signed_sqrt_l2_oracle, tfn_oracle

D = 11  # odd sketch size


def build(factory, seed: int):
    """Build a module with parameters drawn from ``seed``, leaving the global RNG as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory(seed)


def covering_seed(in_dims, out_dim) -> int:
    """The first seed whose hashes reach every bucket (sum_m h_m) mod out_dim. An empty
    bucket is an exact 0 of the sketch that the FFT returns as ~1e-17 of either sign: the
    signed square root turns it into +-sqrt(eps), and out / sketch into 0 / 0."""
    for seed in range(1000):
        hashes = [h.tolist() for h, _ in ff.draw_hashes_and_signs(in_dims, out_dim, seed)]
        if len({sum(t) % out_dim for t in itertools.product(*hashes)}) == out_dim:
            return seed
    raise AssertionError("no covering seed")


# name -> (factory(seed) -> module, input feature sizes, input leading shape)
MODULES = {
    "cbp": (lambda s: ff.CompactBilinearPooling([7, 5], D, seed=s), (7, 5), (3,)),
    "cbp_sum": (lambda s: ff.CompactBilinearPooling([7, 5], D, pool="sum", seed=s), (7, 5), (3, 4)),
    "cbp_mean_m3": (lambda s: ff.CompactBilinearPooling([4, 3, 5], D, pool="mean", seed=s), (4, 3, 5), (2, 3)),
    "cbgp_softmax": (lambda s: ff.GatedCompactBilinearPooling([7, 5], D, seed=s), (7, 5), (3,)),
    "cbgp_sigmoid_sum": (lambda s: ff.GatedCompactBilinearPooling([7, 5], D, gate="sigmoid", pool="sum", seed=s), (7, 5), (2, 4)),
    "cbgp_m3": (lambda s: ff.GatedCompactBilinearPooling([4, 3, 5], D, seed=s), (4, 3, 5), (3,)),
    "mfb": (lambda s: ff.FactorizedBilinearPooling([7, 5], 4, factor=3).eval(), (7, 5), (3,)),
    "lmf": (lambda s: ff.LowRankFusion([7, 5], 6, rank=3), (7, 5), (3,)),
    "lmf_m3": (lambda s: ff.LowRankFusion([4, 3, 5], 6, rank=2), (4, 3, 5), (3,)),
    "tfn": (lambda s: ff.TensorFusion([7, 5], 6), (7, 5), (3,)),
    "tfn_m3": (lambda s: ff.TensorFusion([4, 3, 5], 6), (4, 3, 5), (3,)),
}
SKETCHING = [name for name in MODULES if name.startswith("cb")]


def inputs_for(gen, name, dtype=torch.float64, requires_grad=False):
    _, in_dims, lead = MODULES[name]
    return [randn(gen, *lead, n, dtype=dtype, requires_grad=requires_grad) for n in in_dims]


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("name", MODULES)
def test_forward_matches_oracle(gen, name):
    factory, in_dims, _ = MODULES[name]
    module = build(factory, covering_seed(in_dims, D)).double()
    xs = inputs_for(gen, name)
    out = module(*xs)
    if isinstance(module, ff.CompactBilinearPooling):
        z = explicit_tensor_sketch(xs, module.hashes, module.signs, D)
        if module.pool is not None:
            z = z.sum(1) if module.pool == "sum" else z.mean(1)
        if isinstance(module, ff.GatedCompactBilinearPooling):
            summary = torch.cat([x if module.pool is None else x.mean(1) for x in xs], -1)
            logits = summary @ module.gate_proj.weight.detach().T + module.gate_proj.bias.detach()
            z = z * (torch.softmax(logits, -1) if module.gate == "softmax" else torch.sigmoid(logits))
        expected = signed_sqrt_l2_oracle(z)
    elif isinstance(module, ff.FactorizedBilinearPooling):
        px, py = module.proj_x, module.proj_y
        expected = mfb_oracle(*xs, px.weight, px.bias, py.weight, py.bias, module.factor)
    elif isinstance(module, ff.LowRankFusion):
        expected = lmf_oracle(xs, list(module.factors), module.fusion_weights, module.fusion_bias)
    else:
        expected = tfn_oracle(xs, module.weight, module.bias)
    assert_rel_close(out, expected, 1e-12)


@pytest.mark.parametrize("name", MODULES)
def test_batch_of_one(gen, name):
    module = build(MODULES[name][0], 0).double()
    xs = inputs_for(gen, name)
    one = [x[:1] for x in xs]
    assert_rel_close(module(*one), module(*xs)[:1], 1e-13)


@pytest.mark.parametrize("cls", [ff.CompactBilinearPooling, ff.GatedCompactBilinearPooling])
def test_unpooled_sequence_gives_per_position_output(gen, cls):
    module = build(lambda s: cls([6, 4], D, seed=s), 0).double()
    x, y = randn(gen, 2, 5, 6), randn(gen, 2, 5, 4)
    out = module(x, y)
    assert out.shape == (2, 5, D)
    flat = module(x.reshape(10, 6), y.reshape(10, 4))
    assert_rel_close(out, flat.reshape(2, 5, D), 1e-14)


@pytest.mark.parametrize("cls", [ff.CompactBilinearPooling, ff.GatedCompactBilinearPooling])
@pytest.mark.parametrize("pool", ["sum", "mean"])
def test_pooled_shapes_and_2d_input_rejected(gen, cls, pool):
    module = cls([6, 4], D, pool=pool)
    assert module(randn(gen, 2, 5, 6).float(), randn(gen, 2, 5, 4).float()).shape == (2, D)
    with pytest.raises(ValueError, match="pool"):
        module(randn(gen, 2, 6).float(), randn(gen, 2, 4).float())


def test_mean_pool_is_sum_pool_over_t(gen):
    x, y = randn(gen, 2, 5, 6), randn(gen, 2, 5, 4)
    sum_pool = ff.CompactBilinearPooling([6, 4], D, pool="sum", normalize=False, seed=3).double()
    mean_pool = ff.CompactBilinearPooling([6, 4], D, pool="mean", normalize=False, seed=3).double()
    assert_rel_close(mean_pool(x, y) * 5, sum_pool(x, y), 1e-14)


# --------------------------------------------------------------------------- the gate


def gate_probe(module, xs):
    """Runs an unnormalised gated module; returns (output, gate input, gate logits, sketch)."""
    seen = {}
    handle = module.gate_proj.register_forward_hook(lambda mod, args, out: seen.update(inp=args[0], logits=out))
    try:
        out = module(*xs)
    finally:
        handle.remove()
    sketch = explicit_tensor_sketch(xs, module.hashes, module.signs, module.out_dim)
    if module.pool is not None:
        sketch = sketch.sum(1) if module.pool == "sum" else sketch.mean(1)
    return out, seen["inp"], seen["logits"], sketch


@pytest.mark.parametrize("pool", [None, "sum", "mean"])
def test_softmax_gate_sums_to_one(gen, pool):
    seed = covering_seed([6, 4], D)
    module = ff.GatedCompactBilinearPooling([6, 4], D, gate="softmax", pool=pool, normalize=False, seed=seed).double()
    lead = (3,) if pool is None else (3, 5)
    xs = [randn(gen, *lead, 6), randn(gen, *lead, 4)]
    out, gate_input, logits, sketch = gate_probe(module, xs)
    # The gate reads the concatenated inputs, averaged over T when pooling.
    assert torch.equal(gate_input, torch.cat([x if pool is None else x.mean(1) for x in xs], -1))
    gate = out / sketch
    assert (gate > 0).all()
    assert_rel_close(gate.sum(-1), torch.ones(3, dtype=torch.float64), 1e-12)
    assert_rel_close(gate, torch.softmax(logits.detach(), -1), 1e-12)


def test_sigmoid_gate(gen):
    seed = covering_seed([6, 4], D)
    module = ff.GatedCompactBilinearPooling([6, 4], D, gate="sigmoid", normalize=False, seed=seed).double()
    xs = [randn(gen, 3, 6), randn(gen, 3, 4)]
    out, _, logits, sketch = gate_probe(module, xs)
    gate = out / sketch
    assert ((gate > 0) & (gate < 1)).all()
    assert_rel_close(gate, torch.sigmoid(logits.detach()), 1e-12)


def test_gate_parameters_receive_gradients(gen):
    module = ff.GatedCompactBilinearPooling([6, 4], D, pool="mean")
    out = module(randn(gen, 2, 3, 6).float(), randn(gen, 2, 3, 4).float())
    # Not out.square().sum(): that is 1 per sample after L2 normalisation, with zero gradient.
    out.backward(randn(gen, *out.shape).float())
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------- MFB dropout


def test_mfb_dropout_only_in_training(gen):
    module = ff.FactorizedBilinearPooling([7, 5], 4, factor=3, dropout=0.5).double()
    x, y = randn(gen, 6, 7), randn(gen, 6, 5)
    module.eval()
    evaluated = module(x, y)
    assert torch.equal(evaluated, module(x, y))
    px, py = module.proj_x, module.proj_y
    assert_rel_close(evaluated, mfb_oracle(x, y, px.weight, px.bias, py.weight, py.bias, 3), 1e-13)
    module.train()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        first, second = module(x, y), module(x, y)
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    assert not torch.equal(first, evaluated) and not torch.equal(first, second)
    # Each training output is still an L2-normalised vector.
    assert_rel_close(first.norm(dim=-1), torch.ones(6, dtype=torch.float64), 1e-12)


def test_mfb_without_dropout_trains_deterministically(gen):
    module = ff.FactorizedBilinearPooling([7, 5], 4, factor=3, dropout=0.0).double().train()
    x, y = randn(gen, 2, 7), randn(gen, 2, 5)
    assert torch.equal(module(x, y), module.eval()(x, y))


# --------------------------------------------------------------------------- LMF parameters


@pytest.mark.parametrize("in_dims", [(7, 5), (4, 3, 5)])
def test_lmf_factors_are_registered_and_trained(gen, in_dims):
    module = ff.LowRankFusion(list(in_dims), 6, rank=3)
    params = list(module.parameters())
    # The peer bug: factors kept in a plain Python list are invisible to the optimizer.
    assert len(params) == len(in_dims) + 2
    for factor in module.factors:
        assert any(factor is p for p in params)
    assert [tuple(f.shape) for f in module.factors] == [(3, n + 1, 6) for n in in_dims]
    assert module.fusion_weights.shape == (1, 3) and module.fusion_bias.shape == (1, 6)
    assert all(key in module.state_dict() for key in [f"factors.{m}" for m in range(len(in_dims))])
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    xs = [randn(gen, 4, n).float() for n in in_dims]
    module(*xs).backward(randn(gen, 4, 6).float())
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0
    optimizer.step()
    for p, old in zip(params, before):
        assert not torch.equal(p.detach(), old)


def test_tfn_parameters(gen):
    module = ff.TensorFusion([4, 3, 5], 6)
    assert module.weight.shape == (6, 5 * 4 * 6) and module.bias.shape == (6,)
    assert {name for name, _ in module.named_parameters()} == {"weight", "bias"}
    module(*[randn(gen, 2, n).float() for n in (4, 3, 5)]).sum().backward()
    assert module.weight.grad.abs().sum() > 0 and module.bias.grad.abs().sum() > 0


# --------------------------------------------------------------------------- hashes and signs


def test_hashes_are_seeded_and_match_draw_function():
    in_dims = (7, 7, 5)
    a = ff.CompactBilinearPooling(list(in_dims), D, seed=4)
    b = ff.CompactBilinearPooling(list(in_dims), D, seed=4)
    c = ff.CompactBilinearPooling(list(in_dims), D, seed=5)
    drawn = ff.draw_hashes_and_signs(in_dims, D, 4)
    for m in range(3):
        assert torch.equal(a.hashes[m], b.hashes[m]) and torch.equal(a.signs[m], b.signs[m])
        assert torch.equal(a.hashes[m], drawn[m][0]) and torch.equal(a.signs[m], drawn[m][1])
    assert any(not torch.equal(a.hashes[m], c.hashes[m]) for m in range(3))
    assert any(not torch.equal(a.signs[m], c.signs[m]) for m in range(3))
    # Modalities of equal size get independent draws, not copies.
    assert not torch.equal(a.hashes[0], a.hashes[1]) or not torch.equal(a.signs[0], a.signs[1])


def test_hash_and_sign_distribution():
    n, d = 20000, 10
    ((hash, sign),) = ff.draw_hashes_and_signs([n], d, 123)
    assert hash.dtype == torch.int64 and sign.dtype == torch.int8
    assert hash.min() >= 0 and hash.max() < d
    assert set(sign.tolist()) == {-1, 1}
    # Uniform buckets and fair signs; a p-value below 1e-6 would flag a broken draw.
    assert scipy.stats.chisquare(torch.bincount(hash, minlength=d).numpy()).pvalue > 1e-6
    assert scipy.stats.binomtest(int((sign > 0).sum()), n).pvalue > 1e-6


def test_drawing_leaves_global_rng_untouched():
    state = torch.get_rng_state()
    ff.draw_hashes_and_signs([5, 6], D, 7)
    ff.CompactBilinearPooling([5, 6], D, seed=7)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("name", SKETCHING)
def test_hashes_and_signs_are_persistent_buffers(name):
    module = build(MODULES[name][0], 0)
    state = module.state_dict()
    for m in range(len(MODULES[name][1])):
        assert state[f"hash_{m}"].dtype == torch.int64 and state[f"sign_{m}"].dtype == torch.int8


# --------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("name", MODULES)
def test_state_dict_round_trip_is_bit_exact(gen, name):
    source = build(MODULES[name][0], 1)
    target = build(MODULES[name][0], 2)  # other parameters and, for sketches, other hashes
    xs = inputs_for(gen, name, dtype=torch.float32)
    assert not torch.equal(source(*xs), target(*xs))
    target.load_state_dict(source.state_dict())
    assert torch.equal(source(*xs), target(*xs))


# --------------------------------------------------------------------------- devices and dtypes


@pytest.mark.parametrize("name", SKETCHING)
def test_buffers_follow_to(gen, name):
    module = build(MODULES[name][0], 0).to(torch.float64)
    for m in range(len(MODULES[name][1])):
        assert module.hashes[m].dtype == torch.int64 and module.signs[m].dtype == torch.int8
    assert all(p.dtype == torch.float64 for p in module.parameters())
    assert module(*inputs_for(gen, name)).dtype == torch.float64
    meta = module.to("meta")
    for m in range(len(MODULES[name][1])):
        assert meta.hashes[m].device.type == "meta" and meta.hashes[m].dtype == torch.int64
        assert meta.signs[m].device.type == "meta" and meta.signs[m].dtype == torch.int8


@pytest.mark.parametrize("name", MODULES)
def test_forward_on_meta_device_gives_shapes(gen, name):
    # Shape inference (and FLOP counting) on the meta device: the ops have fake kernels.
    module = build(MODULES[name][0], 0)
    expected = module(*inputs_for(gen, name, dtype=torch.float32)).shape
    meta = module.to("meta")
    out = meta(*[torch.empty(x.shape, device="meta") for x in inputs_for(gen, name)])
    assert out.device.type == "meta" and out.shape == expected


@pytest.mark.parametrize("name", MODULES)
def test_autocast_bfloat16(gen, name):
    module = build(MODULES[name][0], 0)
    xs = inputs_for(gen, name, dtype=torch.float32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(*xs)
    assert torch.isfinite(out).all()
    out.float().backward(randn(gen, *out.shape).float())
    for t in list(xs) + list(module.parameters()):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert any(t.grad.abs().sum() > 0 for t in xs)
    # bfloat16 keeps ~3 significant digits; the result must still be close to float32's.
    reference = module(*[x.detach() for x in xs])
    assert_rel_close(out.float(), reference, 5e-2)


@pytest.mark.parametrize("name", MODULES)
def test_wrong_number_of_inputs(gen, name):
    module = build(MODULES[name][0], 0).double()
    xs = inputs_for(gen, name)
    # MFB's forward(x, y) is a plain Python signature: Python's TypeError names the argument.
    with pytest.raises((ValueError, TypeError), match="forward expects|required positional argument: 'y'"):
        module(*xs[:-1])
    with pytest.raises((ValueError, TypeError), match="forward expects|positional arguments"):
        module(*xs, xs[0])


def test_module_construction_errors():
    with pytest.raises(ValueError, match="in_dims"):
        ff.CompactBilinearPooling([7], D)
    with pytest.raises(TypeError, match="in_dims"):
        ff.LowRankFusion(7, 4)
    with pytest.raises(TypeError, match=r"in_dims\[1\]"):
        ff.TensorFusion([3, 2.5], 4)
    with pytest.raises(ValueError, match="out_dim"):
        ff.CompactBilinearPooling([7, 5], 0)
    with pytest.raises(ValueError, match="pool"):
        ff.CompactBilinearPooling([7, 5], D, pool="max")
    with pytest.raises(ValueError, match="gate"):
        ff.GatedCompactBilinearPooling([7, 5], D, gate="relu")
    with pytest.raises(ValueError, match="in_dims"):
        ff.FactorizedBilinearPooling([7, 5, 3], 4)
    with pytest.raises(ValueError, match="dropout"):
        ff.FactorizedBilinearPooling([7, 5], 4, dropout=1.0)
    with pytest.raises(TypeError, match="factor"):
        ff.FactorizedBilinearPooling([7, 5], 4, factor=2.0)
    with pytest.raises(ValueError, match="rank"):
        ff.LowRankFusion([7, 5], 4, rank=0)
    with pytest.raises(TypeError, match="out_dim"):
        ff.TensorFusion([7, 5], True)
