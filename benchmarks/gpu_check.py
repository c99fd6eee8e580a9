"""The Python half of benchmarks/gpu_check.sh (and of gpu_wheels.sh and compat_check.sh).

    python -m benchmarks.gpu_check versions --commit SHA --json FILE
    python -m benchmarks.gpu_check interpreter-ok
    python -m benchmarks.gpu_check check-wheels DIR
    python -m benchmarks.gpu_check summary --steps FILE --versions FILE --results DIR

- ``versions``: what ran where (GPU, driver, torch, triton, numpy, Python, fvcore, commit),
  printed and written as JSON for the summary.
- ``interpreter-ok``: exit status 0 when Triton's CPU interpreter can run a loop whose bound
  is a kernel argument, as every fastfusion kernel has. Triton 3.6's interpreter turns such a
  bound into a Python int with ``int()`` of a 1-element array, which NumPy 2.4 refuses
  (triton-lang/triton#9171, fixed in later releases); numpy 2.3 still allows it.
- ``check-wheels``: every requirement of every wheel in DIR (for CPython 3.12 on Linux, extras
  left out) is another wheel in DIR or a package that the GPU image already has.
- ``summary``: the markdown summary that gpu_check.sh prints last: versions, the status and
  time of each step, the benchmark table and, when the roofline model ran, its error per kernel.

Nothing here imports fastfusion; torch and triton only inside the subcommands that need them.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

# Of what fastfusion's tests and benchmarks import, what the GPU image already has (its
# python3: Python 3.12.3, torch 2.11.0+cu130, triton 3.6.0, numpy 2.5.2; package list read
# 2026-11). The rest travels as wheels in .whl/ (benchmarks/gpu_wheels.sh).
GPU_IMAGE_HAS = frozenset({
    "torch", "triton", "numpy", "pytest", "pytest-benchmark", "pytest-xdist", "pytest-timeout",
    "hypothesis", "matplotlib", "tqdm", "tabulate", "scipy", "scikit-learn", "pandas", "psutil",
    "portalocker", "pyyaml", "pillow", "typing-extensions", "packaging", "setuptools", "wheel",
})
# The environment in which wheel requirements are evaluated: the GPU image's Python.
GPU_PYTHON_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                      "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                      "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------- versions

def _module_version(name: str) -> str:
    try:
        return __import__(name).__version__
    except Exception as exc:  # missing, or broken on import: either way the summary says so
        return f"MISSING ({type(exc).__name__}: {exc})"


def _nvidia_smi() -> str:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"n/a ({type(exc).__name__})"
    return done.stdout.strip() if done.returncode == 0 else f"n/a (exit {done.returncode})"


def versions(commit: str) -> dict[str, str]:
    import numpy
    import torch

    cuda = torch.cuda.is_available()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": f"{torch.__version__} (CUDA runtime {torch.version.cuda})",
        "triton": _module_version("triton"),
        "numpy": numpy.__version__,
        "fvcore": _module_version("fvcore"),
        # Which copy the checks import: this tree, not the one the install step put on PYTHONPATH.
        "fastfusion": str(Path(importlib.util.find_spec("fastfusion").origin).parent),
        "gpu": torch.cuda.get_device_name(0) if cuda else "none",
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else "n/a",
        "nvidia-smi": _nvidia_smi(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "unset"),
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    }
    return info


# --------------------------------------------------------------------------- interpreter probe

PROBE = """
import torch
import triton
import triton.language as tl


@triton.jit
def count_up(out_ptr, n):
    total = 0
    for _ in range(0, n):  # a bound that is a kernel argument, as in every fastfusion kernel
        total += 1
    tl.store(out_ptr, total)


out = torch.zeros(1, dtype=torch.int32)
count_up[(1,)](out, 5)
assert out.item() == 5, out
"""


def interpreter_ok() -> tuple[bool, str]:
    """Whether Triton's interpreter runs PROBE here, and what it said if not. A subprocess: the
    interpreter must be chosen before triton is imported."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode == 0:
        return True, "ok"
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return False, last


# --------------------------------------------------------------------------- wheels

def _wheel_metadata(path: Path):
    with zipfile.ZipFile(path) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(wheel.read(name).decode())


def uncovered_requirements(wheel_dir: Path) -> list[str]:
    """'wheel: requirement' for every requirement that neither another wheel in ``wheel_dir`` nor
    the GPU image provides."""
    from packaging.requirements import Requirement

    metadata = {path.name: _wheel_metadata(path) for path in sorted(wheel_dir.glob("*.whl"))}
    carried = {_canonical(m["Name"]) for m in metadata.values()}
    missing = []
    for wheel, meta in metadata.items():
        for line in meta.get_all("Requires-Dist") or []:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate(GPU_PYTHON_MARKERS):
                continue  # an extra, or another Python
            if _canonical(requirement.name) not in carried | GPU_IMAGE_HAS:
                missing.append(f"{wheel}: {line}")
    return missing


def duplicate_wheels(wheel_dir: Path) -> list[str]:
    """Names carried in more than one version: pip refuses to install them together."""
    seen: dict[str, list[str]] = {}
    for path in sorted(wheel_dir.glob("*.whl")):
        seen.setdefault(_canonical(_wheel_metadata(path)["Name"]), []).append(path.name)
    return [", ".join(files) for files in seen.values() if len(files) > 1]


# --------------------------------------------------------------------------- summary

def _read_steps(path: Path) -> list[list[str]]:
    """Rows of name, status, seconds, detail, as gpu_check.sh appends them (tab-separated)."""
    if not path.exists():
        return []
    return [line.split("\t", 3) for line in path.read_text().splitlines() if line.strip()]


def summary(steps_file: Path, versions_file: Path, results: Path, roofline: Path | None = None) -> str:
    lines = ["# fastfusion GPU check", ""]
    if versions_file.exists():
        lines += [f"- {key}: {value}" for key, value in json.loads(versions_file.read_text()).items()]
        lines.append("")
    lines += ["| step | status | seconds | detail |", "|---|---|--:|---|"]
    lines += [f"| {' | '.join(row + [''] * (4 - len(row)))} |" for row in _read_steps(steps_file)]
    bench = sorted(results.glob("bench/*.json"))
    if bench:
        from .summary import summary_table

        lines += ["", f"Benchmarks (`{bench[-1].name}`):", "", summary_table(json.loads(bench[-1].read_text()))]
    # benchmarks.roofline --measured: the model beside these measurements, its error per kernel.
    for comparison in sorted(roofline.glob("roofline-*-vs-*.md")) if roofline else []:
        lines += ["", comparison.read_text().replace("# ", "## ", 1)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("versions")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--json", type=Path, required=True)
    sub.add_parser("interpreter-ok")
    p = sub.add_parser("check-wheels")
    p.add_argument("wheel_dir", type=Path)
    p = sub.add_parser("summary")
    p.add_argument("--steps", type=Path, required=True)
    p.add_argument("--versions", type=Path, required=True)
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--roofline", type=Path, help="benchmarks.roofline's output folder, if it ran")
    args = parser.parse_args(argv)

    if args.command == "versions":
        info = versions(args.commit)
        args.json.write_text(json.dumps(info, indent=1) + "\n")
        print("\n".join(f"{key}: {value}" for key, value in info.items()))
        return 0
    if args.command == "interpreter-ok":
        ok, detail = interpreter_ok()
        print(f"Triton's interpreter {'runs' if ok else 'cannot run'} fastfusion's kernels here: {detail}")
        return 0 if ok else 1
    if args.command == "check-wheels":
        wheels = sorted(args.wheel_dir.glob("*.whl"))
        problems = [f"uncovered requirement {m}" for m in uncovered_requirements(args.wheel_dir)]
        problems += [f"several versions: {d}" for d in duplicate_wheels(args.wheel_dir)]
        print(f"{len(wheels)} wheels in {args.wheel_dir}: " + ", ".join(w.name for w in wheels))
        print("\n".join(problems) or "every requirement is carried or already in the GPU image")
        return 1 if problems or not wheels else 0
    text = summary(args.steps, args.versions, args.results, args.roofline)
    (args.results / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
