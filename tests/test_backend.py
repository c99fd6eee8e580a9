"""Backend selection: names, precedence (call > innermost context > set_backend >
FASTFUSION_BACKEND > "auto"), restoring on exit and on exceptions, unavailable backends.

Which backend ran is observed from the autograd graph: a concrete backend goes through a
``fastfusion::`` custom op, "eager" is the plain reference under PyTorch's autograd. The
tests must keep passing when the "cpp" and "triton" backends arrive, so nothing assumes
that "torch" is the only concrete backend.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastfusion as ff

from helpers import custom_op_ran, randn, random_hashes_signs

CONCRETE = ("torch", "triton", "cpp", "cuda")
UNAVAILABLE_ON_CPU = [name for name in CONCRETE if name not in ff.available_backends("cpu")]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def call(gen):
    """Runs every public op once (backend from the argument, else from the context) and
    returns, per op, whether a custom op ran. Starts from the "auto" default whatever
    FASTFUSION_BACKEND says (the autouse fixture in conftest.py restores the state)."""
    ff.set_backend("auto")
    (h0, h1), (s0, s1) = random_hashes_signs(gen, [5, 4], 7)
    x, y = randn(gen, 2, 5, requires_grad=True), randn(gen, 2, 4, requires_grad=True)
    ops = {
        "count_sketch": lambda **k: ff.count_sketch(x, h0, s0, 7, **k),
        "tensor_sketch": lambda **k: ff.tensor_sketch([x, y], [h0, h1], [s0, s1], 7, **k),
        "compact_bilinear": lambda **k: ff.compact_bilinear([x, y], [h0, h1], [s0, s1], 7, **k),
        "signed_sqrt_l2": lambda **k: ff.signed_sqrt_l2(x, **k),
        "factorized_bilinear": lambda **k: ff.factorized_bilinear(x, y, randn(gen, 6, 5), None, randn(gen, 6, 4), None, 3, **k),
        "low_rank_fusion": lambda **k: ff.low_rank_fusion([x, y], [randn(gen, 2, 6, 3), randn(gen, 2, 5, 3)], randn(gen, 2), randn(gen, 3), **k),
        "tensor_fusion": lambda **k: ff.tensor_fusion([x, y], randn(gen, 3, 30), None, **k),
    }

    def run(**kwargs):
        return {name: custom_op_ran(op(**kwargs)) for name, op in ops.items()}

    run.ops = ops
    return run


def test_call_runs_every_public_function(call):
    # The tests below hold every op to the backend rules through this fixture.
    assert set(call.ops) == {name for name in ff.ops.EXPORTS if not name.endswith("_reference")}


def test_every_op_is_exported_with_its_reference():
    # Exported from the op files' __all__: nothing else lists them.
    from fastfusion import _custom_op, reference

    for name in _custom_op.SPECS:
        assert name in ff.__all__ and callable(getattr(ff, name)), name
        assert f"{name}_reference" in reference.__all__ and callable(getattr(reference, f"{name}_reference")), name
    namespace = {}
    exec("from fastfusion import *; from fastfusion.reference import *", namespace)
    assert {"tensor_sketch", "tensor_sketch_reference", "CompactBilinearPooling"} <= set(namespace)


def test_available_backends():
    names = ff.available_backends()
    assert "torch" in names and "torch" in ff.available_backends("cpu")
    assert set(names) <= set(CONCRETE), "only concrete kernel families are listed"
    assert len(set(names)) == len(names)
    assert set(ff.available_backends("cpu")) <= set(names)


def test_default_auto_runs_a_custom_op(call):
    assert all(call().values())
    assert all(call(backend="auto").values())


def test_per_call_backend(call):
    assert all(call(backend="torch").values())
    assert not any(call(backend="eager").values())


@pytest.mark.parametrize("name", UNAVAILABLE_ON_CPU)
def test_unavailable_backend_raises_naming_it(call, name):
    for op in call.ops.values():
        with pytest.raises(ff.BackendUnavailableError, match=name):
            op(backend=name)
    with ff.backend(name):
        with pytest.raises(ff.BackendUnavailableError, match=name):
            call.ops["tensor_fusion"]()
        # An explicit per-call backend still wins over the context.
        assert custom_op_ran(call.ops["tensor_fusion"](backend="torch"))


def test_unavailable_backend_error_is_a_runtime_error():
    # Code that catches RuntimeError around a kernel call keeps working.
    assert issubclass(ff.BackendUnavailableError, RuntimeError)


@pytest.mark.parametrize("bad", ["fast", "TORCH", "", None, 1])
def test_invalid_names_raise_value_error(call, bad):
    if bad is not None:  # backend=None means "not chosen for this call"
        with pytest.raises(ValueError, match="backend"):
            call.ops["count_sketch"](backend=bad)
    with pytest.raises(ValueError, match="name"):
        ff.set_backend(bad)
    with pytest.raises(ValueError, match="name"):
        with ff.backend(bad):
            pass
    # A rejected name changes nothing.
    assert all(call().values())


def test_set_backend_and_context_precedence(call):
    ff.set_backend("eager")
    assert not any(call().values())
    with ff.backend("torch"):
        assert all(call().values())
        assert not any(call(backend="eager").values())  # per call beats context
        with ff.backend("eager"):
            assert not any(call().values())  # innermost context wins
            assert all(call(backend="torch").values())
        assert all(call().values())  # inner context restored
    assert not any(call().values())  # set_backend is back in force
    ff.set_backend("auto")
    assert all(call().values())


def test_selected_backend_names_what_a_call_runs():
    auto = ff.selected_backend("tensor_fusion")
    # On the CPU "auto" prefers the C++ kernels; Triton's interpreter is never chosen there.
    assert auto == ("cpp" if "cpp" in ff.available_backends("cpu") else "torch")
    with ff.backend("eager"):
        assert ff.selected_backend("compact_bilinear") == "eager"
        assert ff.selected_backend("compact_bilinear", "cpu", backend="torch") == "torch"
    assert ff.selected_backend("count_sketch", torch.device("cpu")) == auto
    with pytest.raises(ValueError, match="op must be one of"):
        ff.selected_backend("tfn")


def test_context_restores_on_exception(call):
    with pytest.raises(KeyError):
        with ff.backend("eager"):
            with ff.backend("torch"):
                raise KeyError("boom")
    assert all(call().values())
    with pytest.raises(ff.BackendUnavailableError):
        with ff.backend("cuda" if "cuda" in UNAVAILABLE_ON_CPU else "triton"):
            call.ops["signed_sqrt_l2"]()
    assert all(call().values())


def test_modules_follow_the_backend(gen):
    ff.set_backend("auto")  # whatever FASTFUSION_BACKEND says
    module = ff.LowRankFusion([5, 4], 3).double()
    x, y = randn(gen, 2, 5, requires_grad=True), randn(gen, 2, 4)
    with ff.backend("eager"):
        eager = module(x, y)
    torch_out = module(x, y)
    assert not custom_op_ran(eager) and custom_op_ran(torch_out)
    assert torch.allclose(eager, torch_out, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- environment

# FASTFUSION_BACKEND is read at import, so each value needs a fresh interpreter. Importing
# torch takes seconds: the interpreters start together (module fixture) and run in parallel.
ENV_PROBES = {
    # Surrounding blanks are ignored; set_backend then overrides the variable.
    " eager ": """
        import torch, fastfusion as ff
        from helpers import custom_op_ran
        x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
        first = custom_op_ran(ff.signed_sqrt_l2(x))
        ff.set_backend("torch")
        print(first, custom_op_ran(ff.signed_sqrt_l2(x)))
    """,
    "warp-speed": "import fastfusion",
    # A valid name whose backend is missing imports fine and raises on use.
    UNAVAILABLE_ON_CPU[-1]: f"""
        import torch, fastfusion as ff
        try:
            ff.signed_sqrt_l2(torch.randn(2, 5))
        except ff.BackendUnavailableError as error:
            print("raised", {UNAVAILABLE_ON_CPU[-1]!r} in str(error))
    """,
}


@pytest.fixture(scope="module")
def env_results():
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    procs = {
        value: subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            env={**env, "FASTFUSION_BACKEND": value}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for value, code in ENV_PROBES.items()
    }
    results = {}
    for value, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[value] = (proc.returncode, stdout, stderr)
    return results


def test_environment_variable_selects_default(env_results):
    returncode, stdout, stderr = env_results[" eager "]
    assert returncode == 0, stderr
    assert stdout.split() == ["False", "True"]


def test_invalid_environment_variable_raises_at_import(env_results):
    returncode, _, stderr = env_results["warp-speed"]
    assert returncode != 0
    assert "ValueError" in stderr and "FASTFUSION_BACKEND" in stderr and "warp-speed" in stderr


def test_environment_variable_with_unavailable_backend_raises_on_call(env_results):
    returncode, stdout, stderr = env_results[UNAVAILABLE_ON_CPU[-1]]
    assert returncode == 0, stderr
    assert stdout.split() == ["raised", "True"]


def test_meta_stands_for_another_device_type():
    x = torch.empty(3, 5, device="meta")
    assert ff._dispatch.backend_for("count_sketch", x, "auto") == "torch"
    with ff._dispatch.meta_stands_for("cuda"):
        assert ff._dispatch.device_type(x) == "cuda"
        assert ff._dispatch.backend_for("count_sketch", x, "auto") == ff.selected_backend("count_sketch", "cuda")
        assert ff._dispatch.device_type(torch.empty(1)) == "cpu"  # real tensors keep their device
    assert ff._dispatch.device_type(x) == "meta"


def test_import_stays_light():
    # import fastfusion must not pull in torch._dynamo (about 2 s) or, without a GPU, Triton:
    # nothing that dynamo traces may need dynamo's decorators at import. Timing is for
    # benchmarks; this checks what makes it slow.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    heavy = ("torch._dynamo", "torch._inductor") + (() if torch.cuda.is_available() else ("triton",))
    code = (
        "import sys, torch\n"
        f"heavy = {heavy!r}\n"
        "before = {m for m in sys.modules if m.startswith(heavy)}\n"
        "import fastfusion\n"
        "print(*sorted({m for m in sys.modules if m.startswith(heavy)} - before))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []


# Runs in a fresh interpreter: registering an op is process-wide, and the suite's own lists
# of ops follow the specs.
_OP_WITHOUT_CPP = textwrap.dedent(
    """
    import dataclasses, importlib, torch
    import fastfusion
    from fastfusion import _custom_op, _dispatch, cpp_backend
    spec = _custom_op.SPECS["signed_sqrt_l2"]
    _custom_op.register(dataclasses.replace(spec, name="sqrt_l2_copy", cpp_kernels=False))
    _custom_op.register(dataclasses.replace(spec, name="sqrt_l2_copy_cpp"))
    importlib.reload(cpp_backend)  # registers "cpp" for the specs as at import
    z = torch.randn(3, 7)
    out = _custom_op.call("sqrt_l2_copy", None, z, 1e-12)
    print(_dispatch.selected_backend("sqrt_l2_copy", "cpu"), _dispatch.selected_backend("sqrt_l2_copy_cpp", "cpu"),
          torch.equal(out, fastfusion.signed_sqrt_l2(z, backend="torch")))
    """
)


def test_an_op_may_start_without_cpp_kernels():
    if "cpp" not in ff.available_backends("cpu"):
        pytest.skip("the C++ backend is unavailable here: 'auto' runs 'torch' for every op")
    result = subprocess.run([sys.executable, "-c", _OP_WITHOUT_CPP], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["torch", "cpp", "True"]
