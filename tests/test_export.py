"""Exporting models that use fastfusion: torch.export programs that record the op, not the backend
picked where they were made (and so run on an install without the C++ extension), ONNX programs
checked with onnxruntime against the float64 reference, torch.jit.trace, and the clear error of a
double backward."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fastfusion as ff
from fastfusion._custom_op import SPECS

from helpers import rel_err

# Odd sizes, B = 3; every module and every operator form (vector and pooled CBP, the gate).
MODULES = {
    "cbp": (lambda: ff.CompactBilinearPooling([5, 7], 17), [(3, 5), (3, 7)]),
    "cbp_mean_pool": (lambda: ff.CompactBilinearPooling([5, 7], 17, pool="mean"), [(3, 4, 5), (3, 4, 7)]),
    "cbgp": (lambda: ff.GatedCompactBilinearPooling([5, 7], 17), [(3, 5), (3, 7)]),
    "mfb": (lambda: ff.FactorizedBilinearPooling([5, 7], 6, factor=3), [(3, 5), (3, 7)]),
    "lmf": (lambda: ff.LowRankFusion([5, 7, 4], 6, rank=3), [(3, 5), (3, 7), (3, 4)]),
    "tfn": (lambda: ff.TensorFusion([5, 7, 4], 6), [(3, 5), (3, 7), (3, 4)]),
}
# Every op (its spec): a new op without a double-backward case below fails that test.
OPS = tuple(SPECS)


def make(name: str, seed: int = 0):
    factory, shapes = MODULES[name]
    torch.manual_seed(seed)
    module = factory().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = tuple(torch.randn(shape, generator=gen) for shape in shapes)
    return module, inputs


def float64_output(module, inputs) -> torch.Tensor:
    """The module's output by the plain-PyTorch reference in float64 (parameters cast, hashes kept)."""
    import copy

    module64 = copy.deepcopy(module).double()
    with ff.backend("eager"):
        return module64(*(x.double() for x in inputs))


def fastfusion_nodes(graph) -> list:
    return [n for n in graph.nodes if n.op == "call_function" and str(n.target).startswith("fastfusion.")]


@pytest.mark.parametrize("name", MODULES)
def test_exported_program_records_the_request_not_the_pick(name):
    module, inputs = make(name)
    program = torch.export.export(module, inputs)
    nodes = fastfusion_nodes(program.graph)
    assert nodes, "the exported graph should call the fastfusion op"
    for node in nodes:
        # The last two arguments are the residual request and the backend: an exported graph
        # asks for no residuals, and holds "auto", which is resolved where the program runs.
        assert node.args[-2:] == (False, "auto"), node.format_node()
    torch.testing.assert_close(program.module()(*inputs), module(*inputs), rtol=0, atol=0)


# Runs in a fresh interpreter where the C++ extension cannot be built (no compiler, empty cache):
# the plain install that a program exported elsewhere must run on.
_LOAD_WITHOUT_CPP = textwrap.dedent(
    """
    import sys, torch, fastfusion as ff
    assert ff.available_backends("cpu") == ("torch",), ff.available_backends("cpu")
    for path in sys.argv[1:]:
        program = torch.export.load(path)
        inputs, expected = torch.load(path + ".io")
        out = program.module()(*inputs)
        print(path, float((out - expected).norm() / expected.norm()))
    """
)


def test_exported_program_made_with_cpp_runs_without_it(tmp_path):
    if ff.selected_backend("tensor_fusion", "cpu") != "cpp":
        pytest.skip("the C++ backend is unavailable here, so no program is made with it")
    paths = []
    for name in MODULES:
        module, inputs = make(name, seed=3)
        path = str(tmp_path / f"{name}.pt2")
        torch.export.save(torch.export.export(module, inputs), path)
        torch.save((inputs, module(*inputs)), path + ".io")  # computed by "cpp", the pick here
        paths.append(path)
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-compiler"),
        "FASTFUSION_CACHE_DIR": str(tmp_path / "empty-cache"),
        "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _LOAD_WITHOUT_CPP, *paths], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = dict(line.rsplit(" ", 1) for line in result.stdout.split("\n") if line)
    assert len(errors) == len(MODULES)
    for path, error in errors.items():
        # "torch" against "cpp": the same math in another order, float32 round-off only.
        assert float(error) < 1e-5, path


@pytest.mark.parametrize("name", MODULES)
def test_onnx_export_matches_the_float64_reference(name):
    onnxruntime = pytest.importorskip("onnxruntime")
    module, inputs = make(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, inputs, dynamo=True, verbose=False)
    ops = {node.op_type for node in program.model_proto.graph.node}
    assert not any("fastfusion" in op for op in ops), ops
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString())
    feeds = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), inputs)}
    out = torch.from_numpy(session.run(None, feeds)[0])
    expected = float64_output(module, inputs)
    # float32 against float64: within 2x of PyTorch's own float32 error, with a floor for the
    # ulp-level cases. CBP's transforms run as onnxruntime's DFT, not PyTorch's FFT: measured
    # 2e-6 at d = 8192 and 3e-6 at d = 17 (PyTorch: 4e-7, 1.2e-7), so those get a 1e-5 floor.
    own = rel_err(module(*inputs), expected)
    floor = 1e-5 if name.startswith("cb") else 1e-6
    assert rel_err(out, expected) <= max(2 * own, floor), (rel_err(out, expected), own)


@pytest.mark.parametrize("name", MODULES)
def test_jit_trace_checks_and_matches(name):
    module, inputs = make(name)
    for x in inputs:
        x.requires_grad_(True)  # tracing with autograd on must not bake a residual request in
    traced = torch.jit.trace(module, inputs)  # check_trace reruns it and compares
    torch.testing.assert_close(traced(*inputs), module(*inputs), rtol=0, atol=0)


def double_backward_cases(backend: str):
    """(function of float64 leaves, leaves) reaching each op's backward custom op."""
    gen = torch.Generator().manual_seed(5)
    x, y = (torch.randn(3, n, generator=gen, dtype=torch.float64, requires_grad=True) for n in (5, 7))
    hash = torch.randint(0, 11, (5,), generator=gen)
    sign = torch.randint(0, 2, (5,), generator=gen).double() * 2 - 1
    cases = {
        "count_sketch": (lambda x: ff.count_sketch(x, hash, sign, 11, backend=backend), [x]),
        "signed_sqrt_l2": (lambda x: ff.signed_sqrt_l2(x, backend=backend), [x]),
    }
    for op, name in (("compact_bilinear", "cbgp"), ("factorized_bilinear", "mfb"), ("low_rank_fusion", "lmf"), ("tensor_fusion", "tfn")):
        module = MODULES[name][0]().double().eval()  # eval: MFB drops out in training
        leaves = [x, y] + ([] if len(module.in_dims) == 2 else [torch.randn(3, 4, dtype=torch.float64, requires_grad=True)])

        def run(*xs, module=module):
            with ff.backend(backend):
                return module(*xs)

        cases[op] = (run, leaves)
    return cases


@pytest.mark.parametrize("op", OPS)
def test_double_backward_raises_once_differentiable(op):
    backends = [b for b in ("torch", "cpp") if b in ff.available_backends("cpu")]
    for backend in backends:
        fn, leaves = double_backward_cases(backend)[op]
        with pytest.raises(RuntimeError, match=f"{op} is once differentiable.*backend='eager'"):
            torch.autograd.gradgradcheck(fn, leaves)
    # The way out that the error names works: the reference is differentiable twice.
    fn, leaves = double_backward_cases("eager")[op]
    assert torch.autograd.gradgradcheck(fn, leaves)
