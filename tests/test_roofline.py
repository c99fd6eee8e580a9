"""The GPU cost model (benchmarks.trace, benchmarks.roofline) against hand counts.

Shapes here are tiny and the tensors meta: nothing runs, so the sizes can be chosen for easy
arithmetic. In this process TRITON_INTERPRET=1 (conftest), so each autotuned kernel offers
only its first config; the end-to-end test runs the CLI in a process without it, as a user
would, where every config is costed.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import itertools
import json
import math
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch

triton = pytest.importorskip("triton")
pytest.importorskip("fvcore")
from triton.runtime import Autotuner, Heuristics  # noqa: E402

import fastfusion.triton_backend as triton_backend  # noqa: E402
from benchmarks import ops, roofline, trace  # noqa: E402
from benchmarks.shapes import KERNELS, SHAPE_SETS  # noqa: E402
from fastfusion.triton_backend import _common  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
H100 = roofline.GPUS["h100"]


def _trace(kernel, sizes, provider, mode="forward", dtype=torch.float32):
    case, grad_out = trace.meta_case(kernel, sizes, dtype)
    fn = trace.provider_fns(case, provider)
    fn = fn["triton"] if provider == "fastfusion" else fn.get("reference", next(iter(fn.values())))
    return trace.trace_call(fn, case, mode, grad_out)


def _launches(t):
    return [e for e in t.events if isinstance(e, trace.TritonLaunch)]


def test_epilogue_launch_moves_its_input_and_output_once():
    t = _trace("signed_sqrt_l2", dict(B=6, d=40), "fastfusion")
    (launch,) = _launches(t)
    assert launch.kernel == "_common._epilogue_forward_kernel"
    assert launch.grids == [(6, 1, 1)]  # one program per row
    (cost,) = roofline.triton_costs(launch)
    assert cost.bytes == 2 * 6 * 40 * 4 and cost.flops == {}
    # The call holds its output and nothing else.
    assert t.peak_bytes == t.returned_bytes == 6 * 40 * 4 and t.extra_bytes == 0


def test_compile_estimate_fuses_the_reference_into_one_pass():
    t = _trace("signed_sqrt_l2", dict(B=6, d=40), "eager")
    eager = roofline.eager_estimate(t, H100)
    fused = roofline.compile_estimate(t, H100)
    assert len(fused.kernels) == 1 and fused.bytes == 2 * 6 * 40 * 4
    assert len(eager.kernels) > 5 and eager.bytes > 4 * fused.bytes  # the chain of pointwise ops


def _only_launch(name, kernel, sizes, mode="forward", dtype=torch.float32):
    """The one launch of Triton kernel ``name``, its config (the interpreter's only one, a
    dict of block sizes) and its cost."""
    (launch,) = [x for x in _launches(_trace(kernel, sizes, "fastfusion", mode, dtype)) if x.kernel == name]
    (config,) = launch.configs
    (cost,) = roofline.triton_costs(launch)
    return launch, config.kwargs, cost


def test_tensor_fusion_forward_flops_follow_the_program_tiles():
    _, config, cost = _only_launch("tensor_fusion._forward_kernel", "tensor_fusion", dict(B=5, n=(2, 3, 4), h=6))
    assert (config["BLOCK_B"], config["BLOCK_H"], config["BLOCK_K"]) == (64, 64, 32)
    # P = 3 * 4 * 5 = 60: one program, two K chunks of a 64 x 32 @ 32 x 64 float32 dot.
    assert cost.flops == {"fp32": 1 * 2 * (2 * 64 * 32 * 64)}


def test_tensor_fusion_grad_input_flops_are_one_g_w_tile_per_leading_index_and_j_chunk():
    _, config, cost = _only_launch(
        "tensor_fusion._grad_input_kernel", "tensor_fusion", dict(B=5, n=(2, 3, 20), h=6), mode="forward+backward"
    )
    assert (config["BLOCK_B"], config["BLOCK_H"], config["BLOCK_J"]) == (32, 128, 16)
    # One program; d_L = 21 in two j chunks, 3 * 4 leading indices, a 32 x 128 @ 128 x 16 dot
    # each (h = 6 padded to the h tile).
    assert cost.flops == {"fp32": 2 * 12 * (2 * 32 * 16 * 128)}


def test_low_rank_fusion_reads_the_modality_table_copied_from_the_host():
    launch, config, cost = _only_launch(
        "low_rank_fusion._forward_kernel", "low_rank_fusion", dict(B=5, n=(2, 3, 4), rank=2, h=6), dtype=torch.bfloat16
    )
    assert _common.modality_dims(launch.args) == [3, 4, 5]
    assert (config["BLOCK_B"], config["BLOCK_H"], config["BLOCK_K"]) == (32, 32, 16)
    # One (32 x 32) program, per rank (2) and modality (3) a projection over its n_m = 2, 3, 4
    # columns padded to BLOCK_K = 16 (the constant row is added, not multiplied).
    assert cost.flops == {"bf16": 2 * 3 * (2 * 32 * 32 * 16)}


def test_host_syncs_and_copies_are_counted():
    case, grad_out = trace.meta_case("signed_sqrt_l2", dict(B=2, d=3), torch.float32)

    def syncing(z):
        scale = z.abs().amax().item()  # one sync
        return z * scale + torch.tensor([1.0, 2.0, 3.0], device=z.device)  # one copy

    t = trace.trace_call(syncing, case, "forward", grad_out)
    assert sum(isinstance(e, trace.HostSync) for e in t.events) == 1
    copies = [e for e in t.events if isinstance(e, trace.HostCopy)]
    assert [c.nbytes for c in copies] == [3 * 4]


def test_eager_contractions_count_two_flops_per_multiply_add():
    sizes = dict(B=3, n=(4, 5), o=2, k=3)
    t = _trace("factorized_bilinear", sizes, "eager")
    flops = sum(e.flops for e in t.events if isinstance(e, trace.AtenCall) and e.kind == "contraction")
    assert flops == 2 * 3 * (2 * 3) * (4 + 5)  # the two projections x W_x^T and y W_y^T


def test_gathers_cost_the_sectors_they_touch():
    # 4096 random picks among 1024 sectors touch nearly all of them; 8 picks touch 8 sectors.
    assert roofline._sectors_touched(32 * 1024, 4096) == pytest.approx(32 * 1024 * (1 - math.exp(-4)), abs=32)
    assert roofline._sectors_touched(32 * 1024, 8) == pytest.approx(8 * 32, rel=0.01)


def _unnormalised_mfb_launches(mode):
    # The benchmark normalises MFB; without normalisation its backward takes another kernel.
    sizes = SHAPE_SETS["tiny"]["factorized_bilinear"]
    case, grad_out = trace.meta_case("factorized_bilinear", sizes, torch.float32)
    import fastfusion

    def fn(*args):
        return fastfusion.factorized_bilinear(*args, sizes["k"], normalize=False, backend="triton")

    return _launches(trace.trace_call(fn, case, mode, grad_out))


def _fft_cbp_launches(mode):
    # Pooled CBP forced onto the FFT path: the benchmarks' CBP cases take the Gram path or the
    # fused vector kernels in every dtype, so none launches the FFT path's own kernels.
    kernel = "compact_bilinear[seq]"
    case, grad_out = trace.meta_case(kernel, SHAPE_SETS["tiny"][kernel], torch.float32)
    fn = case.bind(functools.partial(case.fused, backend="triton", algorithm="fft"))
    return _launches(trace.trace_call(fn, case, mode, grad_out))


def _package_kernels() -> dict:
    """Every @triton.jit function defined in fastfusion.triton_backend that no other one calls,
    i.e. the kernels a host launches, named "<module>.<function>" as benchmarks.trace names
    launches. Found by walking the package's modules and parsing each function's calls."""
    jits = {}
    for info in pkgutil.iter_modules(triton_backend.__path__):
        module = importlib.import_module(f"{triton_backend.__name__}.{info.name}")
        for obj in vars(module).values():
            while isinstance(obj, (Autotuner, Heuristics)):
                obj = obj.fn
            if isinstance(obj, _common.JIT_FUNCTION_TYPES) and obj.fn.__module__ == module.__name__:
                jits[f"{info.name}.{obj.fn.__name__}"] = obj
    called = set()
    for jit in jits.values():
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(jit.fn)))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                callee = jit.fn.__globals__.get(node.func.id)
                if isinstance(callee, _common.JIT_FUNCTION_TYPES):
                    called.add(id(callee))
    return {name: jit for name, jit in jits.items() if id(jit) not in called}


def test_every_triton_kernel_of_the_package_declares_its_dot_flops():
    kernels = _package_kernels()
    # The walk finds kernels, and only kernels: device functions are called by them.
    assert "tensor_fusion._forward_kernel" in kernels and "_common._epilogue_forward_kernel" in kernels
    assert "_common.matmul_tile" not in kernels and "_common.dot" not in kernels
    undeclared = sorted(name for name, jit in kernels.items() if not callable(getattr(jit, "dot_flops", None)))
    assert not undeclared, f"kernels without @dot_flops (fastfusion.triton_backend._common): {undeclared}"


def test_every_triton_launch_has_a_flop_formula_and_every_kernel_is_launched():
    # Both sets: compact bilinear pooling's algorithm="auto" takes the FFT path at the tiny
    # sizes and the Gram path at compact_bilinear[seq]'s GPU sizes.
    launches = [launch for mode in ops.MODES for launch in _unnormalised_mfb_launches(mode) + _fft_cbp_launches(mode)]
    for kernel, shape_set in itertools.product(KERNELS, ("tiny", "cuda")):
        for mode in ops.MODES:
            for dtype in (torch.float32, torch.bfloat16):
                launches += _launches(_trace(kernel, SHAPE_SETS[shape_set][kernel], "fastfusion", mode, dtype))
    for launch in launches:
        roofline.triton_costs(launch)  # raises for a kernel without a formula
    # No kernel the benchmarks never launch, whose formula the model would never check.
    assert set(_package_kernels()) == {launch.kernel for launch in launches}


@triton.jit
def _undeclared_kernel(x_ptr):
    tl = triton.language
    tl.store(x_ptr, 0.0)


def test_a_launch_without_a_formula_fails_naming_the_file_to_declare_it_in():
    (launch,) = _launches(_trace("signed_sqrt_l2", dict(B=2, d=3), "fastfusion"))
    with pytest.raises(KeyError, match=r"declare one beside it in tests/test_roofline\.py"):
        roofline.triton_costs(dataclasses.replace(launch, fn=_undeclared_kernel))


def test_dot_flops_decorates_only_jit_functions():
    with pytest.raises(TypeError, match="formula must be callable"):
        _common.dot_flops(None)
    tuned = triton.autotune(configs=[triton.Config({})], key=[])(_undeclared_kernel)
    with pytest.raises(TypeError, match="must decorate a @triton.jit function directly"):
        _common.dot_flops(_common.no_dots)(tuned)


def test_cli_writes_the_model_and_its_error_against_measurements(tmp_path):
    """Every config costed (no interpreter), JSON + markdown + plot, and --measured's ratio."""
    sizes = SHAPE_SETS["cuda"]["tensor_fusion"]
    measured_rows = [
        {"kernel": "tensor_fusion", "dtype": "bfloat16", "mode": mode, "provider": provider, "sizes": sizes, "p50_ms": 2.0}
        for mode in ops.MODES for provider in ("eager", "compile", "triton")
    ]
    measured = tmp_path / "gpu-run.json"
    measured.write_text(json.dumps({"header": {"device": "NVIDIA H200", "git_commit": "x"}, "rows": measured_rows}))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run(
        [sys.executable, "-m", "benchmarks.roofline", "--ops", "tensor_fusion", "--dtypes", "bfloat16",
         "--measured", str(measured), "--out-dir", str(tmp_path)],
        cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=300,
    )
    data = json.loads((tmp_path / "roofline-h200.json").read_text())  # the GPU named by the measurement
    assert data["header"]["gpu"] == "h200" and "MODEL" in data["header"]["what"]
    rows = data["rows"]
    assert {(r["mode"], r["provider"]) for r in rows} == {
        (m, p) for m in ops.MODES for p in ("floor", "eager", "compile", "fastfusion")
    }
    fused = next(r for r in rows if r["provider"] == "fastfusion" and r["mode"] == "forward")
    (launch,) = [k for k in fused["kernels"] if k["name"] == "tensor_fusion._forward_kernel"]
    assert launch["candidates"] > 1  # every config costed, not the interpreter's one
    assert fused["worst_ms"] >= fused["model_ms"]
    assert "(not measured)" in (tmp_path / "roofline-h200.md").read_text().splitlines()[0]
    assert (tmp_path / "roofline-h200.png").stat().st_size > 0
    vs = (tmp_path / "roofline-h200-vs-gpu-run.md").read_text()
    model_ms = {(r["mode"], r["provider"]): r["model_ms"] for r in rows}
    for mode in ops.MODES:
        assert f"| tensor_fusion | bfloat16 | {mode} | fastfusion | {model_ms[(mode, 'fastfusion')]:.3g} | 2 | " \
               f"{model_ms[(mode, 'fastfusion')] / 2:.2f} |" in vs


def test_alias_annotated_ops_count_when_they_copy():
    # Below autograd (inside the custom ops the trace expands) reshape and to reach the
    # recorder whole; their schemas say they may alias, but whether they copied decides.
    def call(op, read, written):
        buffer = trace.Buffer((4,), (1,), torch.float32, 0, read, 16)
        return trace.AtenCall(op, [buffer], [dataclasses.replace(buffer, storage=written)])

    aten = torch.ops.aten
    for op in (aten.to.dtype, aten.reshape.default, aten.contiguous.default):
        assert call(op, 0, 1).launches  # a new storage: it copied
        assert not call(op, 0, 0).launches  # its input returned: nothing moved
    assert not call(aten.view.default, 0, 0).launches
    assert call(aten.mul_.Tensor, 0, 0).launches  # in place, but a kernel


def test_a_grid_smaller_than_the_gpu_runs_at_its_share_of_the_sms():
    cost = roofline.Cost("k", bytes=int(H100.bandwidth), flops={})  # one second at full bandwidth
    assert cost.seconds(H100) == pytest.approx(1.0)
    assert dataclasses.replace(cost, programs=H100.sms // 2).seconds(H100) == pytest.approx(2.0)
    assert dataclasses.replace(cost, programs=10 * H100.sms + 1).seconds(H100) == pytest.approx(1.0)


def test_a_tf32x3_dot_costs_three_tf32_passes():
    # The fused vector CBP kernel runs its dots at "tf32x3" (routed) or, asked to, at "tf32",
    # the same dots (d = 4096 = 16 x 16 x 16: 12 d (16 + 16 + 16) FLOPs a sample): the model
    # puts both on the TF32 unit, tf32x3's three times.
    from fastfusion.triton_backend import compact_bilinear as triton_cbp

    B, d = 2, 4096
    flops = {}
    for precision in ("tf32x3", "tf32"):
        with mock.patch.dict(triton_cbp._FUSED_PRECISION, {torch.float32: precision}):
            (launch,) = [e for e in _launches(_trace("compact_bilinear[vec]", dict(B=B, n=(2048, 2048), d=d),
                                                     "fastfusion", dtype=torch.float32))
                         if e.kernel.endswith("_fused_vector_cbp_kernel")]
        (cost,) = roofline.triton_costs(launch)
        flops[precision] = cost.flops
    assert flops["tf32"] == {"tf32": B * 12 * d * 48}
    assert flops["tf32x3"] == {"tf32": 3 * B * 12 * d * 48}
