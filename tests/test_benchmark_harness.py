"""The benchmark harness itself: a run on tiny shapes fills every field of every row."""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

import fastfusion
from fastfusion import _custom_op

pytest.importorskip("fvcore")
from benchmarks import ops, run, summary, timing  # noqa: E402
from benchmarks.shapes import BENCHMARKS, KERNELS, SHAPE_SETS  # noqa: E402

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
        expected_backend = {
            "eager": None, "compile": None, "torch": "torch",
            "fastfusion": fastfusion.selected_backend(BENCHMARKS[r["kernel"]].op, CPU),
        }[r["provider"]]
        assert r["backend"] == expected_backend
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
    mfb = by_key["factorized_bilinear", "forward", "eager"]["flops"]
    assert by_key["factorized_bilinear", "forward+backward", "eager"]["flops"] == 3 * mfb  # contractions only


def test_markdown_and_plot_are_written(report):
    paths, data = report
    table = paths["md"].read_text()
    assert paths["md"].name == "latest-cpu-tiny.md" and paths["json"].name in table
    assert data["header"]["device"] in table
    for kernel in KERNELS:
        auto = fastfusion.selected_backend(BENCHMARKS[kernel].op, CPU)
        assert f"| {kernel} | float32 | forward+backward | fastfusion ({auto}) |" in table
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_csv_has_one_flat_line_per_row_with_the_runs_provenance(report):
    paths, data = report
    head, rows = data["header"], data["rows"]
    assert paths["csv"].parent == paths["json"].parent and paths["csv"].stem == paths["json"].stem
    with paths["csv"].open(newline="") as f:
        reader = csv.DictReader(f)
        lines = list(reader)
    assert reader.fieldnames[: len(run.ROW_FIELDS)] == list(run.ROW_FIELDS)
    assert {"device", "torch", "git_commit", "date", "command", "load_average_1m_start"} <= set(reader.fieldnames)
    keys = [(x["kernel"], x["provider"], x["mode"], x["dtype"]) for x in lines]
    assert len(set(keys)) == len(keys) == len(rows) == len(KERNELS) * len(PROVIDERS) * len(ops.MODES)
    for line, row in zip(lines, rows):
        assert (line["kernel"], line["provider"], line["mode"], line["dtype"]) == (
            row["kernel"], row["provider"], row["mode"], row["dtype"]
        )
        assert line["backend"] == (row["backend"] or "")
        for field in ("p50_ms", "p20_ms", "p80_ms"):
            assert float(line[field]) == row[field]  # repr of a float round-trips
        assert json.loads(line["sizes"]) == row["sizes"]
        assert line["device"] == head["device"] and line["git_commit"] == head["git_commit"]
        assert line["command"] == head["command"] and line["date"] == head["date"]
        assert float(line["load_average_1m_start"]) == head["load_average_1m"]["start"]
        assert line["error"] == ""


def test_no_profiler_log_on_the_terminal(tmp_path, capfd):
    """torch.profiler (peak memory on CPU) makes kineto log every start and stop on file
    descriptor 2; none of it may reach the terminal, but the run's own messages do."""
    run.main([*FAST, "--ops", "signed_sqrt_l2", "--out-dir", str(tmp_path)])
    out, err = capfd.readouterr()
    assert "wrote " in err and "| signed_sqrt_l2 |" in out
    for text in (out, err):
        assert "USDT" not in text and "profiler_start" not in text and "profiler_stop" not in text


def test_kineto_filter_keeps_every_other_line(capfd):
    with timing._without_kineto_log():
        os.write(2, b"USDT:2026-12-01 20:51:23 914:914 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"a compiler warning\n")
        os.write(2, b"USDT:2026-12-01 20:51:23 914:914 SyncActivityProfilerHandler.cpp:59] profiler_stop\n")
    assert capfd.readouterr().err == "a compiler warning\n"


def _synthetic_row(provider, backend, p50, p20, p80, eager_p50=2.0, mode="forward"):
    speedup = None if p50 is None else eager_p50 / p50
    return dict.fromkeys(run.ROW_FIELDS) | {
        "kernel": "factorized_bilinear", "provider": provider, "backend": backend, "mode": mode, "dtype": "float32",
        "p50_ms": p50, "p20_ms": p20, "p80_ms": p80, "speedup_vs_eager": speedup,
        "error": "boom" if p50 is None else None,
    }


SYNTHETIC_ROWS = [
    _synthetic_row("eager", None, 2.0, 1.9, 2.2),
    _synthetic_row("compile", None, 1.6, 1.5, 2.0),
    _synthetic_row("fastfusion", "cpp", 1.1, 1.0, 1.3),
    _synthetic_row("cpp", "cpp", 1.0, 0.8, 1.25),
    _synthetic_row("torch", "torch", None, None, None),
]


def _synthetic_head(load):
    return {
        "device": "test CPU", "device_type": "cpu", "cpu_count": 2, "shape_set": "tiny", "git_commit": "abc",
        "dtypes": ["float32"], "load_average_1m": {"start": load, "end": load}, "interrupted": False,
    }


def test_plot_draws_one_bar_per_backend_with_p20_p80_range():
    bars = run.plot_bars(SYNTHETIC_ROWS)
    # auto ran cpp, which also ran on its own: one cpp bar, marked as auto's pick.
    assert set(bars) == {("forward", label, "factorized_bilinear", "float32") for label in ("compile", "cpp", "torch")}
    cpp = bars["forward", "cpp", "factorized_bilinear", "float32"]
    assert cpp.picked_by_auto and cpp.speedup == pytest.approx(2.0)
    assert (cpp.low, cpp.high) == (pytest.approx(2.0 / 1.25), pytest.approx(2.0 / 0.8))
    assert not bars["forward", "compile", "factorized_bilinear", "float32"].picked_by_auto
    assert math.isnan(bars["forward", "torch", "factorized_bilinear", "float32"].speedup)  # failed: an empty slot
    # Without the cpp provider, auto's row is drawn, named by the backend it ran.
    alone = run.plot_bars([r for r in SYNTHETIC_ROWS if r["provider"] != "cpp"])
    auto = alone["forward", "fastfusion (cpp)", "factorized_bilinear", "float32"]
    assert auto.picked_by_auto and auto.speedup == pytest.approx(2.0 / 1.1)


@pytest.mark.parametrize("load", [0.5, 7.5])
def test_plot_has_error_bars_plain_tick_labels_and_the_load_warning(load):
    import matplotlib.pyplot as plt
    from matplotlib.container import BarContainer

    rows = SYNTHETIC_ROWS + [r | {"mode": "forward+backward"} for r in SYNTHETIC_ROWS]
    fig = run.figure(_synthetic_head(load), rows)
    try:
        fig.canvas.draw()
        for ax in fig.axes:
            containers = [c for c in ax.containers if isinstance(c, BarContainer)]
            assert len(containers) == 3 and all(c.errorbar is not None for c in containers)
            assert [t.get_text() for t in ax.get_legend().get_texts()] == ["compile", "cpp", "torch", 'picked by "auto"']
            ticks = {t.get_text() for t in ax.get_yticklabels()}
            assert {"1x", "2x"} <= ticks, ticks  # speedups 1.25 to 2.5: not only powers of 10
        footer = " ".join(t.get_text() for t in fig.texts)
        assert "20th and 80th percentile" in footer
        assert ("Other processes were running" in footer) == (load > 1)
    finally:
        plt.close(fig)


def test_every_flag_has_help_and_quick_states_one_duration():
    parser = run.build_parser()
    for action in parser._actions:
        if action.help != argparse.SUPPRESS:
            assert action.help, action.option_strings
    quick = next(a for a in parser._actions if "--quick" in a.option_strings)
    assert run.QUICK_DURATION in quick.help
    readme = (run.REPO / "benchmarks" / "README.md").read_text()
    assert f"`--quick` runs shrunk CPU shapes ({run.QUICK_DURATION}" in readme


def test_a_failing_provider_is_recorded_not_fatal(tmp_path):
    paths = run.main([*FAST, "--compile-backend", "no-such-backend", "--ops", "factorized_bilinear", "--out-dir", str(tmp_path)])
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
    assert "**Interrupted before the end" in paths["md"].read_text()
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


def test_kernels_are_named_after_their_op_in_registration_order():
    assert KERNELS == (
        "count_sketch", "signed_sqrt_l2", "compact_bilinear[vec]", "compact_bilinear[seq]", "compact_bilinear[gated]",
        "factorized_bilinear", "low_rank_fusion", "tensor_fusion",
    )
    for kernel, bench in BENCHMARKS.items():
        assert kernel.split("[")[0] == bench.op == bench.function.__name__
        assert bench.reference.__name__ == f"{bench.op}_reference"


def test_a_bracketed_kernel_name_filters_a_run(tmp_path):
    paths = run.main([*FAST, "--ops", "compact_bilinear[gated]", "--providers", "eager", "--out-dir", str(tmp_path)])
    rows = json.loads(paths["json"].read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"compact_bilinear[gated]"} and all(r["error"] is None for r in rows)
    assert "| compact_bilinear[gated] | float32 | forward | eager |" in paths["md"].read_text()


def test_only_two_modality_compact_bilinear_adds_the_gram_formulation():
    for kernel in KERNELS:
        case = ops.make_case(kernel, SHAPE_SETS["tiny"][kernel], torch.float64, CPU)
        found = ops.formulations(case)
        assert set(found) == ({"reference", "gram"} if kernel.startswith("compact_bilinear[") else {"reference"})
        reference = found["reference"](*case.args)
        for fn in found.values():  # exact up to rounding, which the signed sqrt amplifies near 0
            assert ops.rel_err((fn(*case.args),), (reference,)) < 1e-6
    three = dict(SHAPE_SETS["tiny"]["compact_bilinear[vec]"], n=(4, 5, 6))
    assert set(ops.formulations(ops.make_case("compact_bilinear[vec]", three, torch.float64, CPU))) == {"reference"}


def _declaration(**override):
    bench = BENCHMARKS["signed_sqrt_l2"]
    fields = dict(op="signed_sqrt_l2", variant="other", function=bench.function, reference=bench.reference,
                  shapes=dict(bench.shapes), build=bench.build)
    return _custom_op.Benchmark(**(fields | override))


@pytest.mark.parametrize("override, message", [
    ({"shapes": {"cuda": {"B": 2}, "cpu": {"B": 2}, "tiny": {"B": 2}}}, r"every shape set.*missing \['cpu-quick'\]"),
    ({"shapes": dict.fromkeys(("cuda", "cpu", "cpu-quick", "tiny", "huge"), {"B": 2})}, r"unknown \['huge'\]"),
    ({"shapes": {"cuda": {"B": 2}, "cpu": {"B": 2}, "cpu-quick": {"B": 2}, "tiny": {"d": 2}}}, "same size keys"),
    ({"op": "no_such_op"}, "registered op.*'no_such_op'"),
    ({"variant": "Two words"}, "variant"),
    ({"variant": None}, "'signed_sqrt_l2' is declared already"),
])
def test_a_bad_declaration_fails_at_registration(override, message):
    with pytest.raises(ValueError, match=message):
        _custom_op.declare_benchmark(_declaration(**override))
    assert tuple(b.name for b in _custom_op.benchmarks()) == KERNELS  # nothing was recorded


def test_every_shape_set_names_the_same_kernels_and_sizes():
    assert tuple(SHAPE_SETS) == ("cuda", "cpu", "cpu-quick", "tiny")
    for name, shapes in SHAPE_SETS.items():
        assert tuple(shapes) == KERNELS, name
        for kernel in KERNELS:
            assert shapes[kernel].keys() == SHAPE_SETS["cuda"][kernel].keys(), (name, kernel)


def test_design_docs_sizes_table_matches_the_declarations():
    # docs/design.md's "Reference sizes" table is prose for readers; the declarations are the
    # truth. A row's cell either spells the kernel's sizes or says "as [<variant>], ..." of a
    # variant of the same op with the same sizes.
    lines = (Path(__file__).parents[1] / "docs" / "design.md").read_text().splitlines()
    start = lines.index("| kernel | GPU set (`cuda`) | 2-core CPU set (`cpu`) |")
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        kernel, *cells = (cell.strip() for cell in line.strip("|").split("|"))
        rows[kernel.split(" (")[0]] = dict(zip(("cuda", "cpu"), cells))
    assert tuple(rows) == KERNELS
    for kernel, cells in rows.items():
        for shape_set, cell in cells.items():
            sizes = SHAPE_SETS[shape_set][kernel]
            if cell.startswith("as ["):
                other = kernel.split("[")[0] + cell[3:cell.index("]") + 1]
                assert SHAPE_SETS[shape_set][other] == sizes, (kernel, shape_set, cell)
            else:
                assert cell == ", ".join(f"{key}={value}" for key, value in sizes.items()), (kernel, shape_set)


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


def test_cpu_timing_runs_at_the_callers_thread_count():
    # torch.utils.benchmark.Timer runs at 1 thread unless told otherwise.
    seen = set()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        timing.measure({"record": lambda: seen.add(torch.get_num_threads())}, CPU, budget_s=0.01)
    finally:
        torch.set_num_threads(threads)
    assert seen == {2}


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
    float32 sums); with TF32 operands it is far less accurate (benchmarks/README.md's argument rests on
    both)."""
    from benchmarks import dft_accuracy

    x = torch.randn(12 * 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = torch.fft.fft(x)

    def error(rounding):
        return ((dft_accuracy.four_step_dft(x, 12, 10, rounding, passes=1) - exact).abs().norm() / exact.abs().norm()).item()

    assert error(lambda t: t) < 1e-6
    assert error(dft_accuracy.ROUNDINGS["tf32"]) > 1e-5
