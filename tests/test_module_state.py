"""Loading a fusion module's state_dict: the arguments that define its tensors travel with
it and a mismatch is refused by name, every incoming tensor is checked before anything is
copied, and a refused load leaves the module bit for bit as it was."""

import io
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

import fastfusion as ff
from models.nets.heads import make_head

D = 11


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: t.detach().clone() for key, t in module.state_dict().items()}


def assert_unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Every parameter and buffer has its old dtype, shape and bytes."""
    after = module.state_dict()
    assert after.keys() == before.keys()
    for key, t in after.items():
        assert t.dtype == before[key].dtype and t.shape == before[key].shape, key
        # Bytes, not values: torch.equal would let -0.0 replace 0.0.
        assert torch.equal(t.contiguous().view(torch.uint8), before[key].contiguous().view(torch.uint8)), key


def assert_loaded(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, t in module.state_dict().items():
        assert torch.equal(t, state[key].to(t.dtype)), key


class Wrapper(nn.Module):
    """Holds a module as ``.module``, as DistributedDataParallel does."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def without_record(state: OrderedDict) -> OrderedDict:
    """``state`` as a fastfusion that did not record the module arguments saved it: torch's
    own metadata (a version per module) and nothing else."""
    old = OrderedDict(state)
    old._metadata = OrderedDict((prefix, {"version": 1}) for prefix in state._metadata)
    return old


# --------------------------------------------------------------------------- the arguments that define the tensors


CBP, CBGP, MFB = ff.CompactBilinearPooling, ff.GatedCompactBilinearPooling, ff.FactorizedBilinearPooling
LMF, TFN = ff.LowRankFusion, ff.TensorFusion

# name -> (saved module, loading module, the message's parts)
MISMATCHES = {
    # The hashes are in range for both sizes: only the record tells them apart.
    "cbp_out_dim": (lambda: CBP([6, 5], 31), lambda: CBP([6, 5], 64),
                    ["out_dim: the state_dict was saved with 31, this module has 64"]),
    "cbp_modalities": (lambda: CBP([6, 5], D), lambda: CBP([6, 5, 4], D),
                       ["in_dims: the state_dict was saved with (6, 5), this module has (6, 5, 4)"]),
    "cbp_pool": (lambda: CBP([6, 5], D), lambda: CBP([6, 5], D, pool="mean"),
                 ["pool: the state_dict was saved with None, this module has 'mean'"]),
    "cbp_normalize": (lambda: CBP([6, 5], D), lambda: CBP([6, 5], D, normalize=False),
                      ["normalize: the state_dict was saved with True, this module has False"]),
    "cbgp_gate": (lambda: CBGP([6, 5], D), lambda: CBGP([6, 5], D, gate="sigmoid"),
                  ["gate: the state_dict was saved with 'softmax', this module has 'sigmoid'"]),
    # Same parameter shapes (21 = 7 * 3 = 3 * 7 rows), other groups.
    "mfb_out_dim_factor": (lambda: MFB([7, 5], 7, factor=3), lambda: MFB([7, 5], 3, factor=7),
                           ["out_dim: the state_dict was saved with 7, this module has 3",
                            "factor: the state_dict was saved with 3, this module has 7"]),
    "mfb_normalize": (lambda: MFB([7, 5], 4, factor=3), lambda: MFB([7, 5], 4, factor=3, normalize=False),
                      ["normalize: the state_dict was saved with True, this module has False"]),
    # weight is (4, 7 * 6) either way, read in another order.
    "tfn_in_dims": (lambda: TFN([6, 5], 4), lambda: TFN([5, 6], 4),
                    ["in_dims: the state_dict was saved with (6, 5), this module has (5, 6)"]),
    "lmf_rank": (lambda: LMF([6, 5], 4, rank=3), lambda: LMF([6, 5], 4, rank=2),
                 ["rank: the state_dict was saved with 3, this module has 2"]),
}


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("case", MISMATCHES)
def test_mismatched_arguments_are_refused_by_name_and_change_nothing(case, strict):
    saved, loading, messages = MISMATCHES[case]
    state = saved().state_dict()
    module = loading()
    before = snapshot(module)
    with pytest.raises(ValueError) as error:
        module.load_state_dict(state, strict=strict)
    for message in messages:
        assert message in str(error.value)
    assert_unchanged(module, before)


def test_seed_and_dropout_do_not_define_the_tensors():
    # The loaded hashes replace the ones the seed drew; dropout acts in training only.
    for saved, loading in [(CBP([6, 5], D, seed=1), CBP([6, 5], D, seed=2)),
                           (MFB([7, 5], 4, factor=3, dropout=0.1), MFB([7, 5], 4, factor=3, dropout=0.5))]:
        state = saved.state_dict()
        loading.load_state_dict(state)
        assert_loaded(loading, state)


def test_record_survives_a_weights_only_checkpoint():
    buffer = io.BytesIO()
    torch.save({"model": Wrapper(CBP([6, 5], 31)).state_dict(), "epoch": 3}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["model"]
    with pytest.raises(ValueError, match="out_dim: the state_dict was saved with 31, this module has 64"):
        Wrapper(CBP([6, 5], 64)).load_state_dict(state)
    module = Wrapper(CBP([6, 5], 31, seed=5))
    module.load_state_dict(state)
    assert_loaded(module, state)


def test_ddp_prefix_keeps_the_record():
    state = Wrapper(MFB([7, 5], 7, factor=3)).state_dict()
    with pytest.raises(ValueError, match="module.out_dim: the state_dict was saved with 7, this module has 3"):
        Wrapper(MFB([7, 5], 3, factor=7)).load_state_dict(state)
    # The usual way from a DistributedDataParallel checkpoint to the bare module renames
    # the metadata with the keys.
    consume_prefix_in_state_dict_if_present(state, "module.")
    with pytest.raises(ValueError, match="factor: the state_dict was saved with 3, this module has 7"):
        MFB([7, 5], 3, factor=7).load_state_dict(state)
    bare = MFB([7, 5], 7, factor=3)
    bare.load_state_dict(state)
    assert_loaded(bare, state)


def test_module_inside_a_model_is_checked_through_the_parent():
    saved = make_head("tfn", (6, 5), 3, out_dim=4)
    model = make_head("tfn", (5, 6), 3, out_dim=4)
    before = snapshot(model.fusion)
    message = r"fusion.in_dims: the state_dict was saved with \(6, 5\), this module has \(5, 6\)"
    with pytest.raises(ValueError, match=message):
        model.load_state_dict(saved.state_dict())
    assert_unchanged(model.fusion, before)
    same = make_head("tfn", (6, 5), 3, out_dim=4)
    same.load_state_dict(saved.state_dict())
    assert_loaded(same, saved.state_dict())


@pytest.mark.parametrize("old", ["unrecorded", "plain_dict"])
def test_state_dict_without_the_record_loads_when_its_tensors_fit(old):
    # Saved before the arguments were recorded, or rebuilt as a plain dict (which drops
    # torch's metadata): the tensors are still checked, the arguments cannot be.
    state = CBGP([6, 5], D, seed=1).state_dict()
    state = without_record(state) if old == "unrecorded" else dict(state)
    module = CBGP([6, 5], D, seed=2)
    module.load_state_dict(state)
    assert_loaded(module, state)
    state["hash_1"] = state["hash_1"].clone().fill_(D)
    module = CBGP([6, 5], D, seed=2)
    before = snapshot(module)
    with pytest.raises(ValueError, match="hash_1"):
        module.load_state_dict(state)
    assert_unchanged(module, before)


# --------------------------------------------------------------------------- the tensors, checked before copying


def set_at(value):
    return lambda t: t.clone().index_fill_(0, torch.tensor([2]), value)


RANGE = r"values must lie in \[0, out_dim=11\), got range "
SIGN = r"values must all be \+1 or -1"

# name -> (key, new value from the saved one, error type, message pattern)
BAD_ENTRIES = {
    "hash_at_out_dim": ("hash_1", set_at(D), ValueError, rf"'hash_1'\] {RANGE}\[\d+, 11\]"),
    "hash_negative": ("hash_0", set_at(-5), ValueError, rf"'hash_0'\] {RANGE}\[-5, \d+\]"),
    "hash_huge": ("hash_1", set_at(10**6), ValueError, rf"'hash_1'\] {RANGE}\[\d+, 1000000\]"),
    "hash_float": ("hash_0", lambda t: t.float(), TypeError,
                   "'hash_0'] must be an int32 or int64 tensor, got torch.float32"),
    "hash_int16": ("hash_1", lambda t: t.to(torch.int16), TypeError, "'hash_1'] .*got torch.int16"),
    "hash_shape": ("hash_0", lambda t: t[:-1], ValueError, r"'hash_0'\] must have shape \(7,\), got \(6,\)"),
    "hash_not_a_tensor": ("hash_0", lambda t: t.tolist(), TypeError, "'hash_0'] must be a torch.Tensor, got list"),
    "sign_zero": ("sign_0", set_at(0), ValueError, f"'sign_0'] {SIGN}"),
    "sign_two": ("sign_1", set_at(2), ValueError, f"'sign_1'] {SIGN}"),
    "sign_minus_three": ("sign_0", set_at(-3), ValueError, f"'sign_0'] {SIGN}"),
    # Copied into int8, 1.5 would become a valid 1.
    "sign_fraction": ("sign_1", lambda t: set_at(1.5)(t.float()), ValueError, f"'sign_1'] {SIGN}"),
    "sign_bool": ("sign_0", lambda t: t > 0, TypeError, "'sign_0'] .*got torch.bool"),
    "gate_shape": ("gate_proj.weight", lambda t: t[:, :-1], ValueError,
                   r"'gate_proj.weight'\] must have shape \(11, 12\), got \(11, 11\)"),
}


@pytest.mark.parametrize("case", BAD_ENTRIES)
def test_bad_tensor_is_refused_by_name_and_changes_nothing(case):
    key, corrupt, error, pattern = BAD_ENTRIES[case]
    state = CBGP([7, 5], D, seed=0).state_dict()
    state[key] = corrupt(state[key])
    module = CBGP([7, 5], D, seed=1)
    before = snapshot(module)
    with pytest.raises(error, match=pattern):
        module.load_state_dict(state)
    assert_unchanged(module, before)


def test_other_modules_parameter_shape_is_checked_before_copying():
    state = MFB([7, 5], 4, factor=3).state_dict()
    state["proj_y.bias"] = state["proj_y.bias"][:-1]
    module = MFB([7, 5], 4, factor=3)
    before = snapshot(module)
    with pytest.raises(ValueError, match=r"'proj_y.bias'\] must have shape \(12,\), got \(11,\)"):
        module.load_state_dict(state)
    assert_unchanged(module, before)


def test_other_index_and_sign_dtypes_load_into_the_buffers_dtypes():
    source = CBP([7, 5], D, seed=0)
    state = source.state_dict()
    state["hash_0"], state["sign_0"], state["sign_1"] = (
        state["hash_0"].int(), state["sign_0"].double(), state["sign_1"].long())
    module = CBP([7, 5], D, seed=1)
    module.load_state_dict(state)
    assert [h.dtype for h in module.hashes] == [torch.int64] * 2 and [s.dtype for s in module.signs] == [torch.int8] * 2
    assert_loaded(module, source.state_dict())


# --------------------------------------------------------------------------- keys, dtypes, devices


def test_missing_keys_with_strict_false_keep_the_modules_own():
    source, module = CBGP([7, 5], D, seed=0), CBGP([7, 5], D, seed=1)
    state = source.state_dict()
    del state["hash_0"], state["gate_proj.bias"]
    own_hash, own_bias = module.hash_0.clone(), module.gate_proj.bias.detach().clone()
    result = module.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["gate_proj.bias", "hash_0"] and not result.unexpected_keys
    assert torch.equal(module.hash_0, own_hash) and torch.equal(module.gate_proj.bias, own_bias)
    assert torch.equal(module.hash_1, source.hash_1) and torch.equal(module.gate_proj.weight, source.gate_proj.weight)
    # A present entry is still checked.
    state["hash_1"] = set_at(D)(state["hash_1"])
    with pytest.raises(ValueError, match="hash_1"):
        module.load_state_dict(state, strict=False)


@pytest.mark.parametrize("saved_dtype, loading_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_loading_across_floating_dtypes(saved_dtype, loading_dtype):
    source = CBGP([7, 5], D, seed=0).to(saved_dtype)
    module = CBGP([7, 5], D, seed=1).to(loading_dtype)
    module.load_state_dict(source.state_dict())
    assert all(p.dtype == loading_dtype for p in module.parameters())
    assert module.hash_0.dtype == torch.int64 and module.sign_0.dtype == torch.int8
    assert_loaded(module, source.state_dict())


def test_meta_state_dict_loads_into_a_meta_module():
    # Shapes and dtypes are checked; a meta tensor has no values to read.
    module = CBP([7, 5], D, seed=1).to("meta")
    module.load_state_dict(CBP([7, 5], D, seed=0).to("meta").state_dict())
    assert module.hash_0.is_meta
    with pytest.raises(TypeError, match="hash_0"):
        module.load_state_dict({**CBP([7, 5], D).to("meta").state_dict(), "hash_0": torch.empty(7, device="meta")})


def test_real_state_dict_assigned_to_a_meta_module():
    source = CBGP([7, 5], D, seed=0)
    module = CBGP([7, 5], D, seed=1).to("meta")
    module.load_state_dict(source.state_dict(), assign=True)
    assert not module.hash_0.is_meta
    assert_loaded(module, source.state_dict())
