"""Builds and loads the C++ CPU kernels of fastfusion/csrc/cpu, the "cpp" backend.

The sources ship inside the package (package data of the wheel and the sdist), so an
installed fastfusion builds them as a source checkout does.

Nothing is compiled at ``import fastfusion``: the first call that resolves the "cpp" backend
(explicitly, or through "auto" on a CPU tensor) asks :func:`unavailable_reason`, which loads,
in order,

1. the ahead-of-time build in the installed package (``FASTFUSION_BUILD_EXT=1 pip install
   --no-build-isolation .``), if it was built against the running torch version;
2. a just-in-time build of csrc/cpu with ninja (``torch.utils.cpp_extension.load``, 45-75 s
   on two cores; announced by one line on stderr when it starts; the ninja of the pip package,
   a dependency, is found also when its environment is not activated), cached per user in ``$FASTFUSION_CACHE_DIR`` (default
   ``$XDG_CACHE_HOME/fastfusion`` or ``~/.cache/fastfusion``). The cache key hashes the
   sources, the flags, torch's version and C++ ABI, the Python version and the machine type,
   so a changed source or another torch builds afresh and a stale library is never loaded.

Concurrent first uses (pytest-xdist workers, DataLoader processes) are serialised by a
``filelock.FileLock`` on the build directory (an ``flock`` on Unix, which the kernel drops
when a holder dies); torch's own
build baton (a lock *file*) is not enough alone, because a build killed mid-way leaves the
file behind and every later process waits on it forever. A build is published by writing a
``complete`` marker last (atomically, by rename), so readers never load a half-linked library.
The marker is one JSON object, ``{"library": "fastfusion_cpu.so", "size": <bytes>, "sha256":
"<hex digest>"}``: the library's file name relative to the build directory (so a cache moved
or mounted elsewhere still loads) and what the build wrote. Every load first checks the
library's size and sha256 against it, because a truncated library (an interrupted copy of the
cache, a crash before the data reached the disk) loads "fine" and then kills the process with
SIGBUS on its first op. An entry that does not check out (library missing, truncated or
altered; marker empty, damaged, naming a path outside the build directory, or in an older
fastfusion's format) is broken: the process holding the lock says so in one warning, deletes
every build output (ninja trusts outputs by their time stamps, so a damaged object file would
otherwise be linked again) and builds afresh. Checking and loading write nothing, so a
complete cache on a read-only mount loads; a build that cannot write there says so and names
``FASTFUSION_CACHE_DIR``.

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
warning and the "torch" backend under "auto", or an error when "cpp" was asked for. When an
ahead-of-time library was passed over, the reason says why too (built for another torch: it
names both versions; or with no record of which).
``python -m fastfusion._extension`` builds (or loads) eagerly and reports the outcome;
:func:`state` says what a first use would do without building (``python -m fastfusion.info``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import platform
import re
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator

import filelock
import torch

_NAME = "fastfusion_cpu"
_SOURCE_DIR = pathlib.Path(__file__).resolve().parent / "csrc" / "cpu"
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
# Shared with setup.py's ahead-of-time build. Tuples, and copied when passed on:
# torch.utils.cpp_extension appends to the lists it is given, which would change the cache key.
CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math")
LDFLAGS = ("-fopenmp",)
# Names of the ahead-of-time library, and of the file beside it holding the torch version it
# was built against (a library built for another torch would fail to load or, worse, misbehave).
AOT_MODULE = "_fastfusion_cpu"
AOT_TORCH_VERSION_FILE = AOT_MODULE + ".torch_version"
_MARKER = "complete"  # in a build directory: the published build's record (module docstring)
_BUILD_LOCK = "build.flock"

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


def state() -> tuple[bool | None, str]:
    """What the "cpp" backend is, or would be on first use, said without building or loading
    anything: (True, where it is loaded or ready from), (False, why it cannot be), or (None,
    "not built ...") when a first use would build it."""
    with _lock:
        if _status is None:
            return True, f"loaded from {_loaded_path}"
        if _status is not _UNTRIED:
            return False, str(_status)
    path, aot_passed_over = _aot_library()
    if path is not None:
        return True, f"built ahead of time: {path}"
    passed_over = f" ({aot_passed_over})" if aot_passed_over else ""
    try:
        build_dir = _build_dir(_buildable_sources())
        try:
            library = _published_library(build_dir)
        except _BrokenEntry as e:
            library, damage = None, f"; the cached build is broken and will be rebuilt: {e}"
        else:
            damage = ""
        if library is not None:
            return True, f"built, cached in {build_dir}{passed_over}"
        _check_build_tools()
    except _Unavailable as e:
        return False, f"{e}{passed_over}"
    return None, f"not built (will build on first use, about a minute, into {build_dir}){damage}{passed_over}"


def _load() -> str | None:
    aot_passed_over = None
    try:
        path, aot_passed_over = _aot_library()
        path = path or _jit_library()
    except _Unavailable as e:
        # Name the torch mismatch as well: "the sources are not installed" alone hides why a
        # build was needed at all.
        return f"{aot_passed_over}, and {e}" if aot_passed_over else str(e)
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


class _BrokenEntry(Exception):
    """A published build in the cache that does not match its marker; says what is wrong."""


def _aot_library() -> tuple[str | None, str | None]:
    """The ahead-of-time library to load, or None; and why a library found in the package is
    passed over, or None."""
    libraries = sorted(_PACKAGE_DIR.glob(AOT_MODULE + ".*.so")) + sorted(_PACKAGE_DIR.glob(AOT_MODULE + ".so"))
    if not libraries:
        return None, None
    version_file = _PACKAGE_DIR / AOT_TORCH_VERSION_FILE
    if not version_file.is_file():
        return None, f"the ahead-of-time library {libraries[0]} has no {version_file} naming the torch it was built for"
    built_for = version_file.read_text().strip()
    if built_for != torch.__version__:
        return None, (
            f"the ahead-of-time library {libraries[0]} was built for torch {built_for}, "
            f"not the running torch {torch.__version__}"
        )
    return str(libraries[0]), None


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


def _build_dir(sources: list[pathlib.Path]) -> pathlib.Path:
    return _cache_root() / f"{_NAME}-{_build_key(sources)}"


def _jit_library() -> str:
    sources = _buildable_sources()
    build_dir = _build_dir(sources)
    damage = None
    try:
        library = _published_library(build_dir)
    except _BrokenEntry as e:
        library, damage = None, str(e)  # examined again under the lock, which rebuilds it
    if library is not None:
        return library
    try:
        _check_build_tools()
        lock = _acquire_build_lock(build_dir)
    except _Unavailable as e:
        raise _Unavailable(f"{damage}, and it cannot be rebuilt: {e}" if damage else str(e)) from None
    try:
        return _build_holding_lock(build_dir, sources)
    finally:
        lock.release()


def _build_holding_lock(build_dir: pathlib.Path, sources: list[pathlib.Path]) -> str:
    """Builds and publishes the library in ``build_dir``, unless a good one is there by now."""
    try:
        library = _published_library(build_dir)
    except _BrokenEntry as e:  # still broken now that no one else is building here
        library = None
        warnings.warn(f"fastfusion: {e}; rebuilding the C++ extension in {build_dir} from scratch", RuntimeWarning, stacklevel=2)
        _clear_build_outputs(build_dir)
    if library is not None:  # published, possibly by another process while we waited
        return library
    # Only lock holders run torch's build here, so a baton file is a killed build's leftover.
    (build_dir / "lock").unlink(missing_ok=True)
    from torch.utils import cpp_extension

    # Said before the minute of silence a build takes; stderr, so a program's output stays clean.
    print(f"fastfusion: building the C++ extension in {build_dir} (about a minute, once)", file=sys.stderr, flush=True)
    try:
        with _ninja_on_path():
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
    _publish(build_dir, pathlib.Path(path))
    return path


def _buildable_sources() -> list[pathlib.Path]:
    """The sources a just-in-time build compiles; raises _Unavailable where it cannot run."""
    if os.name != "posix":
        raise _Unavailable("the C++ extension is built with GCC/Clang flags and supports Linux and macOS only")
    sources = _sources()
    if not any(p.suffix == ".cpp" for p in sources):
        raise _Unavailable(
            f"the C++ sources are not installed (looked in {_SOURCE_DIR}); reinstall fastfusion, "
            "or build ahead of time with FASTFUSION_BUILD_EXT=1 pip install --no-build-isolation ."
        )
    return sources


def _check_build_tools() -> None:
    """Raises _Unavailable naming the missing compiler or ninja."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise _Unavailable(f"no C++ compiler: {compiler!r} is not on PATH (set CXX to use another)")
    from torch.utils import cpp_extension

    with _ninja_on_path():
        try:
            cpp_extension.verify_ninja_availability()
        except RuntimeError:
            raise _Unavailable("the 'ninja' build tool is not installed (pip install ninja)") from None


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """Puts the ninja of the pip package (a dependency) on PATH while torch looks for it there.

    pip installs its executable beside the interpreter's scripts, which are on PATH only in an
    activated environment; ``venv/bin/python train.py`` would otherwise find no ninja."""
    path = os.environ.get("PATH")
    bin_dir = None
    if shutil.which("ninja") is None:
        try:
            import ninja

            bin_dir = ninja.BIN_DIR
        except ImportError:
            pass  # torch's check then names the missing tool
    if bin_dir is not None:
        os.environ["PATH"] = bin_dir + os.pathsep + (path or "")
    try:
        yield
    finally:
        if bin_dir is not None:
            if path is None:
                del os.environ["PATH"]
            else:
                os.environ["PATH"] = path


def _acquire_build_lock(build_dir: pathlib.Path) -> filelock.FileLock:
    """The build directory's lock (module docstring), held; waits as long as another holds it."""
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(build_dir / _BUILD_LOCK)
        lock.acquire()
    except OSError as e:
        raise _Unavailable(
            f"cannot build the C++ extension in {build_dir}: {e.strerror or e}; "
            "set FASTFUSION_CACHE_DIR to a writable directory"
        ) from None
    return lock


def _published_library(build_dir: pathlib.Path) -> str | None:
    """The library the marker in ``build_dir`` publishes, once its size and sha256 match the
    record; None when there is no marker. Raises _BrokenEntry, naming the file and the fault."""
    marker = build_dir / _MARKER
    try:
        text = marker.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise _BrokenEntry(f"the build marker {marker} cannot be read ({e})") from None
    try:
        record = json.loads(text)
        name, size, digest = record["library"], record["size"], record["sha256"]
    except (ValueError, TypeError, KeyError):
        raise _BrokenEntry(
            f"the build marker {marker} is not a build record of this fastfusion version "
            "(empty, damaged, or written by an older one)"
        ) from None
    # A bare file name: any other path is not this build's output, or not once the cache moves.
    if not (isinstance(name, str) and name not in ("", "..") and pathlib.PurePath(name).name == name):
        raise _BrokenEntry(f"the build marker {marker} names {name!r}, not a file in its build directory")
    if not (isinstance(size, int) and isinstance(digest, str)):
        raise _BrokenEntry(f"the build marker {marker} records no valid size and sha256 for {name}")
    library = build_dir / name
    try:
        actual_size = library.stat().st_size
        actual_digest = _sha256(library) if actual_size == size else None
    except FileNotFoundError:
        raise _BrokenEntry(f"the built library {library} is missing") from None
    except OSError as e:
        raise _BrokenEntry(f"the built library {library} cannot be read ({e})") from None
    if actual_size != size:
        raise _BrokenEntry(f"the built library {library} has {actual_size} bytes, its build wrote {size} (truncated?)")
    if actual_digest != digest:
        raise _BrokenEntry(f"the built library {library} does not match the sha256 its build recorded (altered?)")
    return str(library)


def _publish(build_dir: pathlib.Path, library: pathlib.Path) -> None:
    """Writes the marker recording ``library`` (which torch links directly in ``build_dir``)."""
    record = {"library": library.name, "size": library.stat().st_size, "sha256": _sha256(library)}
    tmp = build_dir / (_MARKER + ".tmp")
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    tmp.replace(build_dir / _MARKER)  # atomic: readers see no marker or a whole one


def _clear_build_outputs(build_dir: pathlib.Path) -> None:
    """Deletes everything in ``build_dir`` but the lock file, which others may be waiting on.
    Unlinking, never rewriting in place, leaves a library another process has mapped intact."""
    for path in build_dir.iterdir():
        if path.name == _BUILD_LOCK:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
