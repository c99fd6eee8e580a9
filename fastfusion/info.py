"""What this installation of fastfusion can run, and why: ``python -m fastfusion.info``.

Prints the versions (Python, torch, Triton, fastfusion and where it is imported from), the
CPU (model, torch's CPU capability, thread counts), the accelerators torch sees, and the state
of each backend with its reason: "torch" and "eager" always run; "cpp" is built ahead of time,
built and cached (where), not built yet, or unavailable (no compiler, no ninja, no sources,
unwritable cache); "triton" needs Triton and a CUDA GPU (or its CPU interpreter, for tests).

Nothing is compiled unless ``--build`` is given: without it an unbuilt C++ backend is reported
as "not built (will build on first use ...)", because the build takes about a minute. With
``--build`` the extension is built (or loaded) first, as a first use would, and the exit
status is 1 if it could not be.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import pathlib
import platform
import sys

import torch

import fastfusion

from . import _dispatch, _extension


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # importable without metadata (a source tree)
        return "installed, version unknown"


def _devices() -> list[str]:
    devices = [f"cpu ({_cpu_model()})"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(
                f"cuda:{i} ({p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
            )
    else:
        devices.append(
            f"no CUDA device (torch built with CUDA {torch.version.cuda})"
            if torch.version.cuda
            else "no CUDA device (a CPU-only torch build)"
        )
    if torch.backends.mps.is_available():
        devices.append("mps (Apple GPU; fastfusion runs the torch backend there)")
    return devices


def _triton_state(registered: set[str]) -> str:
    if _triton_version() is None:
        return "missing: Triton is not installed (pip install 'fastfusion[triton]')"
    if "triton" in registered:
        if torch.cuda.is_available():
            return f"ready on CUDA ({torch.cuda.get_device_name()})"
        return "ready on Triton's CPU interpreter (TRITON_INTERPRET=1: for tests, slow)"
    return "no GPU: Triton is installed, but its kernels need a CUDA device"


def _cpp_state() -> str:
    ready, why = _extension.state()
    if ready is None:
        return why
    return ("ready: " if ready else "unavailable: ") + why


def report(build: bool = False) -> list[tuple[str, str]]:
    """The report as (label, value) rows. ``build``: build or load the C++ extension first."""
    if build:
        _extension.unavailable_reason()
    registered = {name for table in _dispatch._KERNELS.values() for name in table}
    fastfusion_dir = pathlib.Path(fastfusion.__file__).parent
    rows = [
        ("fastfusion", f"{fastfusion.__version__} ({fastfusion_dir})"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", f"{torch.__version__}"),
        ("triton", _triton_version() or "not installed"),
        ("platform", platform.platform()),
        ("CPU capability", f"{torch.backends.cpu.get_cpu_capability()} (torch.backends.cpu.get_cpu_capability())"),
        ("threads", f"{torch.get_num_threads()} torch intra-op threads, {os.cpu_count()} logical CPUs"),
    ]
    rows += [("device", d) for d in _devices()]
    rows += [
        ("backend torch", "ready: the reference math inside the fastfusion:: ops, every device"),
        ("backend eager", "ready: plain PyTorch with its own autograd, the baseline"),
        ("backend cpp", _cpp_state()),
        ("backend triton", _triton_state(registered)),
        ("backend cuda", "none yet: no CUDA kernels beat the Triton ones so far"),
        ("FASTFUSION_BACKEND", os.environ.get("FASTFUSION_BACKEND", "unset (auto)")),
        ("C++ build cache", str(_extension._cache_root())),
    ]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastfusion.info",
        description="Versions, devices and the state of each fastfusion backend, with the reason.",
    )
    parser.add_argument(
        "--build",
        action="store_true",
        help="build (or load) the C++ backend first, as its first use would (about a minute when not cached); "
        "exit status 1 if it cannot be",
    )
    args = parser.parse_args(argv)
    rows = report(build=args.build)
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 1 if args.build and _extension.unavailable_reason() is not None else 0


if __name__ == "__main__":
    sys.exit(main())
