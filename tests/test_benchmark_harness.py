"""The benchmark harness itself: a run on tiny shapes fills every field of every row."""

from __future__ import annotations

import datetime
import json
import math
import time

import pytest
import torch

pytest.importorskip("fvcore")
from benchmarks import ops, run, summary, timing  # noqa: E402
from benchmarks.shapes import KERNELS, SHAPE_SETS  # noqa: E402

CPU = torch.device("cpu")
# The harness's plumbing is under test, not the providers: dynamo without inductor (whose
# codegen would take minutes for every kernel), and no backend but "torch" (under
# TRITON_INTERPRET=1 "triton" runs on the CPU too, interpreted, slowly).
PROVIDERS = ["eager", "compile", "fastfusion", "torch"]
FAST = ["--device", "cpu", "--tiny", "--compile-backend", "eager", "--providers", *PROVIDERS]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    paths = run.main([*FAST, "--out-dir", str(out)])
    return paths, json.loads(paths["json"].read_text())


def test_header_names_device_versions_commit_date_and_command(report):
    _, data = report
    head = data["header"]
    assert head["device_type"] == "cpu" and "cores" in head["device"]
    assert head["torch"] == torch.__version__ and head["python"].count(".") == 2
    assert "triton" in head and head["git_commit"]
    assert datetime.datetime.fromisoformat(head["date"]).tzinfo is not None
    assert head["command"].startswith("python -m benchmarks.run") and "--tiny" in head["command"]
    assert head["shape_set"] == "tiny"
    assert head["shapes"] == json.loads(json.dumps({k: SHAPE_SETS["tiny"][k] for k in KERNELS}))
    assert head["interrupted"] is False
    assert head["copy_bandwidth_bytes"] == 64 * 2**20
    assert head["copy_bandwidth_gb_per_s"] == max(head["copy_bandwidth_runs_gb_per_s"]) > 0
    assert set(head["conventions"]) >= {"time", "peak_mem_bytes", "extra_mem_bytes", "rel_err", "flops", "bytes", "frac_copy_bw"}


def test_one_complete_row_per_kernel_mode_and_provider(report):
    _, data = report
    rows, copy_bw = data["rows"], data["header"]["copy_bandwidth_gb_per_s"]
    keys = [(r["kernel"], r["mode"], r["provider"]) for r in rows]
    assert sorted(keys) == sorted((k, m, p) for k in KERNELS for m in ops.MODES for p in PROVIDERS)
    p50 = {(r["kernel"], r["mode"], r["provider"]): r["p50_ms"] for r in rows}
    for r in rows:
        assert tuple(r) == run.ROW_FIELDS
        assert r["error"] is None, r
        assert r["shape"] == r["kernel"] and r["sizes"] == json.loads(json.dumps(SHAPE_SETS["tiny"][r["kernel"]]))
        assert r["dtype"] == "float32"
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
        for baseline in ("eager", "compile"):
            expected = p50[r["kernel"], r["mode"], baseline] / r["p50_ms"]
            assert r[f"speedup_vs_{baseline}"] == pytest.approx(expected)
        assert isinstance(r["peak_mem_bytes"], int) and r["peak_mem_bytes"] >= 0
        assert isinstance(r["extra_mem_bytes"], int) and 0 <= r["extra_mem_bytes"] <= r["peak_mem_bytes"]
        assert 0 <= r["rel_err"] < 1e-3
        assert isinstance(r["flops"], int) and isinstance(r["bytes"], int) and r["bytes"] > 0
        if r["kernel"] == "signed_sqrt_l2":  # pointwise: no counted FLOPs, so no rate
            assert r["flops"] == 0 and r["gflops_per_s"] is None
        else:
            assert r["flops"] > 0
            assert r["gflops_per_s"] == pytest.approx(r["flops"] / r["p50_ms"] / 1e6)
        assert r["gb_per_s"] == pytest.approx(r["bytes"] / r["p50_ms"] / 1e6)
        assert r["frac_copy_bw"] == pytest.approx(r["gb_per_s"] / copy_bw)
    eager_cs = next(r for r in rows if r["kernel"] == "count_sketch" and r["provider"] == "eager")
    assert all(v in eager_cs["note"] for v in ("index_add", "sparse_mm", "dense_mm"))


def test_backward_adds_flops_and_bytes(report):
    _, data = report
    by_key = {(r["kernel"], r["mode"], r["provider"]): r for r in data["rows"]}
    for kernel in KERNELS:
        fwd, both = by_key[kernel, "forward", "eager"], by_key[kernel, "forward+backward", "eager"]
        assert both["bytes"] > fwd["bytes"]
        assert both["flops"] >= fwd["flops"]
    mfb = by_key["mfb", "forward", "eager"]["flops"]
    assert by_key["mfb", "forward+backward", "eager"]["flops"] == 3 * mfb  # contractions only


def test_markdown_and_plot_are_written(report):
    paths, data = report
    table = paths["md"].read_text()
    assert paths["md"].name == "latest-cpu-tiny.md" and paths["json"].name in table
    assert data["header"]["device"] in table
    for kernel in KERNELS:
        assert f"| {kernel} | float32 | forward+backward | fastfusion |" in table
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_provider_is_recorded_not_fatal(tmp_path):
    paths = run.main([*FAST, "--compile-backend", "no-such-backend", "--ops", "mfb", "--out-dir", str(tmp_path)])
    rows = json.loads(paths["json"].read_text())["rows"]
    for r in rows:
        if r["provider"] == "compile":
            assert "no-such-backend" in r["error"]
            assert all(r[f] is None for f in run.MEASURED_FIELDS)
        else:
            assert r["error"] is None and r["speedup_vs_compile"] is None and r["p50_ms"] > 0


@pytest.mark.parametrize("stop_at, kept", [("count_sketch", set()), ("signed_sqrt_l2", {"count_sketch"})])
def test_an_interrupted_run_writes_the_rows_measured_so_far(tmp_path, monkeypatch, stop_at, kept):
    # gpu_check.sh stops a run at its time limit with SIGINT, which Python raises as KeyboardInterrupt.
    groups = run._case_groups

    def interrupted_at(kernel, *args, **kwargs):
        if kernel == stop_at:
            raise KeyboardInterrupt
        yield from groups(kernel, *args, **kwargs)

    monkeypatch.setattr(run, "_case_groups", interrupted_at)
    paths = run.main([*FAST, "--ops", "count_sketch", "signed_sqrt_l2", "--out-dir", str(tmp_path)])
    data = json.loads(paths["json"].read_text())
    assert data["header"]["interrupted"] is True
    assert {r["kernel"] for r in data["rows"]} == kept
    assert "**Interrupted**" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_commit_of_a_copy_without_git_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "REPO", tmp_path)  # not a git checkout
    monkeypatch.delenv("FASTFUSION_GIT_COMMIT", raising=False)
    assert run._git_commit() == "unknown"
    monkeypatch.setenv("FASTFUSION_GIT_COMMIT", "abc123")
    assert run._git_commit() == "abc123"


def test_summary_table_takes_missing_baselines_and_several_dtypes(report):
    _, data = report
    # A compile provider that failed everywhere, and the same rows again in a second dtype.
    rows = [r | ({"error": "boom", "p50_ms": None} if r["provider"] == "compile" else {}) for r in data["rows"]]
    rows = [r | {"speedup_vs_compile": None} for r in rows]
    rows += [r | {"dtype": "bfloat16"} for r in rows]
    table = summary.summary_table({"header": data["header"] | {"dtypes": ["float32", "bfloat16"]}, "rows": rows})
    for kernel in KERNELS:
        for dtype in ("float32", "bfloat16"):
            line = next(x for x in table.splitlines() if x.startswith(f"| {kernel} {dtype} | forward |"))
            assert "x (torch) | – |" in line, line


def test_every_available_provider_is_offered():
    assert set(PROVIDERS) <= set(ops.providers("cpu"))
    assert set(ops.providers("cpu")) - set(PROVIDERS) <= {"triton", "cpp"}


def test_every_shape_set_names_the_same_kernels_and_sizes():
    for name, shapes in SHAPE_SETS.items():
        assert tuple(shapes) == KERNELS, name
        for kernel in KERNELS:
            assert shapes[kernel].keys() == SHAPE_SETS["cuda"][kernel].keys(), (name, kernel)


def test_cpu_peak_memory_replays_allocations_in_order():
    mib = 2**20

    def two_in_turn():
        a = torch.empty(4 * mib, dtype=torch.uint8)
        del a
        return torch.empty(4 * mib, dtype=torch.uint8)

    def two_at_once():
        a = torch.empty(4 * mib, dtype=torch.uint8)
        b = torch.empty(4 * mib, dtype=torch.uint8)
        return a, b

    assert timing.peak_memory(two_in_turn, CPU) == 4 * mib
    assert timing.peak_memory(two_at_once, CPU) == 8 * mib


def test_cpu_timing_percentiles_and_errors():
    def fails():
        raise RuntimeError("out of memory")

    results = timing.measure({"sleep": lambda: time.sleep(2e-3), "fails": fails}, CPU, budget_s=0.05)
    assert isinstance(results["fails"], RuntimeError)
    sleep = results["sleep"]
    assert 2.0 <= sleep.p20_ms <= sleep.p50_ms <= sleep.p80_ms
    assert sleep.p50_ms < 20  # generous: shared CI machines oversleep


def test_rel_err_is_the_worst_relative_norm_error():
    oracle = (torch.ones(4, dtype=torch.float64), torch.full((2,), 2.0, dtype=torch.float64))
    results = (torch.ones(4), torch.tensor([2.0, 2.0 + math.sqrt(8) * 1e-3], dtype=torch.float64))
    assert ops.rel_err(results, oracle) == pytest.approx(1e-3)


@pytest.mark.parametrize("kernel", KERNELS)
def test_cases_capture_no_tensors_so_make_case_places_them_all(kernel):
    """A tensor captured by a case's closure would stay on the CPU in a CUDA run."""
    case = ops.make_case(kernel, SHAPE_SETS["tiny"][kernel], torch.float32, CPU)
    cells = [cell.cell_contents for cell in case.apply.__closure__ or ()]
    flat = [x for c in cells for x in (c if isinstance(c, (list, tuple)) else [c])]
    assert not any(isinstance(x, torch.Tensor) for x in flat)


def test_dft_accuracy_four_step_is_the_dft():
    """benchmarks.dft_accuracy's decomposition with unrounded operands is the DFT (to its
    float32 sums); with TF32 operands it is far less accurate (the README's argument rests on
    both)."""
    from benchmarks import dft_accuracy

    x = torch.randn(12 * 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = torch.fft.fft(x)

    def error(rounding):
        return ((dft_accuracy.four_step_dft(x, 12, 10, rounding, passes=1) - exact).abs().norm() / exact.abs().norm()).item()

    assert error(lambda t: t) < 1e-6
    assert error(dft_accuracy.ROUNDINGS["tf32"]) > 1e-5
