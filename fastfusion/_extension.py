"""Builds and loads the C++ CPU kernels of csrc/cpu, the "cpp" backend.

Nothing is compiled at ``import fastfusion``: the first call that resolves the "cpp" backend
(explicitly, or through "auto" on a CPU tensor) asks :func:`unavailable_reason`, which loads,
in order,

1. the ahead-of-time build in the installed package (``FASTFUSION_BUILD_EXT=1 pip install
   --no-build-isolation .``), if it was built against the running torch version;
2. a just-in-time build of csrc/cpu with ninja (``torch.utils.cpp_extension.load``, 45-75 s
   on two cores), cached per user in ``$FASTFUSION_CACHE_DIR`` (default
   ``$XDG_CACHE_HOME/fastfusion`` or ``~/.cache/fastfusion``). The cache key hashes the
   sources, the flags, torch's version and C++ ABI, the Python version and the machine type,
   so a changed source or another torch builds afresh and a stale library is never loaded.

Concurrent first uses (pytest-xdist workers, DataLoader processes) are serialised by an
``flock`` on the build directory, which the kernel drops when a holder dies; torch's own
build baton (a lock *file*) is not enough alone, because a build killed mid-way leaves the
file behind and every later process waits on it forever. A build is published by writing a
``complete`` marker last, so readers never load a half-linked library.

The flags: ``-O3 -fopenmp -fno-math-errno -fno-trapping-math`` (the last two as torch itself
is built, so that branch-free loops with sqrt vectorise), plus ``-mavx2 -mfma`` for the
just-in-time build on x86-64 hosts where torch's own CPU dispatch uses AVX2 or AVX-512
(``torch.backends.cpu.get_cpu_capability()``, which honours ``ATEN_CPU_CAPABILITY``):
measured 4-14% faster elementwise epilogues (signed sqrt + L2, LMF's row products). The
vector flags are part of the cache key, so a cache shared across machines (a network home)
never hands AVX2 code to a CPU without it; the ahead-of-time build, which may be copied to
other machines, keeps the baseline ISA. No ``-march=native``, which would bake one CPU's
whole instruction set into the library. The FLOP-heavy parts (GEMMs, FFTs) run in ATen's MKL/oneDNN, which select the
vector ISA at run time; ``-fopenmp`` makes ``at::parallel_for`` parallel (it is an inline
OpenMP template) and links against the libgomp torch already loaded, so
``torch.set_num_threads`` governs it.

If the build or the load fails, the reason is returned; the dispatcher turns it into one
warning and the "torch" backend under "auto", or an error when "cpp" was asked for.
``python -m fastfusion._extension`` builds (or loads) eagerly and reports the outcome.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import platform
import re
import shutil
import sys
import threading

import torch

_NAME = "fastfusion_cpu"
_SOURCE_DIR = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "cpu"
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
# Shared with setup.py's ahead-of-time build. Tuples, and copied when passed on:
# torch.utils.cpp_extension appends to the lists it is given, which would change the cache key.
CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math")
LDFLAGS = ("-fopenmp",)
# Names of the ahead-of-time library, and of the file beside it holding the torch version it
# was built against (a library built for another torch would fail to load or, worse, misbehave).
AOT_MODULE = "_fastfusion_cpu"
AOT_TORCH_VERSION_FILE = AOT_MODULE + ".torch_version"

_UNTRIED = object()
_status: object = _UNTRIED  # None once loaded, else why the backend is unavailable
_loaded_path: str | None = None  # the library in this process: a namespace registers once
_lock = threading.Lock()


def unavailable_reason() -> str | None:
    """None when the C++ kernels are loaded (building them on first call), else the reason
    they cannot be. The answer is computed once per process."""
    global _status
    with _lock:
        if _status is _UNTRIED:
            _status = _load()
        return _status


def _load() -> str | None:
    try:
        path = _aot_library() or _jit_library()
    except _Unavailable as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - any failure means "fall back", with its reason
        return f"the C++ extension is unavailable: {e}"
    global _loaded_path
    if _loaded_path not in (None, path):
        return f"{_loaded_path} is loaded already and {path} would register the same operators; restart Python"
    try:
        torch.ops.load_library(path)
    except Exception as e:  # noqa: BLE001
        return f"loading {path} failed: {e}"
    _loaded_path = path
    return None


class _Unavailable(Exception):
    """The extension cannot be built here, for a reason worth stating as is."""


def _aot_library() -> str | None:
    version_file = _PACKAGE_DIR / AOT_TORCH_VERSION_FILE
    libraries = sorted(_PACKAGE_DIR.glob(AOT_MODULE + ".*.so")) + sorted(_PACKAGE_DIR.glob(AOT_MODULE + ".so"))
    if not libraries or not version_file.is_file():
        return None
    if version_file.read_text().strip() != torch.__version__:
        return None  # built for another torch: rebuild just in time instead
    return str(libraries[0])


def _sources() -> list[pathlib.Path]:
    return sorted(p for p in _SOURCE_DIR.glob("*") if p.suffix in (".cpp", ".h"))


def _cache_root() -> pathlib.Path:
    if os.environ.get("FASTFUSION_CACHE_DIR"):
        return pathlib.Path(os.environ["FASTFUSION_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "fastfusion"


def _jit_cflags() -> tuple[str, ...]:
    """CFLAGS plus the host's vector ISA where torch uses AVX2 or better (module docstring)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    capability = torch.backends.cpu.get_cpu_capability()
    return CFLAGS + (("-mavx2", "-mfma") if x86 and capability.startswith(("AVX2", "AVX512")) else ())


def _build_key(sources: list[pathlib.Path]) -> str:
    h = hashlib.sha256()
    for p in sources:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(repr((_jit_cflags(), LDFLAGS, torch.__version__, torch._C._GLIBCXX_USE_CXX11_ABI)).encode())
    h.update(repr((sys.version_info[:2], platform.machine(), sys.platform)).encode())
    return h.hexdigest()[:16]


def _jit_library() -> str:
    if os.name != "posix":
        raise _Unavailable("the C++ extension is built with GCC/Clang flags and supports Linux and macOS only")
    sources = _sources()
    if not any(p.suffix == ".cpp" for p in sources):
        raise _Unavailable(
            f"the C++ sources are not installed (looked in {_SOURCE_DIR}); use a source checkout, "
            "or build ahead of time with FASTFUSION_BUILD_EXT=1 pip install --no-build-isolation ."
        )
    build_dir = _cache_root() / f"{_NAME}-{_build_key(sources)}"
    marker = build_dir / "complete"
    if marker.is_file():
        return marker.read_text()
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise _Unavailable(f"no C++ compiler: {compiler!r} is not on PATH (set CXX to use another)")
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        raise _Unavailable("the 'ninja' build tool is not installed (pip install ninja)") from None

    build_dir.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(build_dir / "build.flock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel, also when this process dies
        if marker.is_file():  # another process built it while we waited
            return marker.read_text()
        # Only flock holders run torch's build here, so a baton file is a killed build's leftover.
        (build_dir / "lock").unlink(missing_ok=True)
        try:
            path = cpp_extension.load(
                name=_NAME,
                sources=[str(p) for p in sources if p.suffix == ".cpp"],
                extra_cflags=list(_jit_cflags()),
                extra_ldflags=list(LDFLAGS),
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
        except Exception as e:
            log = build_dir / "build.log"
            log.write_text(str(e))
            raise _Unavailable(f"building the C++ extension failed: {_first_error_line(str(e))} (full log: {log})") from e
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(path)
        tmp.replace(marker)
    return path


def _first_error_line(message: str) -> str:
    """The compiler's first error, not the whole log torch puts in its exception."""
    for line in message.splitlines():
        if re.search(r"\berror\b", line, re.IGNORECASE) and "Error building extension" not in line:
            return line.strip()
    return message.strip().splitlines()[0] if message.strip() else "unknown error"


def main() -> int:
    reason = unavailable_reason()
    if reason is None:
        print(f"fastfusion: C++ CPU kernels loaded (torch {torch.__version__})")
        return 0
    print(f"fastfusion: C++ CPU kernels unavailable: {reason}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
