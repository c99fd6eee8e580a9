"""A roofline cost model of every benchmark kernel on a GPU, computed on any CPU: a MODEL, not
a measurement.

    python -m benchmarks.roofline [--gpu h100|h200|a100] [--dtypes float32 tf32 bfloat16 ...]
                                  [--ops KERNEL ...] [--measured RESULTS.json] [--out-dir DIR]

For each kernel of benchmarks/shapes.py at its GPU shape ("cuda" set), dtype and mode, it
traces what each provider does (benchmarks.trace: meta tensors standing for CUDA ones, so any
size costs nothing) and costs every kernel launch from what it touches:

- eager: every aten op the reference launches, with the bytes of its distinct inputs and
  outputs, each once (gathers and scatters by the 32-byte sectors that random indices
  touch), and its FLOPs (contractions, FFTs). For count_sketch, the cheaper of the
  scatter-add and the dense matmul (the sparse matmul has no meta kernels).
- compile: an optimistic ESTIMATE of Inductor on the same reference: every run of
  consecutive pointwise / reduction / indexing ops is one kernel that reads what the run
  did not make and writes what is used after it; contractions, FFTs, sorts and ops on
  complex tensors (which Inductor leaves to eager) are separate kernels; value checks are
  skipped, as they are while compiling.
- fastfusion: the Triton backend, which "auto" picks on CUDA: every Triton launch, with
  its real arguments, costed per autotune config it may pick (bytes: each tensor argument
  once per launch; FLOPs: its dots as the program runs them, padding and recomputation
  included, on the unit its operands and precision select), plus the cuFFT / cuBLAS /
  PyTorch ops its Python code launches. The config a perfect autotuner would pick (least
  modelled time) is used; the worst is reported beside it.
- floor: the op itself: its minimum bytes (inputs read once, outputs written once,
  benchmarks.ops.min_bytes) and the FLOPs of its cheapest exact formulation
  (benchmarks.ops.formulations), in one launch.

Time of a provider = sum over its kernels of max(bytes / bandwidth, FLOPs / peak) + launch
cost per kernel and host-to-device copy + sync cost per host sync. Assumptions, in every
output's header: datasheet peaks, each kernel at the roofline of its own bytes (perfect
L2 reuse within a launch, no wave quantisation, no occupancy or latency limits), so the
model is a lower bound for every provider alike; its error per kernel is read off when
GPU measurements exist (``--measured``).

Writes ``roofline-<gpu>.json``, ``roofline-<gpu>.md`` and ``roofline-<gpu>.png`` in the
out dir (default benchmarks/results/); with ``--measured``, also
``roofline-<gpu>-vs-<measured file stem>.md``, the model's error per kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence
from unittest import mock

import torch
import triton

from . import ops, trace
from .shapes import KERNELS, SHAPE_SETS
from .trace import AtenCall, Buffer, HostCopy, HostSync, TritonLaunch

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    bandwidth: float  # HBM bytes per second, read + write
    peaks: dict[str, float]  # FLOP/s by unit: "fp64", "fp32" (FMA), "tf32", "bf16", "fp16" (dense MMA)
    source: str
    sms: int  # streaming multiprocessors


# Datasheet numbers (dense, no sparsity), SXM boards.
GPUS = {
    "h100": GPU("NVIDIA H100 SXM5 80GB", 3.35e12,
                {"fp64": 67e12, "fp32": 67e12, "tf32": 495e12, "bf16": 989e12, "fp16": 989e12},
                "NVIDIA H100 datasheet (SXM5)", 132),
    "h200": GPU("NVIDIA H200 SXM 141GB", 4.8e12,
                {"fp64": 67e12, "fp32": 67e12, "tf32": 495e12, "bf16": 989e12, "fp16": 989e12},
                "NVIDIA H200 datasheet (SXM); same SMs and clocks as H100 SXM, faster HBM3e", 132),
    "a100": GPU("NVIDIA A100 SXM4 80GB", 2.039e12,
                {"fp64": 19.5e12, "fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
                "NVIDIA A100 datasheet (SXM4 80GB)", 108),
}
LAUNCH_S = 5e-6  # per kernel launch (and per host-to-device copy): an eager launch's cost
SYNC_S = 10e-6  # per host sync: the device drains its queue, the host reads, then launches again

ASSUMPTIONS = {
    "model": "roofline MODEL, not a measurement: per kernel max(bytes / bandwidth, FLOPs / peak of its unit), "
    "summed over the provider's kernels, plus launch and sync costs",
    "bytes": "each distinct tensor a kernel touches, once per launch (perfect L2 reuse within a launch); a strided "
    "tensor without a unit-stride dimension moves up to a 32-byte sector per element; gathers and scatters move "
    "the sectors that random indices touch, S (1 - exp(-accesses / S)) of S; in-place updates read and write",
    "flops": "2 per multiply-add; FFTs 2.5 N log2 N per real transform, 5 N log2 N per complex one, on the fp32 "
    "unit; Triton dots as the programs run them, padded to their tiles, recomputation included; pointwise work "
    "counts 0 (it is bandwidth-bound)",
    "units": "float32 products on the FMA units (torch's default allow_tf32=False; Triton's 'ieee'), TF32 only when "
    "enabled, bf16/fp16 on tensor cores at the dense peak",
    "launch_s": f"{LAUNCH_S:g} s per kernel launch or host-to-device copy",
    "sync_s": f"{SYNC_S:g} s per host sync (a read of a device value)",
    "grid": "a Triton launch of fewer programs than the GPU has SMs runs at programs / SMs of its roofline; larger "
    "grids and library kernels fill the GPU",
    "not_modelled": "wave quantisation beyond that, occupancy, latency, L2 misses of re-read operands, register spills "
    "(see benchmarks.compile_report), the CPU cost of Python dispatch and of Triton's launcher",
    "compile": "an optimistic ESTIMATE of Inductor: pointwise/reduction/indexing chains fused into one kernel, "
    "contractions, FFTs, sorts and complex-valued ops separate",
    "autotune": "fastfusion uses the config of least modelled time; worst_ms is the worst config's",
    "floor": "the op's minimum traffic (benchmarks.ops.min_bytes: every input read once, the output and every input "
    "gradient written once) and the contraction and FFT FLOPs of its cheapest exact formulation (benchmarks.ops."
    "formulations: for compact bilinear pooling of two modalities, the FFT reference or the Gram identity), in one "
    "launch; a provider whose gathers read only part of a tensor can come in under it",
}

_DOT_UNIT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def _unit(dtype: torch.dtype, precision: str = "ieee") -> str:
    if dtype == torch.float32:
        return "tf32" if precision in ("tf32", "tf32x3") else "fp32"
    return _DOT_UNIT.get(dtype, "fp32")


@dataclasses.dataclass
class Cost:
    """One kernel launch, costed."""

    name: str
    bytes: int
    flops: dict[str, int]  # by unit
    config: str | None = None
    candidates: int = 1  # configs it was chosen among
    programs: int | None = None  # a Triton launch's grid size; None: a library kernel, assumed to fill the GPU

    def seconds(self, gpu: GPU) -> float:
        roofline = max(self.bytes / gpu.bandwidth, sum(f / gpu.peaks[u] for u, f in self.flops.items()))
        # A grid of fewer programs than SMs leaves the others idle: it runs at programs / SMs of
        # the roofline (ASSUMPTIONS["grid"]).
        return roofline / min(1.0, self.programs / gpu.sms) if self.programs else roofline

    def bound(self, gpu: GPU) -> str:
        compute = sum(f / gpu.peaks[u] for u, f in self.flops.items())
        return "compute" if compute > self.bytes / gpu.bandwidth else "memory"


# --- aten ops ----------------------------------------------------------------------------

_GATHERS = {torch.ops.aten.index_select, torch.ops.aten.index, torch.ops.aten.gather}
_SCATTERS = {torch.ops.aten.index_add, torch.ops.aten.index_add_, torch.ops.aten.scatter_add,
             torch.ops.aten.scatter_add_, torch.ops.aten.index_put, torch.ops.aten.index_put_}


def _sectors_touched(nbytes: int, accesses: int) -> int:
    """Bytes of the 32-byte sectors that ``accesses`` uniformly random elements touch."""
    sectors = max(1, nbytes // 32)
    return round(32 * sectors * -math.expm1(-accesses / sectors))


def _distinct(buffers: Iterable[Buffer]) -> dict[int, int]:
    by_storage: dict[int, int] = {}
    for b in buffers:
        by_storage[b.storage] = max(by_storage.get(b.storage, 0), b.nbytes)
    return by_storage


def _traffic(call: AtenCall) -> tuple[dict[int, int], dict[int, int]]:
    """Bytes an aten op reads and writes, by storage."""
    reads, writes = _distinct(call.reads), _distinct(call.writes)
    packet = call.op.overloadpacket
    if packet in _GATHERS and call.reads:  # the indexed source is the first argument
        source = call.reads[0]
        reads[source.storage] = _sectors_touched(source.nbytes, call.writes[0].numel)
    if packet in _SCATTERS and call.writes:  # the target is read and written where indices land
        target = call.writes[0]
        reads[target.storage] = writes[target.storage] = _sectors_touched(target.nbytes, call.reads[-1].numel)
    return reads, writes


def aten_cost(call: AtenCall) -> Cost:
    reads, writes = _traffic(call)
    flops = {}
    if call.flops:
        dtype = call.reads[0].dtype
        if dtype in (torch.float64, torch.complex128):
            unit = "fp64"
        elif call.kind == "fft" or dtype.is_complex:
            unit = "fp32"
        else:
            unit = _unit(dtype, _matmul_precision())
        flops = {unit: call.flops}
    return Cost(call.name, sum(reads.values()) + sum(writes.values()), flops)


def _matmul_precision() -> str:
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


# --- Triton launches -------------------------------------------------------------------

def _config_name(config: triton.Config | None) -> str | None:
    if config is None:
        return None
    sizes = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{sizes},warps={config.num_warps},stages={config.num_stages}"


def _dot_flops(launch: TritonLaunch, constexprs: dict, programs: int) -> dict[str, int]:
    """The FLOPs of a launch's dots by unit, from the formula declared beside its kernel
    (fastfusion.triton_backend._common.dot_flops: FLOPs by dot-operand pointer, whose dtype
    and PRECISION select the unit)."""
    formula = getattr(launch.fn, "dot_flops", None)
    if formula is None:
        source = Path(inspect.getsourcefile(launch.fn.fn)).resolve()
        where = source.relative_to(REPO) if source.is_relative_to(REPO) else source
        raise KeyError(
            f"no FLOP formula for Triton kernel {launch.kernel}: declare one beside it in {where} "
            "(@dot_flops(formula), or @dot_flops(no_dots) for a kernel without tl.dot)"
        )
    flops: dict[str, int] = {}
    # A "tf32x3" dot is three TF32 MMAs (a_hi b_hi + a_hi b_lo + a_lo b_hi, Triton's split of
    # each float32 operand into two TF32 parts): the formulas count one product, the tensor
    # cores run three.
    passes = 3 if constexprs.get("PRECISION") == "tf32x3" else 1
    for pointer, count in formula(launch.args, constexprs, programs).items():
        unit = _unit(launch.args[pointer].dtype, constexprs["PRECISION"])
        flops[unit] = flops.get(unit, 0) + passes * count
    return flops


def triton_costs(launch: TritonLaunch) -> list[Cost]:
    """One Cost per config the launch may run with."""
    nbytes = sum(_distinct(v for v in launch.args.values() if isinstance(v, Buffer)).values())
    costs = []
    for config, grid in zip(launch.configs, launch.grids):
        constexprs = {k: v for k, v in launch.args.items() if not isinstance(v, Buffer)}
        constexprs |= config.kwargs if config else {}
        flops = _dot_flops(launch, constexprs, math.prod(grid))
        costs.append(Cost(launch.kernel, nbytes, flops, _config_name(config), programs=math.prod(grid)))
    return costs


# --- providers --------------------------------------------------------------------------

@dataclasses.dataclass
class Estimate:
    """A provider's modelled cost for one call."""

    kernels: list[Cost]
    syncs: int
    host_copies: int
    extra_bytes: int | None
    worst_s: float | None = None  # fastfusion: every launch at its worst config
    variant: str | None = None

    def seconds(self, gpu: GPU) -> float:
        overhead = (len(self.kernels) + self.host_copies) * LAUNCH_S + self.syncs * SYNC_S
        return sum(k.seconds(gpu) for k in self.kernels) + overhead

    @property
    def bytes(self) -> int:
        return sum(k.bytes for k in self.kernels)

    @property
    def flops(self) -> int:
        return sum(sum(k.flops.values()) for k in self.kernels)


def _counts(events) -> tuple[int, int]:
    return sum(isinstance(e, HostSync) for e in events), sum(isinstance(e, HostCopy) for e in events)


def eager_estimate(t: trace.Trace, gpu: GPU) -> Estimate:
    syncs, copies = _counts(t.events)
    kernels = [aten_cost(e) for e in t.events if isinstance(e, AtenCall) and e.launches]
    return Estimate(kernels, syncs, copies, t.extra_bytes)


def _fusible(call: AtenCall) -> bool:
    """Whether Inductor would generate this op into a fused kernel."""
    complex_data = any(b.dtype.is_complex for b in call.reads + call.writes)
    extern = call.kind is not None or call.op.overloadpacket in (torch.ops.aten.sort, torch.ops.aten.argsort)
    return not (complex_data or extern)


def compile_estimate(t: trace.Trace, gpu: GPU) -> Estimate:
    calls = [e for e in t.events if isinstance(e, AtenCall) and e.launches]
    kernels: list[Cost] = []
    i = 0
    while i < len(calls):
        if not _fusible(calls[i]):
            kernels.append(aten_cost(calls[i]))
            i += 1
            continue
        j = i
        while j < len(calls) and _fusible(calls[j]):
            j += 1
        group = calls[i:j]
        made: set[int] = set()
        reads: dict[int, int] = {}
        for call in group:
            for storage, n in _traffic(call)[0].items():
                if storage not in made:
                    reads[storage] = max(reads.get(storage, 0), n)
            made |= {b.storage for b in call.writes}
        used_later = {b.storage for c in calls[j:] for b in c.reads} | t.returned
        writes = {s: n for s, n in _distinct(b for c in group for b in c.writes).items() if s in used_later}
        name = "fused: " + " ".join(dict.fromkeys(c.name.removeprefix("aten.") for c in group))
        kernels.append(Cost(name, sum(reads.values()) + sum(writes.values()), {}))
        i = j
    return Estimate(kernels, 0, 0, None)


def fastfusion_estimate(t: trace.Trace, gpu: GPU) -> Estimate:
    syncs, copies = _counts(t.events)
    best, worst = [], []
    for e in t.events:
        if isinstance(e, AtenCall) and e.launches:
            best.append(aten_cost(e))
            worst.append(best[-1])
        elif isinstance(e, TritonLaunch):
            costs = triton_costs(e)
            best.append(dataclasses.replace(min(costs, key=lambda c: c.seconds(gpu)), candidates=len(costs)))
            worst.append(max(costs, key=lambda c: c.seconds(gpu)))
    estimate = Estimate(best, syncs, copies, t.extra_bytes)
    estimate.worst_s = Estimate(worst, syncs, copies, None).seconds(gpu)
    return estimate


def floor_estimate(case: ops.Case, output: torch.Tensor, eager_forward: trace.Trace, mode: str) -> Estimate:
    """The op's minimum bytes and FLOPs in one launch (benchmarks.ops conventions)."""
    nbytes = ops.min_bytes(case, output)[mode]
    # Contractions on the inputs' own unit: a formulation that widens half inputs to float32
    # first (the Gram identity does) could multiply them on tensor cores just as exactly.
    input_unit = _unit(case.args[0].dtype, _matmul_precision())
    contractions: dict[str, int] = {}
    for e in eager_forward.events:
        if isinstance(e, AtenCall) and e.flops:
            cost = aten_cost(e)
            # The backward of a contraction is two of the same size, of a transform one.
            times = 1 if mode == "forward" else (3 if e.kind == "contraction" else 2)
            for unit, f in cost.flops.items():
                unit = input_unit if e.kind == "contraction" else unit
                contractions[unit] = contractions.get(unit, 0) + times * f
    return Estimate([Cost("floor", nbytes, contractions)], 0, 0, None)


@contextlib.contextmanager
def _as_dynamo_traces() -> Iterator[None]:
    # What Dynamo traces of the reference: value checks skip themselves while compiling.
    with mock.patch("torch.compiler.is_compiling", return_value=True):
        yield


def model_case(kernel: str, sizes: dict, dtype: torch.dtype, gpu: GPU, label: str | None = None) -> list[dict]:
    """Rows for one kernel, shape and dtype: per mode, floor, eager, compile and fastfusion;
    ``label`` names the dtype in the rows (default: the dtype's name)."""
    case, grad_out = trace.meta_case(kernel, sizes, dtype)
    rows = []
    for mode in ops.MODES:
        eager_traces = {v: trace.trace_call(fn, case, mode, grad_out) for v, fn in ops.eager_fns(case).items()}
        eager = {v: eager_estimate(t, gpu) for v, t in eager_traces.items()}
        best = min(eager, key=lambda v: eager[v].seconds(gpu))
        eager[best].variant = best if len(eager) > 1 else None
        with _as_dynamo_traces():
            compiled = compile_estimate(trace.trace_call(case.bind(case.reference), case, mode, grad_out), gpu)
        triton_fn = trace.provider_fns(case, "fastfusion")["triton"]
        fused = fastfusion_estimate(trace.trace_call(triton_fn, case, mode, grad_out), gpu)
        floor = min(
            (floor_estimate(case, grad_out, trace.trace_call(fn, case, "forward", grad_out), mode)
             for fn in ops.formulations(case).values()),
            key=lambda est: est.seconds(gpu),
        )
        estimates = {"floor": floor, "eager": eager[best], "compile": compiled, "fastfusion": fused}
        eager_s, compile_s = eager[best].seconds(gpu), compiled.seconds(gpu)
        for provider, est in estimates.items():
            s = est.seconds(gpu)
            rows.append({
                "kernel": kernel, "dtype": label or str(dtype).removeprefix("torch."), "mode": mode, "provider": provider,
                "sizes": sizes, "launches": len(est.kernels), "syncs": est.syncs, "host_copies": est.host_copies,
                "bytes": est.bytes, "flops": est.flops, "model_ms": s * 1e3,
                "worst_ms": None if est.worst_s is None else est.worst_s * 1e3,
                "vs_eager": eager_s / s, "vs_compile": compile_s / s,
                "extra_mem_bytes": est.extra_bytes, "note": _note(provider, est),
                "kernels": [
                    {"name": k.name, "config": k.config, "candidates": k.candidates, "bytes": k.bytes,
                     "flops": k.flops, "ms": k.seconds(gpu) * 1e3, "bound": k.bound(gpu)}
                    for k in est.kernels
                ],
            })
    return rows


def _note(provider: str, est: Estimate) -> str | None:
    if provider == "eager" and est.variant:
        return f"eager variant: {est.variant}"
    if provider == "compile":
        return "estimate (Inductor fusion assumed)"
    return None


# --dtypes: "tf32" is float32 with torch.backends.cuda.matmul.allow_tf32 set, which PyTorch's
# matmuls, fastfusion's Triton dots and its algorithm choice all follow.
DTYPES = ("float32", "tf32", "float16", "bfloat16")


@contextlib.contextmanager
def _allow_tf32(allowed: bool):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def run_model(gpu: GPU, kernels: Sequence[str], dtypes: Sequence[str]) -> list[dict]:
    """Rows for every kernel and dtype name of DTYPES."""
    rows = []
    for kernel in kernels:
        for name in dtypes:
            with _allow_tf32(name == "tf32"):
                dtype = torch.float32 if name == "tf32" else getattr(torch, name)
                rows += model_case(kernel, SHAPE_SETS["cuda"][kernel], dtype, gpu, label=name)
    return rows


# --- output -----------------------------------------------------------------------------

def header(gpu_key: str, kernels: Sequence[str], dtypes: Sequence[str], command: str) -> dict:
    from .run import _git_commit

    gpu = GPUS[gpu_key]
    return {
        "what": "roofline cost MODEL (not measured)",
        "gpu": gpu_key, "gpu_name": gpu.name, "bandwidth_bytes_per_s": gpu.bandwidth, "peak_flops": gpu.peaks,
        "sms": gpu.sms,
        "peaks_source": gpu.source, "assumptions": ASSUMPTIONS,
        "torch": torch.__version__, "triton": triton.__version__, "git_commit": _git_commit(), "command": command,
        "shape_set": "cuda", "shapes": {k: SHAPE_SETS["cuda"][k] for k in kernels}, "dtypes": list(dtypes),
    }


def _fmt(v, spec: str, suffix: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{suffix}"


def markdown(head: dict, rows: list[dict], data_file: str) -> str:
    peaks = ", ".join(f"{u} {p / 1e12:g}" for u, p in head["peak_flops"].items())
    lines = [
        f"# fastfusion roofline MODEL: {head['gpu_name']} (not measured)",
        "",
        f"`{head['command']}` · commit `{head['git_commit']}` · torch {head['torch']}, triton {head['triton']} · "
        f"HBM {head['bandwidth_bytes_per_s'] / 1e12:g} TB/s · {head['sms']} SMs · peak TFLOP/s: {peaks} "
        f"({head['peaks_source']}) · "
        f"data: `{data_file}`",
        "",
        "Assumptions:",
        "",
        *(f"- {k}: {v}." for k, v in head["assumptions"].items()),
        "",
        *summary(rows),
        "",
        "All providers:",
        "",
        "| kernel | dtype | mode | provider | launches | syncs | H2D | GB | GFLOP | model ms | worst-config ms "
        "| vs eager | vs compile | extra MiB | note |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        extra = None if r["extra_mem_bytes"] is None else r["extra_mem_bytes"] / 2**20
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {r['mode']} | {r['provider']} | {r['launches']} | {r['syncs']} | "
            f"{r['host_copies']} | {r['bytes'] / 1e9:.3g} | {r['flops'] / 1e9:.4g} | {r['model_ms']:.3g} | "
            f"{_fmt(r['worst_ms'], '.3g')} | {r['vs_eager']:.2f}x | {r['vs_compile']:.2f}x | {_fmt(extra, '.0f')} | "
            f"{r['note'] or ''} |"
        )
    lines += [
        "", "fastfusion's launches (best config), per kernel, dtype and mode:", "",
        "| kernel | dtype | mode | launch | config | GB | GFLOP | model ms | bound |",
        "|---|---|---|---|---|--:|--:|--:|---|",
    ]
    for r in rows:
        if r["provider"] != "fastfusion":
            continue
        for k in r["kernels"]:
            lines.append(
                f"| {r['kernel']} | {r['dtype']} | {r['mode']} | {k['name']} | {k['config'] or ''} | "
                f"{k['bytes'] / 1e9:.3g} | {sum(k['flops'].values()) / 1e9:.4g} | {k['ms']:.3g} | {k['bound']} |"
            )
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> list[str]:
    """Modelled milliseconds per provider, one line per kernel, dtype and mode."""
    lines = [
        "| kernel | dtype | mode | eager ms | compile ms (estimate) | fastfusion ms | floor ms | fastfusion vs eager "
        "| vs compile | fastfusion launches / syncs / H2D |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["dtype"], r["mode"]), {})[r["provider"]] = r
    for (kernel, dtype, mode), g in groups.items():
        ff = g["fastfusion"]
        lines.append(
            f"| {kernel} | {dtype} | {mode} | {g['eager']['model_ms']:.3g} | {g['compile']['model_ms']:.3g} | "
            f"{ff['model_ms']:.3g} | {g['floor']['model_ms']:.3g} | {ff['vs_eager']:.2f}x | {ff['vs_compile']:.2f}x | "
            f"{ff['launches']} / {ff['syncs']} / {ff['host_copies']} |"
        )
    return lines


def plot(head: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    providers = ("compile", "fastfusion", "floor")
    groups = list(dict.fromkeys((r["kernel"], r["dtype"]) for r in rows))
    width = 0.8 / len(providers)
    size = (max(8.0, 0.6 * len(groups) * len(providers)), 9)
    fig, axes = plt.subplots(len(ops.MODES), 1, figsize=size, squeeze=False)
    for ax, mode in zip(axes[:, 0], ops.MODES):
        speedup = {(r["kernel"], r["dtype"], r["provider"]): r["vs_eager"] for r in rows if r["mode"] == mode}
        for i, provider in enumerate(providers):
            values = [speedup.get((k, d, provider), math.nan) for k, d in groups]
            offset = (i - (len(providers) - 1) / 2) * width
            label = provider + (" (estimate)" if provider == "compile" else "")
            ax.bar([g + offset for g in range(len(groups))], values, width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(groups)), [f"{k}\n{d}" for k, d in groups], fontsize="small")
        ax.set_ylabel("modelled speedup vs eager")
        ax.set_title(mode)
        ax.legend(fontsize="small")
    fig.suptitle(f"roofline MODEL (not measured), {head['gpu_name']}, commit {head['git_commit'][:12]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(rows: list[dict], measured: dict) -> list[dict]:
    """The model's error per kernel: modelled / measured median time, for every row of a
    benchmarks.run result at the same sizes. fastfusion's measured row is its "triton" or
    "fastfusion" provider (auto picks Triton on CUDA)."""
    by_key = {}
    for m in measured["rows"]:
        if m.get("p50_ms") is None:
            continue
        provider = "fastfusion" if m["provider"] in ("fastfusion", "triton") else m["provider"]
        by_key.setdefault((m["kernel"], m["dtype"], m["mode"], provider, json.dumps(m["sizes"])), m)
    out = []
    for r in rows:
        m = by_key.get((r["kernel"], r["dtype"], r["mode"], r["provider"], json.dumps(r["sizes"])))
        if m is not None:
            out.append({
                "kernel": r["kernel"], "dtype": r["dtype"], "mode": r["mode"], "provider": r["provider"],
                "model_ms": r["model_ms"], "measured_ms": m["p50_ms"],
                "model_over_measured": r["model_ms"] / m["p50_ms"],
            })
    return out


def comparison_markdown(head: dict, measured: dict, comparison: list[dict], measured_file: str) -> str:
    mh = measured["header"]
    lines = [
        f"# Roofline model vs measurement: {mh['device']}",
        "",
        f"Model: {head['gpu_name']} datasheet, commit `{head['git_commit']}`. Measured: `{measured_file}`, "
        f"commit `{mh.get('git_commit')}`, torch {mh.get('torch')}, triton {mh.get('triton')}, {mh.get('date')}.",
        "model / measured below 1: the kernel runs slower than the model says (the model is a lower bound).",
        "",
        "| kernel | dtype | mode | provider | model ms | measured ms | model / measured |",
        "|---|---|---|---|--:|--:|--:|",
    ]
    for c in comparison:
        lines.append(f"| {c['kernel']} | {c['dtype']} | {c['mode']} | {c['provider']} | {c['model_ms']:.3g} | "
                     f"{c['measured_ms']:.3g} | {c['model_over_measured']:.2f} |")
    return "\n".join(lines) + "\n"


def _gpu_from_device_name(name: str) -> str | None:
    lowered = name.lower()
    return next((key for key in GPUS if key in lowered), None)


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--gpu", choices=sorted(GPUS), help="default: the --measured run's GPU, else h100")
    add("--dtypes", "--dtype", nargs="+", choices=DTYPES, default=["float32", "tf32", "bfloat16"])
    add("--ops", nargs="+", choices=KERNELS, default=list(KERNELS), metavar="KERNEL", help=f"of {', '.join(KERNELS)}")
    add("--measured", type=Path, help="a benchmarks.run JSON from a GPU: report the model's error per kernel")
    add("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    measured = None
    if args.measured is not None:
        try:
            measured = json.loads(args.measured.read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"--measured: cannot read {args.measured}: {exc}")
    gpu_key = args.gpu or (measured and _gpu_from_device_name(measured["header"]["device"])) or "h100"
    command = shlex.join(["python", "-m", "benchmarks.roofline", *argv])
    head = header(gpu_key, args.ops, args.dtypes, command)
    rows = run_model(GPUS[gpu_key], args.ops, args.dtypes)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"roofline-{gpu_key}"
    paths = {suffix: args.out_dir / f"{stem}.{suffix}" for suffix in ("json", "md", "png")}
    paths["json"].write_text(json.dumps({"header": head, "rows": rows}, indent=1) + "\n")
    paths["md"].write_text(markdown(head, rows, paths["json"].name))
    plot(head, rows, paths["png"])
    text = paths["md"].read_text()
    if measured is not None:
        comparison = compare(rows, measured)
        paths["vs"] = args.out_dir / f"{stem}-vs-{args.measured.stem}.md"
        paths["vs"].write_text(comparison_markdown(head, measured, comparison, args.measured.name))
        text = paths["vs"].read_text()
    print(text)
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return paths


if __name__ == "__main__":
    main()
