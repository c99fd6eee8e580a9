"""The C++ extension's build cache (fastfusion/_extension.py): what a published build records,
how a load checks it, and what happens to a broken, moved, unwritable or foreign entry.

Most tests fake the compile (``torch.utils.cpp_extension.load``), because their point is the
cache's decision, not the build. The truncated-library test loads a real library in a child
process: loaded unchecked, such a library kills its process with SIGBUS.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from torch.utils import cpp_extension

from fastfusion import _extension

LIBRARY = _extension._NAME + ".so"
VERIFY_NINJA = cpp_extension.verify_ninja_availability  # before any fixture replaces it


def _record(library) -> str:
    """A marker's text in the documented format, for ``library`` as it is now."""
    data = library.read_bytes()
    return json.dumps({"library": library.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """An empty cache under tmp_path and a compile step that writes a stand-in library; its
    ``calls`` counts the builds."""
    monkeypatch.setenv("FASTFUSION_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", sys.executable)  # any executable passes the compiler check
    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", lambda: None)

    def load(name, build_directory, **kwargs):
        load.calls += 1
        path = os.path.join(build_directory, name + ".so")
        with open(path, "wb") as f:
            f.write(b"\x7fELF stand-in library, build %d" % load.calls)
        return path

    load.calls = 0
    monkeypatch.setattr(cpp_extension, "load", load)
    return load


def _build_dir():
    return _extension._build_dir(_extension._sources())


def test_marker_records_the_library_by_name_size_and_sha256(fake_build):
    path = _extension._jit_library()
    build_dir = _build_dir()
    assert path == str(build_dir / LIBRARY) and fake_build.calls == 1
    assert json.loads((build_dir / "complete").read_text()) == json.loads(_record(build_dir / LIBRARY))
    assert _extension._jit_library() == path and fake_build.calls == 1  # published: not built again


def test_a_build_is_announced_on_stderr_a_load_is_not(fake_build, capsys):
    _extension._jit_library()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.splitlines() == [
        f"fastfusion: building the C++ extension in {_build_dir()} (about a minute, once)"
    ]
    _extension._jit_library()  # published: loaded without a word
    assert capsys.readouterr().err == "" and fake_build.calls == 1


def test_moved_read_only_cache_loads_without_writing(fake_build, tmp_path, monkeypatch):
    _extension._jit_library()
    moved = tmp_path / "elsewhere"
    (tmp_path / "cache").rename(moved)
    monkeypatch.setenv("FASTFUSION_CACHE_DIR", str(moved))
    build_dir = _build_dir()
    before = {p.name: p.stat().st_mtime_ns for p in build_dir.iterdir()}
    build_dir.chmod(0o555)  # binds for users other than root; the listing below checks for root too
    try:
        assert _extension._jit_library() == str(build_dir / LIBRARY)
    finally:
        build_dir.chmod(0o755)
    assert fake_build.calls == 1
    assert {p.name: p.stat().st_mtime_ns for p in build_dir.iterdir()} == before


def _rewrite_marker(text):
    return lambda build_dir: (build_dir / "complete").write_text(text)


def _marker_naming(path_of):
    """A marker whose record is right for a library outside the build directory."""

    def damage(build_dir):
        outside = build_dir.parent / "outside.so"
        shutil.copy(build_dir / LIBRARY, outside)
        record = json.loads(_record(outside))
        record["library"] = path_of(outside)
        (build_dir / "complete").write_text(json.dumps(record))

    return damage


def _truncate(build_dir):
    library = build_dir / LIBRARY
    with open(library, "r+b") as f:
        f.truncate(library.stat().st_size // 2)


def _same_size_other_bytes(build_dir):
    library = build_dir / LIBRARY
    library.write_bytes(bytes(len(library.read_bytes())))


BROKEN_ENTRIES = {
    "empty marker": (_rewrite_marker(""), "is not a build record"),
    "garbage marker": (lambda d: (d / "complete").write_bytes(b"\xff\xfe\x00garbage"), "cannot be read"),
    "older fastfusion's marker": (lambda d: (d / "complete").write_text(str(d / LIBRARY)), "is not a build record"),
    "marker without a sha256": (_rewrite_marker('{"library": "fastfusion_cpu.so", "size": 9}'), "not a build record"),
    "marker with a bad size": (
        _rewrite_marker('{"library": "fastfusion_cpu.so", "size": "9", "sha256": "0"}'),
        "no valid size and sha256",
    ),
    "marker naming an absolute path": (_marker_naming(str), "not a file in its build directory"),
    "marker naming a parent's file": (_marker_naming(lambda p: "../" + p.name), "not a file in its build directory"),
    "missing library": (lambda d: (d / LIBRARY).unlink(), "is missing"),
    "truncated library": (_truncate, "bytes, its build wrote"),
    "same size, other bytes": (_same_size_other_bytes, "sha256"),
}


@pytest.mark.parametrize("damage", BROKEN_ENTRIES)
def test_broken_entry_is_rebuilt_from_scratch_with_one_warning(fake_build, damage):
    _extension._jit_library()
    build_dir = _build_dir()
    (build_dir / "stale.o").write_bytes(b"an object file ninja would trust")
    break_entry, message = BROKEN_ENTRIES[damage]
    break_entry(build_dir)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        path = _extension._jit_library()
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages
    assert message in messages[0] and str(build_dir) in messages[0] and "rebuilding" in messages[0]
    assert fake_build.calls == 2 and path == str(build_dir / LIBRARY)
    assert not (build_dir / "stale.o").exists()  # rebuilt from scratch, not relinked
    assert _extension._published_library(build_dir) == path


# Holds the build lock until told to go on, then repairs the library and exits (releasing it).
_LOCK_HOLDER = """
import pathlib, sys, filelock
build_dir, good = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
with filelock.FileLock(build_dir / 'build.flock'):
    print('locked', flush=True)
    sys.stdin.readline()
    (build_dir / 'fastfusion_cpu.so').write_bytes(good.read_bytes())
"""


def test_entry_rebuilt_by_another_process_while_waiting_is_taken(fake_build, tmp_path):
    _extension._jit_library()
    build_dir = _build_dir()
    good = tmp_path / "good.so"
    shutil.copy(build_dir / LIBRARY, good)
    _truncate(build_dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(build_dir), str(good)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = {}
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            waiter = threading.Thread(target=lambda: result.setdefault("path", _extension._jit_library()))
            waiter.start()
            waiter.join(timeout=1.0)
            assert waiter.is_alive()  # waiting for the lock the other process holds
            holder.communicate("go\n", timeout=60)
            waiter.join(timeout=60)
        assert not waiter.is_alive()
    finally:
        holder.kill()
    # The entry was fine by the time we held the lock: no warning, nothing built.
    assert [str(w.message) for w in record] == [] and fake_build.calls == 1
    assert result["path"] == str(build_dir / LIBRARY)


def test_broken_entry_that_cannot_be_rebuilt_names_both_faults(fake_build, monkeypatch):
    _extension._jit_library()
    _truncate(_build_dir())
    monkeypatch.setenv("CXX", "no-such-compiler-fastfusion")
    with pytest.raises(_extension._Unavailable) as raised:
        _extension._jit_library()
    assert f"{_build_dir() / LIBRARY} has" in str(raised.value) and "truncated" in str(raised.value)
    assert "cannot be rebuilt: no C++ compiler" in str(raised.value)


def test_state_says_what_a_first_use_would_do_and_builds_nothing(fake_build, monkeypatch, tmp_path):
    monkeypatch.setattr(_extension, "_status", _extension._UNTRIED)
    monkeypatch.setattr(_extension, "_PACKAGE_DIR", tmp_path)  # no ahead-of-time library
    build_dir = _build_dir()
    assert _extension.state() == (None, f"not built (will build on first use, about a minute, into {build_dir})")
    assert fake_build.calls == 0 and not build_dir.exists()
    _extension._jit_library()
    assert _extension.state() == (True, f"built, cached in {build_dir}")
    _truncate(build_dir)
    ready, why = _extension.state()
    assert ready is None and "the cached build is broken and will be rebuilt" in why and "(truncated?)" in why
    monkeypatch.setenv("CXX", "no-such-compiler-fastfusion")
    ready, why = _extension.state()
    assert ready is False and why.startswith("no C++ compiler")
    monkeypatch.setattr(_extension, "_SOURCE_DIR", tmp_path / "no-sources")
    ready, why = _extension.state()
    assert ready is False and why.startswith("the C++ sources are not installed")
    monkeypatch.setattr(_extension, "_status", "a reason found earlier")  # tried in this process
    assert _extension.state() == (False, "a reason found earlier")
    assert fake_build.calls == 1


def test_pip_installed_ninja_is_used_when_not_on_path(fake_build, monkeypatch):
    # An environment used without activating it: its scripts, ninja among them, are not on PATH.
    ninja = pytest.importorskip("ninja")
    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", VERIFY_NINJA)  # the real check
    monkeypatch.setenv("PATH", os.devnull)
    seen = []
    build = cpp_extension.load
    monkeypatch.setattr(
        cpp_extension, "load", lambda **kwargs: (seen.append(shutil.which("ninja")), build(**kwargs))[1]
    )
    _extension._jit_library()
    assert seen == [shutil.which("ninja", path=ninja.BIN_DIR)] and seen[0] is not None
    assert os.environ["PATH"] == os.devnull  # restored after the build


def test_unwritable_cache_is_named(fake_build, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")  # a directory below a file cannot be made, even by root
    monkeypatch.setenv("FASTFUSION_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    with pytest.raises(_extension._Unavailable, match="set FASTFUSION_CACHE_DIR to a writable directory") as raised:
        _extension._jit_library()
    assert str(_build_dir()) in str(raised.value) and fake_build.calls == 0


def test_ahead_of_time_library_for_another_torch_without_sources_names_both_versions(monkeypatch, tmp_path):
    monkeypatch.setattr(_extension, "_PACKAGE_DIR", tmp_path)
    monkeypatch.setattr(_extension, "_SOURCE_DIR", tmp_path / "no-sources")
    (tmp_path / f"{_extension.AOT_MODULE}.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (tmp_path / _extension.AOT_TORCH_VERSION_FILE).write_text("0.0.1\n")
    reason = _extension._load()
    assert f"built for torch 0.0.1, not the running torch {torch.__version__}" in reason, reason
    assert "sources are not installed" in reason


# The child builds nothing: its "rebuild" copies a good library into the cache, which is what
# the build would produce, and runs an op through "auto" on the result.
_CHILD = """
import json, shutil, sys, warnings
import torch
import fastfusion as ff, fastfusion.cpp_backend
from fastfusion import _dispatch, _extension as e
from torch.utils import cpp_extension

e._PACKAGE_DIR = e.pathlib.Path('/nonexistent')  # no ahead-of-time library
rebuilds = []
def rebuild(name, build_directory, **kwargs):
    rebuilds.append(build_directory)
    return shutil.copy(sys.argv[1], e.os.path.join(build_directory, name + '.so'))
cpp_extension.load = rebuild
cpp_extension.verify_ninja_availability = lambda: None
x = torch.randn(5, 11, dtype=torch.float64)
with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter('always')
    out = ff.signed_sqrt_l2(x, backend='auto')
print(json.dumps({
    'backend': _dispatch.resolve_backend('signed_sqrt_l2', 'cpu', 'auto'),
    'matches': torch.allclose(out, ff.signed_sqrt_l2(x, backend='torch'), rtol=1e-12, atol=0),
    'rebuilds': len(rebuilds),
    'warnings': [str(w.message) for w in record if str(w.message).startswith('fastfusion')],
}))
"""


def test_truncated_library_is_rebuilt_not_loaded(tmp_path):
    reason = _extension.unavailable_reason()  # a real library for this torch, built or cached
    if reason is not None and "no C++ compiler" in reason:
        pytest.skip(f"the C++ extension cannot be built here: {reason}")
    assert reason is None, reason
    good = tmp_path / LIBRARY
    shutil.copy(_extension._loaded_path, good)
    build_dir = tmp_path / "cache" / _build_dir().name
    build_dir.mkdir(parents=True)
    shutil.copy(good, build_dir / LIBRARY)
    (build_dir / "complete").write_text(_record(build_dir / LIBRARY))
    _truncate(build_dir)
    env = {**os.environ, "FASTFUSION_CACHE_DIR": str(tmp_path / "cache"), "CXX": sys.executable}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(good)], check=False, capture_output=True, text=True, env=env, timeout=300
    )
    assert child.returncode == 0, f"the child died ({child.returncode}): {child.stderr[-3000:]}"
    result = json.loads(child.stdout.splitlines()[-1])
    assert result["backend"] == "cpp" and result["matches"] and result["rebuilds"] == 1, result
    assert len(result["warnings"]) == 1 and f"{build_dir / LIBRARY} has" in result["warnings"][0], result
    assert "rebuilding" in result["warnings"][0]
