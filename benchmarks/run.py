"""Benchmark report: every kernel x provider x mode on one device.

    python -m benchmarks.run [--device cpu|cuda] [--quick] [--ops KERNEL ...]

Writes to benchmarks/results/ (``--out-dir``):
- ``<UTC date>-<device>[-quick].json``: a header (device, versions, git commit, date,
  command, copy bandwidth, conventions) and one row per kernel, dtype, mode and provider;
- ``<UTC date>-<device>[-quick].csv``: the same rows flat, one line each, with the header's
  provenance (device, versions, commit, date, command) repeated on every line;
- ``<UTC date>-<device>[-quick].png``: median speedup over eager per kernel and backend,
  with the p20-p80 range as error bars;
- ``latest-<device>[-quick].md``: the table, at a stable path for the README;
and prints the table. A provider that fails on a shape (out of memory, a missing
compiler) gets its error string in its row; the run goes on.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

import fastfusion

from . import ops, timing
from .shapes import BENCHMARKS, KERNELS, SHAPE_SETS, shape_set_for

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"

# backend: the fastfusion backend that computed the row: the provider itself for a backend,
# the one "auto" resolved to for "fastfusion", None for eager and compile.
ROW_FIELDS = (
    "kernel", "provider", "backend", "mode", "shape", "sizes", "dtype",
    "p50_ms", "p20_ms", "p80_ms", "speedup_vs_eager", "speedup_vs_compile",
    "peak_mem_bytes", "extra_mem_bytes", "rel_err", "flops", "gflops_per_s", "bytes", "gb_per_s", "frac_copy_bw",
    "note", "error",
)
# Fields that a failed row leaves null.
MEASURED_FIELDS = ROW_FIELDS[ROW_FIELDS.index("p50_ms"):ROW_FIELDS.index("note")]
# The header's entries that every line of the CSV repeats, so that lines from several runs
# can be concatenated and still say where they come from.
CSV_PROVENANCE = (
    "device", "device_type", "cpu_count", "torch_threads", "torch", "triton", "python", "fastfusion",
    "git_commit", "date", "command", "shape_set", "copy_bandwidth_gb_per_s",
)
# How long `--quick` takes on CPU on this project's 2-core machines when nothing else runs
# (78 s measured from a fresh clone, AMD EPYC, the C++ extension already built; the first use
# builds it, about a minute more); stated in --help and benchmarks/README.md.
QUICK_DURATION = "about 80 s on 2 idle cores"

CONVENTIONS = {
    "time": "median, 20th and 80th percentiles of the per-call time; CUDA: triton.testing.do_bench "
    "(CUDA events, L2 flushed before each call); CPU: timeit (time.perf_counter) over batches of calls of "
    ">= 1 ms sized by torch.utils.benchmark's blocked_autorange after a warm-up, the providers taking turns, "
    "default thread count; torch.compile warm-up excluded",
    "peak_mem_bytes": "most memory one call holds beyond what existed before it, outputs included; "
    "CUDA: torch.cuda.max_memory_allocated; CPU: torch.profiler allocation events replayed in "
    "order (PyTorch's CPU allocator; library-internal scratch such as MKL's is not seen)",
    "extra_mem_bytes": "peak_mem_bytes minus the bytes of what the call returns (the output and, in "
    "forward+backward, every input gradient): the memory a kernel needs beyond its results",
    "rel_err": "max over the output (and in forward+backward every input gradient) of "
    "||result - ref64|| / ||ref64||, ref64 being the eager reference in float64 on the same inputs",
    "flops": "fastfusion.flops convention (2 per multiply-add; 2.5 N log2 N per real FFT of "
    "length N; 1 per scatter-added element; pointwise work 0), counted by fvcore on the "
    "reference; the backward adds 2x the contractions and 1x the transforms (adjoint math)",
    "bytes": "minimum traffic: every input read once and the output written once; "
    "forward+backward adds the output gradient read and every input gradient written",
    "frac_copy_bw": "gb_per_s / the copy bandwidth: dst.copy_(src) of 64 MiB on CPU, 256 MiB on CUDA, read + "
    "write, the faster of one measurement before and one after the kernels; above 1 when a kernel's working "
    "set fits in cache",
    "eager": "best plain PyTorch: the reference, or the fastest, measured, of the eager variants the kernel declares "
    "(named in the row's note; count_sketch: index_add, sparse_mm, dense_mm)",
    "modes": "forward runs under no_grad; forward+backward differentiates every input, parameters included",
}

DTYPES = {"cpu": ("float32",), "cuda": ("float32", "float16", "bfloat16")}
# Seconds of timing per measurement, per shape set.
BUDGETS = {"cuda": 0.1, "cpu": 1.0, "cpu-quick": 0.2, "tiny": 0.01}
COPY_BUDGET_S = 0.25


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} cores)"


def _git_commit() -> str:
    """HEAD, with "-dirty" when tracked files changed. A copy of the tree without git (as on a
    GPU machine) has none: then FASTFUSION_GIT_COMMIT, set by whoever copied it, else "unknown"."""

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        except OSError:  # no git installed
            return subprocess.CompletedProcess(args, 1, "", "")

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return os.environ.get("FASTFUSION_GIT_COMMIT") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def header(
    device: torch.device,
    shape_set: str,
    kernels: Sequence[str],
    dtypes: Sequence[str],
    providers: Sequence[str],
    command: str,
) -> dict:
    """The run's context; main adds the copy bandwidth and the final load average."""
    return {
        "device": _device_name(device),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "fastfusion": fastfusion.__version__,
        "fastfusion_backends": list(fastfusion.available_backends(device.type)),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "shape_set": shape_set,
        "shapes": {k: SHAPE_SETS[shape_set][k] for k in kernels},
        "dtypes": list(dtypes),
        "providers": list(providers),
        # Other processes on the machine skew CPU timings; this shows whether any ran.
        "load_average_1m": {"start": os.getloadavg()[0], "end": None},
        "conventions": CONVENTIONS,
    }


def _error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _prepare(run: Callable[[], tuple], oracle: tuple, device: torch.device) -> dict:
    """Warm up (compiling, for torch.compile), check against the oracle, measure memory."""
    results = run()
    err = ops.rel_err(results, oracle)
    returned = sum(t.nbytes for t in results)
    del results
    peak = timing.peak_memory(run, device)
    return {"rel_err": err, "peak_mem_bytes": peak, "extra_mem_bytes": max(0, peak - returned)}


def _measure_all(case, fns: dict[str, Callable], mode: str, grad_out, oracle, device, budget_s) -> dict[str, dict]:
    """Measured fields, or {"error": ...}, per entry of ``fns``; timed together."""
    runs = {name: ops.runner(case, fn, mode, grad_out) for name, fn in fns.items()}
    measured: dict[str, dict] = {}
    for name, run in runs.items():
        try:
            measured[name] = _prepare(run, oracle, device)
        except Exception as exc:  # a failing provider is a result, not a crash
            measured[name] = {"error": _error(exc)}
            _release(device)
    timed = timing.measure({n: r for n, r in runs.items() if "error" not in measured[n]}, device, budget_s)
    for name, t in timed.items():
        if isinstance(t, Exception):
            measured[name] = {"error": _error(t)}
        else:
            measured[name] |= {"p50_ms": t.p50_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms}
    return measured


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fastest_eager(measured: dict[str, dict], variants: Sequence[str]) -> dict:
    """The eager row: its fastest variant, the note listing all of them when there are several."""
    if len(variants) == 1:
        return measured[f"eager[{variants[0]}]"]
    ok = [v for v in variants if "error" not in measured[f"eager[{v}]"]]
    if not ok:
        return measured[f"eager[{variants[0]}]"]
    best = min(ok, key=lambda v: measured[f"eager[{v}]"]["p50_ms"])
    parts = [
        f"{v} failed ({m['error']})" if "error" in m else f"{v} {m['p50_ms']:.3g} ms"
        for v, m in ((v, measured[f"eager[{v}]"]) for v in variants)
    ]
    return measured[f"eager[{best}]"] | {"note": f"{best}, fastest of: {', '.join(parts)}"}


def _row(kernel: str, sizes: dict, dtype: str, mode: str, provider: str, measured: dict, device: torch.device) -> dict:
    if provider in ops.BASELINES:
        backend = None
    elif provider == "fastfusion":
        backend = fastfusion.selected_backend(BENCHMARKS[kernel].op, device)
    else:
        backend = provider
    base = {
        "kernel": kernel, "provider": provider, "backend": backend, "mode": mode, "shape": kernel, "sizes": sizes,
        "dtype": dtype,
    }
    return dict.fromkeys(ROW_FIELDS) | base | measured


def _case_groups(
    kernel, sizes, dtype_name, device, providers, *, budget_s, compile_backend
) -> Iterator[list[dict]]:
    """Per mode, every provider's row for one kernel at one shape and dtype."""
    try:
        case = ops.make_case(kernel, sizes, getattr(torch, dtype_name), device)
        grad_out, oracles = ops.oracle(case)
        flops = ops.flops(case)
        nbytes = ops.min_bytes(case, oracles["forward"][0])
    except Exception as exc:  # e.g. the inputs themselves do not fit: every row says so
        _release(device)
        for mode in ops.MODES:
            yield [_row(kernel, sizes, dtype_name, mode, p, {"error": _error(exc)}, device) for p in providers]
        return
    variants = list(case.eager_variants) if "eager" in providers else []
    fns = {f"eager[{v}]": fn for v, fn in ops.eager_fns(case).items() if v in variants}
    unbuilt = {}  # providers that fail before running, e.g. an unknown compile backend
    for provider in providers:
        if provider != "eager":
            try:
                fns[provider] = ops.forward_fn(case, provider, compile_backend=compile_backend)
            except Exception as exc:
                unbuilt[provider] = {"error": _error(exc)}
    for mode in ops.MODES:
        measured = _measure_all(case, fns, mode, grad_out, oracles[mode], device, budget_s) | unbuilt
        if variants:
            measured["eager"] = _fastest_eager(measured, variants)
        group = [_row(kernel, sizes, dtype_name, mode, p, measured[p], device) for p in providers]
        for row in group:
            if row["error"] is None:
                seconds = row["p50_ms"] * 1e-3
                gb_per_s = nbytes[mode] / seconds / 1e9
                row |= {
                    "flops": flops[mode],
                    # Pointwise kernels do no counted FLOPs: no rate, rather than 0.
                    "gflops_per_s": flops[mode] / seconds / 1e9 if flops[mode] else None,
                    "bytes": nbytes[mode],
                    "gb_per_s": gb_per_s,
                }
        _speedups(group)
        yield group


def run_benchmarks(
    device: torch.device,
    shape_set: str,
    kernels: Sequence[str],
    dtypes: Sequence[str],
    providers: Sequence[str],
    *,
    budget_s: float,
    compile_backend: str = "inductor",
    progress: bool = True,
) -> tuple[list[dict], bool]:
    """The rows, and whether the run was interrupted (Ctrl-C, or SIGINT from a time limit such as
    gpu_check.sh's): the rows measured by then are kept, so a run cut short still reports them."""
    from tqdm import tqdm

    rows = []
    try:
        with tqdm(total=len(kernels) * len(dtypes) * len(ops.MODES), disable=not progress, file=sys.stderr) as bar:
            for kernel in kernels:
                for dtype_name in dtypes:
                    bar.set_postfix_str(f"{kernel} {dtype_name}")
                    for group in _case_groups(
                        kernel, SHAPE_SETS[shape_set][kernel], dtype_name, device, providers,
                        budget_s=budget_s, compile_backend=compile_backend,
                    ):
                        rows += group
                        bar.update()
                    _release(device)  # this shape's tensors and compiled graphs, before the next
    except KeyboardInterrupt:
        print(f"interrupted: keeping the {len(rows)} rows measured so far", file=sys.stderr)
        return rows, True
    return rows, False


def _speedups(group: list[dict]) -> None:
    p50 = {row["provider"]: row["p50_ms"] for row in group}
    for row in group:
        for baseline in ops.BASELINES:
            if row["p50_ms"] is not None and p50.get(baseline) is not None:
                row[f"speedup_vs_{baseline}"] = p50[baseline] / row["p50_ms"]


# --- output ---------------------------------------------------------------------------

def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _sizes(sizes: dict) -> str:
    return ", ".join(f"{k}={'x'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in sizes.items())


def provider_label(row: dict) -> str:
    """The provider as the reports name it: "fastfusion" with the backend "auto" ran, e.g.
    "fastfusion (cpp)"; every other provider by its name."""
    return f"fastfusion ({row['backend']})" if row["provider"] == "fastfusion" else row["provider"]


def warnings_of(head: dict) -> list[str]:
    """What the reader must know before trusting the numbers: an interrupted run, other load."""
    found = []
    if head.get("interrupted"):  # absent from files written before runs could be interrupted
        found.append("Interrupted before the end: the rows are those measured by then.")
    # At start only: by the end the 1-minute average counts this run's own threads.
    load = head["load_average_1m"]["start"]
    if head["device_type"] == "cpu" and load > head["cpu_count"] / 2:
        found.append(
            f"Other processes were running (1-minute load average {load:.1f} on {head['cpu_count']} cores "
            "at the start): CPU timings, and the copy bandwidth, are slower and noisier than the machine's."
        )
    return found


def markdown(head: dict, rows: list[dict], data_file: str) -> str:
    load = head["load_average_1m"]
    lines = [
        f"# fastfusion benchmarks: {head['device']}",
        "",
        f"`{head['command']}` · shape set `{head['shape_set']}` · {head['date']} · commit `{head['git_commit']}` · "
        f"torch {head['torch']}, triton {head['triton']}, Python {head['python']}, {head['torch_threads']} threads · "
        f"copy bandwidth {head['copy_bandwidth_gb_per_s']:.1f} GB/s · load average {load['start']:.1f} at start, "
        f"{load['end']:.1f} at end · data: `{data_file}`",
        "",
        *(line for warning in warnings_of(head) for line in (f"**{warning}**", "")),
        "| kernel | sizes |",
        "|---|---|",
        *(f"| {k} | {_sizes(s)} |" for k, s in head["shapes"].items()),
        "",
        "| kernel | dtype | mode | provider | median ms [p20, p80] | vs eager | vs compile | peak MiB | extra MiB "
        "| rel err | GFLOP/s | GB/s | % copy BW | note |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        key = f"| {r['kernel']} | {r['dtype']} | {r['mode']} | {provider_label(r)} |"
        if r["error"] is not None:
            lines.append(key + " – |" * 9 + f" {r['error']} |")
            continue
        time = f"{r['p50_ms']:.3g} [{r['p20_ms']:.3g}, {r['p80_ms']:.3g}]"
        lines.append(
            f"{key} {time} | "
            f"{_fmt(r['speedup_vs_eager'], '.3g', 'x')} | {_fmt(r['speedup_vs_compile'], '.3g', 'x')} | "
            f"{r['peak_mem_bytes'] / 2**20:.2f} | {r['extra_mem_bytes'] / 2**20:.2f} | {r['rel_err']:.1e} | {_fmt(r['gflops_per_s'], '.3g')} | "
            f"{r['gb_per_s']:.3g} | {100 * r['frac_copy_bw']:.1f} | {r['note'] or ''} |"
        )
    lines += ["", "Conventions:", "", *(f"- {k}: {v}." for k, v in head["conventions"].items()), ""]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Bar:
    """One bar of the plot: the median speedup over eager's median, and the same ratio at the
    row's own 80th and 20th percentile times (the p20-p80 range of its time, as a speedup)."""

    speedup: float
    low: float
    high: float
    picked_by_auto: bool


def plot_bars(rows: list[dict]) -> dict[tuple[str, str, str, str], Bar]:
    """{(mode, label, kernel, dtype): Bar} for every row but eager's (the line at 1).

    One bar per backend that ran: "fastfusion" (backend "auto") computes with the backend it
    resolves to, so where that backend was also run as its own provider, the plot draws that
    provider's row once, marked as auto's pick, and not a second bar for the same code
    (the JSON, CSV and markdown keep both rows); where it was not, auto's row is drawn with
    its label "fastfusion (<backend>)". A failed row's bar is NaN (left empty)."""
    direct = {(r["mode"], r["provider"], r["kernel"], r["dtype"]) for r in rows if r["provider"] != "fastfusion"}
    bars: dict[tuple[str, str, str, str], Bar] = {}
    picks = set()
    for r in rows:
        if r["provider"] == "eager":
            continue
        auto = r["provider"] == "fastfusion"
        if auto and (r["mode"], r["backend"], r["kernel"], r["dtype"]) in direct:
            picks.add((r["mode"], r["backend"], r["kernel"], r["dtype"]))
            continue
        speedup = r["speedup_vs_eager"]
        if speedup is None:  # this row or eager's failed
            bar = Bar(math.nan, math.nan, math.nan, auto)
        else:
            bar = Bar(speedup, speedup * r["p50_ms"] / r["p80_ms"], speedup * r["p50_ms"] / r["p20_ms"], auto)
        bars[r["mode"], provider_label(r), r["kernel"], r["dtype"]] = bar
    for key in picks:
        bars[key] = dataclasses.replace(bars[key], picked_by_auto=True)
    return bars


def figure(head: dict, rows: list[dict]):
    """The plot as a matplotlib Figure: per mode, the median speedup over eager of every
    backend (plot_bars), p20-p80 error bars, and the run's warnings (warnings_of) below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    bars = plot_bars(rows)
    labels = list(dict.fromkeys(label for _, label, _, _ in bars))
    groups = list(dict.fromkeys((k, d) for _, _, k, d in bars))
    width = 0.8 / max(1, len(labels))  # an interrupted run may have no rows at all
    caption = textwrap.fill(
        "Bars: median time of eager / median time of the backend; error bars: the same ratio at the backend's "
        "20th and 80th percentile times. Hatched: the backend that fastfusion's default, backend=\"auto\", runs.", 160
    )
    warned = "\n".join(textwrap.fill(w, 160) for w in warnings_of(head))
    footer_lines = caption.count("\n") + 1 + (warned.count("\n") + 1 if warned else 0)
    footer_in = 0.15 * footer_lines + 0.15  # inches: small type is ~0.14 in a line
    size = (max(10.0, 0.5 * len(groups) * len(labels)), 9 + footer_in)
    fig, axes = plt.subplots(len(ops.MODES), 1, figsize=size, squeeze=False)
    for ax, mode in zip(axes[:, 0], ops.MODES):
        for i, label in enumerate(labels):
            drawn = [bars.get((mode, label, k, d), Bar(math.nan, math.nan, math.nan, False)) for k, d in groups]
            offset = (i - (len(labels) - 1) / 2) * width
            speedup = [b.speedup for b in drawn]
            container = ax.bar(
                [g + offset for g in range(len(groups))], speedup, width, label=label,
                yerr=[[s - b.low for s, b in zip(speedup, drawn)], [b.high - s for s, b in zip(speedup, drawn)]],
                capsize=2, error_kw={"elinewidth": 0.8},
            )
            for patch, bar in zip(container.patches, drawn):
                if bar.picked_by_auto:
                    patch.set_hatch("//")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        # 0.5, 1, 2, 5, 10, ... labelled as plain numbers, not only the powers of 10.
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.grid(axis="y", linewidth=0.3)
        ax.set_xticks(range(len(groups)), [k if len(head["dtypes"]) == 1 else f"{k}\n{d}" for k, d in groups])
        ax.set_ylabel("speedup vs eager (median)")
        ax.set_title(mode)
        if labels:
            handles = ax.get_legend_handles_labels()[0]
            if any(b.picked_by_auto for b in bars.values()):
                handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label='picked by "auto"'))
            ax.legend(handles=handles, fontsize="small")
    fig.suptitle(f"fastfusion, {head['device']}, shape set {head['shape_set']}, commit {head['git_commit'][:12]}")
    # The warnings at the bottom in red, the caption above them.
    bottom = 0.05 / size[1]
    if warned:
        fig.text(0.01, bottom, warned, ha="left", va="bottom", fontsize="small", color="firebrick")
        bottom += 0.15 * (warned.count("\n") + 1) / size[1]
    fig.text(0.01, bottom, caption, ha="left", va="bottom", fontsize="small")
    fig.tight_layout(rect=(0, footer_in / size[1], 1, 1))
    return fig


def plot(head: dict, rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(head, rows)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(head: dict, rows: list[dict], path: Path) -> None:
    """One line per row (kernel x provider x mode x dtype): ROW_FIELDS, then the header's
    CSV_PROVENANCE and its load average at the start. sizes is a JSON object; a missing
    value (a failed row's measurements, a rate without FLOPs) is an empty field."""
    provenance = {k: head[k] for k in CSV_PROVENANCE} | {"load_average_1m_start": head["load_average_1m"]["start"]}
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*ROW_FIELDS, *provenance])
        writer.writeheader()
        for row in rows:
            writer.writerow(row | {"sizes": json.dumps(row["sizes"])} | provenance)


def write_outputs(head: dict, rows: list[dict], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    device, shape_set = head["device_type"], head["shape_set"]
    suffix = device if shape_set == device else f"{device}-{shape_set.removeprefix(device + '-')}"
    stamp = head["date"].replace(":", "").replace("+0000", "Z")
    paths = {
        "json": out_dir / f"{stamp}-{suffix}.json",
        "csv": out_dir / f"{stamp}-{suffix}.csv",
        "png": out_dir / f"{stamp}-{suffix}.png",
        "md": out_dir / f"latest-{suffix}.md",
    }
    paths["json"].write_text(json.dumps({"header": head, "rows": rows}, indent=1) + "\n")
    write_csv(head, rows, paths["csv"])
    plot(head, rows, paths["png"])
    paths["md"].write_text(markdown(head, rows, paths["json"].name))
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the kernels run (default: cuda when torch sees a GPU, else cpu)")
    add("--quick", action="store_true",
        help=f"shorter timing; on CPU the shrunk cpu-quick shapes ({QUICK_DURATION}, compiling included)")
    add("--ops", nargs="+", choices=KERNELS, default=list(KERNELS), metavar="KERNEL",
        help=f"kernels to run, of {', '.join(KERNELS)} (default: all; quote bracketed names in a shell)")
    add("--dtypes", nargs="+", choices=("float32", "float16", "bfloat16"),
        help="dtypes to run (default: float32 on CPU, all 3 on CUDA)")
    add("--providers", nargs="+", metavar="PROVIDER",
        help="providers to run (default: eager, compile, fastfusion (backend \"auto\") and every available backend)")
    add("--compile-backend", default="inductor", help="torch.compile backend of the compile provider (default: inductor)")
    add("--out-dir", type=Path, default=RESULTS_DIR,
        help="folder for the JSON, CSV, PNG and latest-*.md files, created if missing (default: benchmarks/results)")
    add("--tiny", action="store_true", help=argparse.SUPPRESS)  # the harness's own test
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    device = torch.device(args.device)
    shape_set = "tiny" if args.tiny else shape_set_for(device.type, args.quick)
    dtypes = args.dtypes or DTYPES[device.type]
    available = ops.providers(device.type)
    providers = args.providers or list(available)
    if unknown := sorted(set(providers) - set(available)):
        parser.error(f"--providers: {unknown} not available on {device.type}; choose from {list(available)}")
    budget_s = BUDGETS[shape_set] * (0.5 if args.quick and device.type == "cuda" else 1)

    # Expected, and no change to what is measured: inductor leaves complex FFT products to eager.
    warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex")

    command = shlex.join(["python", "-m", "benchmarks.run", *argv])
    head = header(device, shape_set, args.ops, dtypes, providers, command)
    # Copies before and after the kernels; the faster is the device's (less disturbed) bandwidth.
    copies = [timing.copy_bandwidth(device, COPY_BUDGET_S)]
    rows, head["interrupted"] = run_benchmarks(
        device, shape_set, args.ops, dtypes, providers, budget_s=budget_s,
        compile_backend=args.compile_backend, progress=not args.tiny,
    )
    copies.append(timing.copy_bandwidth(device, COPY_BUDGET_S))
    copy_gb_per_s = max(c["gb_per_s"] for c in copies)
    for row in rows:
        if row["gb_per_s"] is not None:
            row["frac_copy_bw"] = row["gb_per_s"] / copy_gb_per_s
    head |= {
        "copy_bandwidth_bytes": copies[0]["bytes"],
        "copy_bandwidth_gb_per_s": copy_gb_per_s,
        "copy_bandwidth_runs_gb_per_s": [c["gb_per_s"] for c in copies],
    }
    head["load_average_1m"]["end"] = os.getloadavg()[0]
    paths = write_outputs(head, rows, args.out_dir)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return paths


if __name__ == "__main__":
    main()
