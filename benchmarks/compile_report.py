"""Compile every Triton kernel the benchmarks launch for a GPU, on the CPU, and report what
the compiler made of it: registers, spills, shared memory and the instructions its dots
became.

    python -m benchmarks.compile_report [--arch 90 80] [--dtypes float32 bfloat16 float16]
                                        [--ops KERNEL ...] [--modes MODE ...] [--out-dir DIR] [--jobs N]

For each kernel of benchmarks/shapes.py at its GPU shape ("cuda" set), dtype and mode, the
fastfusion provider is traced (benchmarks.trace: meta tensors standing for CUDA tensors),
and every Triton launch is compiled with ``triton.compile`` for ``GPUTarget("cuda", arch,
32)``, once per config of the autotuner's whole list (those its prune function drops too,
flagged), specialised as Triton's launcher would specialise that launch: the launcher's
own binder reads the real arguments (pointer dtypes; ints equal to 1 become constants,
multiples of 16 get a divisibility hint; a tensor is 16-byte aligned when its storage
offset in bytes is, as PyTorch's CUDA allocations are 512-byte aligned), plus the
constexprs and the config's block sizes, warps and stages. Identical builds (same kernel,
specialisation and options) are compiled once.

Per build: registers per thread, spill stores / loads and stack frame in bytes per thread
(ptxas' own report of the cubin it made), shared memory per program (Triton's
allocation, which the launch requests), the MMA kind of its dots as Triton lowered them
(``wgmma``: Hopper warp-group MMA; ``mma.sync``: Ampere-style warp MMA; ``fma``: no tensor
cores, e.g. float32 operands at IEEE precision; ``none``: no dot), and the compile time.

Writes ``compile-report.json`` and ``compile-report.md`` in the out dir (default
benchmarks/results/), then prints a summary. Must run without ``TRITON_INTERPRET=1``: under
the interpreter ``triton.jit`` makes no compilable function and fastfusion keeps only the
first autotune config.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import importlib
import io
import itertools
import json
import multiprocessing
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas_version
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from . import ops, trace
from .run import _git_commit
from .shapes import KERNELS, SHAPE_SETS

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
STEM = "compile-report"
DTYPES = ("float32", "bfloat16", "float16")
ARCHS = (90, 80)
# Most dynamic shared memory one program may request: H100/H200 (sm_90), A100 (sm_80).
SHARED_MEMORY_LIMITS = {90: 227 * 1024, 80: 163 * 1024}
# PyTorch's CUDA caching allocator hands out 512-byte aligned blocks.
_ALLOCATION_ALIGNMENT = 512
MMA_KINDS = ("wgmma", "mma.sync", "fma")


class _DeviceTensor:
    """What Triton's launcher reads of a tensor argument to specialise on it: its dtype and
    its address, here that of the Buffer's element 0 in a fresh allocation."""

    def __init__(self, buffer: trace.Buffer):
        self.dtype = buffer.dtype
        self._address = _ALLOCATION_ALIGNMENT + buffer.storage_offset * buffer.dtype.itemsize

    def data_ptr(self) -> int:
        return self._address


@dataclasses.dataclass
class Build:
    """One distinct compilation, and every launch of the traced cases it serves."""

    kernel: str  # trace.TritonLaunch.kernel, e.g. "tensor_fusion._grad_input_kernel"
    fn: JITFunction
    arch: int
    config: triton.Config | None  # None: not autotuned
    config_index: int  # its place in the autotuner's list
    options: dict[str, Any]  # Triton's parsed compile options (num_warps, num_stages, ...)
    signature: dict[str, str]
    constexprs: dict
    attrs: dict
    specialisation: dict[str, tuple]  # argument name -> (type, value or alignment hint), as the binder gives
    pickable: bool = False  # the autotuner may pick it at some launch it serves (it survived the prune)
    dtypes: set[str] = dataclasses.field(default_factory=set)  # of the benchmark cases launching it
    uses: set[tuple[str, str]] = dataclasses.field(default_factory=set)  # (benchmark kernel, mode)


def _specialise(launch: trace.TritonLaunch, config: triton.Config | None, backend) -> tuple:
    """(specialisation, options, signature, constexprs, attrs) of ``launch`` run with
    ``config``, computed by Triton's own binder and argument packing, as JITFunction.run
    does before compiling (``_pack_args`` is private, and the same in Triton 3.6 and 3.9;
    run() would take the current device's target, which needs a driver)."""
    fn = launch.fn
    kwargs = {name: _DeviceTensor(v) if isinstance(v, trace.Buffer) else v for name, v in launch.args.items()}
    kwargs |= config.all_kwargs() if config else {}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialisation, options = binder(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialisation, options)
    return dict(zip(fn.arg_names, specialisation)), options, signature, constexprs, attrs


def collect_builds(
    kernels: Sequence[str], dtypes: Sequence[str], modes: Sequence[str], archs: Sequence[int],
) -> list[Build]:
    """Every distinct build of every config of every Triton launch the fastfusion provider
    makes in the given cases."""
    backends = {arch: make_backend(GPUTarget("cuda", arch, 32)) for arch in archs}
    builds: dict[tuple, Build] = {}
    for kernel in kernels:
        for dtype in dtypes:
            case, grad_out = trace.meta_case(kernel, SHAPE_SETS["cuda"][kernel], getattr(torch, dtype))
            fn = trace.provider_fns(case, "fastfusion")["triton"]
            for mode in modes:
                launches = [e for e in trace.trace_call(fn, case, mode, grad_out).events
                            if isinstance(e, trace.TritonLaunch)]
                for launch, arch in itertools.product(launches, archs):
                    for index, config in enumerate(launch.all_configs):
                        spec, options, signature, constexprs, attrs = _specialise(launch, config, backends[arch])
                        key = (launch.kernel, arch, repr(spec), repr(sorted(options.__dict__.items())))
                        build = builds.setdefault(key, Build(
                            launch.kernel, launch.fn, arch, config, index, options.__dict__,
                            signature, constexprs, attrs, spec,
                        ))
                        build.pickable |= config in launch.configs
                        build.dtypes.add(dtype)
                        build.uses.add((kernel, mode))
    return list(builds.values())


# --- compiling --------------------------------------------------------------------------

_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_TTGIR_ALIAS = re.compile(r"^(#[\w.]+) = (.*)$", re.MULTILINE)
_TTGIR_DOT_RESULT = re.compile(r"= (tt\.dot|ttng\.warp_group_dot) .*-> tensor<[^,>]*, ([^>]+)>")


def mma_kinds(ttgir: str) -> list[str]:
    """The kind of each dot of a TTGIR module, in order: a warp-group dot is wgmma; a tt.dot
    is mma.sync when its result has an MMA layout (version 2), else FMA (no tensor cores)."""
    aliases = dict(_TTGIR_ALIAS.findall(ttgir))
    kinds = []
    for op, encoding in _TTGIR_DOT_RESULT.findall(ttgir):
        layout = aliases.get(encoding.strip(), encoding)
        if op == "ttng.warp_group_dot" or "versionMajor = 3" in layout:
            kinds.append("wgmma")
        elif "nvidia_mma" in layout:
            kinds.append("mma.sync")
        else:
            kinds.append("fma")
    return kinds


def _jit_function(module: str, qualname: str) -> JITFunction:
    fn = getattr(importlib.import_module(module), qualname)
    while not isinstance(fn, JITFunction):  # an Autotuner (or heuristics) around it
        fn = fn.fn
    return fn


def _compile(job: tuple) -> dict:
    """Compile one build in a fresh cache (so it really compiles, and leaves nothing behind)
    and read its resources; ``job`` is picklable, for worker processes."""
    module, qualname, arch, signature, constexprs, attrs, options = job
    fn = _jit_function(module, qualname)
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as cache, knobs.cache.scope(), knobs.nvidia.scope(), \
            contextlib.redirect_stdout(log):
        knobs.cache.dir = cache
        knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's report, which has the spills
        start = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", arch, 32), options=options)
        except Exception as exc:  # reported per build: one failing config must not hide the others
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        seconds = time.perf_counter() - start
    report = log.getvalue()
    registers, spills = _PTXAS_REGISTERS.search(report), _PTXAS_SPILLS.search(report)
    if registers is None or spills is None:
        raise RuntimeError(f"no ptxas resource report in Triton's output for {qualname}:\n{report}")
    stack, stores, loads = map(int, spills.groups())
    kinds = mma_kinds(compiled.asm["ttgir"])
    return {
        "registers": int(registers.group(1)), "spill_stores": stores, "spill_loads": loads, "stack_frame": stack,
        "shared": compiled.metadata.shared,
        "mma": "+".join(k for k in MMA_KINDS if k in kinds) or "none", "dots": kinds,
        "compile_s": round(seconds, 2),
    }


def compile_builds(builds: Sequence[Build], jobs: int) -> list[dict]:
    jobs_ = [
        (b.fn.fn.__module__, b.fn.fn.__qualname__, b.arch, b.signature, b.constexprs, b.attrs, b.options)
        for b in builds
    ]
    if jobs <= 1:
        return list(map(_compile, jobs_))
    # spawn: a fresh interpreter per worker, not a fork of this one's torch and Triton state
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile, jobs_))


# --- rows -------------------------------------------------------------------------------

def _config_text(build: Build) -> str:
    tuned = " ".join(f"{k}={v}" for k, v in build.config.kwargs.items()) if build.config else "not autotuned"
    return f"{tuned}, warps={build.options['num_warps']}, stages={build.options['num_stages']}"


def _spec_text(name: str, entry: tuple) -> str:
    kind, value = entry
    if kind == "constexpr":
        return f"{name}={value}"
    hint = {"D": " %16", "": ""}.get(value, "") if isinstance(value, str) else ""
    return f"{name}:{kind}{hint}"


def _variants(builds: Sequence[Build]) -> dict[int, str]:
    """By build id: the specialised arguments in which it differs from the other builds of the
    same kernel, arch, config and case dtypes (e.g. a flag, a pointer's dtype, an int that is
    1 in one launch and not in another); "" when it is the only one."""
    groups = collections.defaultdict(list)
    for b in builds:
        groups[(b.kernel, b.arch, _config_text(b), tuple(sorted(b.dtypes)))].append(b)
    variants = {}
    for group in groups.values():
        differing = [name for name in group[0].specialisation
                     if len({repr(b.specialisation[name]) for b in group}) > 1]
        for b in group:
            variants[id(b)] = ", ".join(_spec_text(name, b.specialisation[name]) for name in differing)
    return variants


def make_rows(builds: Sequence[Build], results: Sequence[dict]) -> list[dict]:
    variants = _variants(builds)
    rows = []
    for b, result in zip(builds, results):
        shared = result.get("shared")
        rows.append({
            "kernel": b.kernel, "arch": f"sm_{b.arch}", "dtypes": [d for d in DTYPES if d in b.dtypes],
            "config": _config_text(b), "config_index": b.config_index, "pickable": b.pickable,
            "variant": variants[id(b)],
            # The dots' input precision where the kernel takes one ("ieee", "tf32", "tf32x3").
            "precision": b.specialisation["PRECISION"][1] if "PRECISION" in b.specialisation else None,
            "uses": [f"{k} {m}" for k, m in sorted(b.uses, key=lambda u: (KERNELS.index(u[0]), ops.MODES.index(u[1])))],
            **result,
            "spills": bool(result.get("spill_stores") or result.get("spill_loads")),
            "shared_over_limit": shared is not None and shared > SHARED_MEMORY_LIMITS[b.arch],
        })
    rows.sort(key=lambda r: (r["kernel"], -int(r["arch"][3:]), [DTYPES.index(d) for d in r["dtypes"]],
                             r["variant"], r["config_index"]))
    return rows


def problems(rows: Sequence[dict]) -> list[dict]:
    """Builds of configs the autotuner may pick that spill registers, request more shared
    memory than the arch has, or do not compile."""
    return [r for r in rows if r["pickable"] and (r["spills"] or r["shared_over_limit"] or "error" in r)]


# --- output -----------------------------------------------------------------------------

def header(kernels, dtypes, modes, archs, command: str) -> dict:
    def ptxas(arch):
        found = re.search(r"release [\d.]+, V[\d.]+", get_ptxas_version(arch))
        return found.group(0) if found else "unknown"

    return {
        "what": "Triton kernels compiled for GPUs on the CPU (not run): ptxas resource usage per build",
        "torch": torch.__version__, "triton": triton.__version__, "ptxas": {f"sm_{a}": ptxas(a) for a in archs},
        "git_commit": _git_commit(), "command": command, "shape_set": "cuda",
        "shapes": {k: SHAPE_SETS["cuda"][k] for k in kernels}, "dtypes": list(dtypes), "modes": list(modes),
        "archs": [f"sm_{a}" for a in archs],
        "shared_memory_limits": {f"sm_{a}": SHARED_MEMORY_LIMITS[a] for a in archs},
    }


def _kib(n) -> str:
    return "–" if n is None else f"{n / 1024:.1f}"


def summary_rows(rows: Sequence[dict]) -> list[dict]:
    """Per kernel and arch: builds, how many spill (and of those, pickable), MMA kinds."""
    out = {}
    for r in rows:
        s = out.setdefault((r["kernel"], r["arch"]), {
            "kernel": r["kernel"], "arch": r["arch"], "builds": 0, "pickable": 0, "spill": 0, "spill_pickable": 0,
            "errors": 0, "max_registers": 0, "max_shared": 0, "mma": set(),
        })
        s["builds"] += 1
        s["pickable"] += r["pickable"]
        s["spill"] += r["spills"]
        s["spill_pickable"] += r["spills"] and r["pickable"]
        s["errors"] += "error" in r
        s["max_registers"] = max(s["max_registers"], r.get("registers") or 0)
        s["max_shared"] = max(s["max_shared"], r.get("shared") or 0)
        s["mma"].add(r.get("mma", "error"))
    return [s | {"mma": ", ".join(sorted(s["mma"]))} for s in out.values()]


def markdown(head: dict, rows: Sequence[dict], data_file: str) -> str:
    ptxas = ", ".join(f"{a}: ptxas {v}" for a, v in head["ptxas"].items())
    limits = ", ".join(f"{a} {n // 1024} KiB" for a, n in head["shared_memory_limits"].items())
    lines = [
        "# fastfusion Triton kernels: compile report (compiled on the CPU, not run)",
        "",
        (f"`{head['command']}` · commit `{head['git_commit']}` · torch {head['torch']}, triton {head['triton']} "
         f"· {ptxas} · data: `{data_file}`"),
        "",
        (f"Compiled: every Triton launch of the fastfusion provider in {', '.join(head['modes'])} mode for "
         f"{', '.join(head['shapes'])} at the GPU shapes (\"cuda\" set), in {', '.join(head['dtypes'])}, for "
         f"{', '.join(head['archs'])}; every config of each autotuner's list, those its prune function drops "
         f"included (pickable: no). Registers: per thread; spills and stack frame: bytes per thread (ptxas); "
         f"shared: KiB per program (limits: {limits}); MMA: what the dots became (wgmma, mma.sync, or fma: no "
         f"tensor cores); variant: the specialised arguments in which builds of one kernel, config and dtypes "
         f"differ (%16: an int known to be a multiple of 16, or a pointer 16-byte aligned)."),
        "",
        "## Per kernel",
        "",
        "| kernel | arch | builds | pickable | spill | spill, pickable | errors | max regs | max shared KiB | MMA |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for s in summary_rows(rows):
        lines.append(f"| {s['kernel']} | {s['arch']} | {s['builds']} | {s['pickable']} | {s['spill']} | "
                     f"{s['spill_pickable']} | {s['errors']} | {s['max_registers']} | {_kib(s['max_shared'])} "
                     f"| {s['mma']} |")
    bad = problems(rows)
    lines += ["", f"## Pickable configs that spill, overflow shared memory or fail: {len(bad)}", ""]
    lines += [f"- {r['kernel']} {r['arch']} {'/'.join(r['dtypes'])} {r['config']} {r['variant']}".rstrip() for r in bad]
    lines += [
        "", "## Every build", "",
        ("| kernel | arch | dtypes | config | variant | pickable | regs | spill st/ld B | stack B | shared KiB | MMA "
         "| compile s | used by |"),
        "|---|---|---|---|---|---|--:|--:|--:|--:|---|--:|---|",
    ]
    for r in rows:
        if "error" in r:
            resources = f"error: {r['error']} | | | | |"
        else:
            resources = (f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['stack_frame']} | "
                         f"{_kib(r['shared'])}{' (over)' if r['shared_over_limit'] else ''} | {r['mma']} |")
        lines.append(f"| {r['kernel']} | {r['arch']} | {'/'.join(r['dtypes'])} | {r['config']} | {r['variant']} | "
                     f"{'yes' if r['pickable'] else 'no'} | {resources} {r.get('compile_s', '')} | "
                     f"{', '.join(r['uses'])} |")
    return "\n".join(lines) + "\n"


def summary(rows: Sequence[dict], seconds: float) -> str:
    spilling = [r for r in rows if r["spills"]]
    bad = problems(rows)
    per_arch = ", ".join(
        f"{a}: {sum(r['arch'] == a for r in rows)} builds, {sum(r['arch'] == a for r in spilling)} spill"
        for a in dict.fromkeys(r["arch"] for r in rows)
    )
    return (f"{len(rows)} builds ({sum(r['pickable'] for r in rows)} pickable) in {seconds:.0f} s; "
            f"{len(spilling)} spill ({sum(r['pickable'] for r in spilling)} pickable); {per_arch}; "
            f"{len(bad)} pickable builds spill, overflow shared memory or fail")


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_report", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--arch", nargs="+", type=int, choices=ARCHS, default=list(ARCHS), help="CUDA compute capabilities")
    add("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    add("--ops", nargs="+", choices=KERNELS, default=list(KERNELS), metavar="KERNEL", help=f"of {', '.join(KERNELS)}")
    add("--modes", nargs="+", choices=ops.MODES, default=list(ops.MODES))
    add("--out-dir", type=Path, default=RESULTS_DIR)
    add("--jobs", type=int, default=1, help="compile in this many processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: under the interpreter there is nothing to compile and "
                     "fastfusion keeps only the first autotune config; run without it")
    command = shlex.join(["python", "-m", "benchmarks.compile_report", *argv])
    start = time.perf_counter()
    builds = collect_builds(args.ops, args.dtypes, args.modes, args.arch)
    rows = make_rows(builds, compile_builds(builds, args.jobs))
    head = header(args.ops, args.dtypes, args.modes, args.arch, command)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": args.out_dir / f"{STEM}.json", "md": args.out_dir / f"{STEM}.md"}
    paths["json"].write_text(json.dumps({"header": head, "rows": rows}, indent=1) + "\n")
    paths["md"].write_text(markdown(head, rows, paths["json"].name))
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    print(summary(rows, time.perf_counter() - start))
    return paths


if __name__ == "__main__":
    main()
