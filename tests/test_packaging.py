"""fastfusion as a user installs it, and the report of what an installation can run.

The distributions are built from a copy of this checkout the way a user's pip builds them,
offline and without build isolation (so no second torch is fetched): the sdist through
setuptools' PEP 517 hook (what ``python -m build --sdist`` calls), the wheel by ``pip wheel``
*from that sdist*, which shows the sdist is complete enough to build from. The wheel goes
into a fresh venv that sees this interpreter's packages (torch is not installed again), and a
child process run outside the checkout imports it from the venv and runs the "cpp" backend:
the just-in-time build from the sources shipped in the wheel. It uses the suite's build cache
(FASTFUSION_CACHE_DIR as this process resolves it); the cache key hashes the sources' names
and contents, not their paths, so the installed copies of unchanged sources reuse the build.

``python -m fastfusion.info`` must never build silently: without ``--build`` an empty cache
is reported as "not built (will build on first use ...)".
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest
import torch

import fastfusion
from fastfusion import _extension, info

ROOT = pathlib.Path(__file__).resolve().parent.parent
# What a checkout may hold besides its sources: build outputs, caches, environments.
_NOT_SOURCES = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".benchmarks", ".venv", ".whl"
)


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, check=False, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, (
        f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel, build output): the sdist of a copy of this checkout, the wheel built from it."""
    tmp = tmp_path_factory.mktemp("dists")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCES)
    hook = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    sdist_build = _run([sys.executable, "-c", hook, str(tmp / "sdist")], cwd=src)
    sdist = tmp / "sdist" / sdist_build.stdout.strip().splitlines()[-1]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    wheel_build = _run(
        [*pip, "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir",
         "-w", str(tmp / "wheel"), str(sdist)]
    )  # fmt: skip
    (wheel,) = (tmp / "wheel").glob("fastfusion-*.whl")
    output = sdist_build.stdout + sdist_build.stderr + wheel_build.stdout + wheel_build.stderr
    return sdist, wheel, output


def test_builds_give_no_deprecation_warning(dists):
    _, _, output = dists
    assert "Deprecat" not in output, output[-3000:]  # e.g. setuptools' warnings on a TOML license table


def test_sdist_holds_the_sources_tests_and_their_helpers(dists):
    sdist, _, _ = dists
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {name.removeprefix(top + "/") for name in tar.getnames()}
    csrc = {p.relative_to(ROOT).as_posix() for p in (ROOT / "fastfusion" / "csrc").rglob("*") if p.is_file()}
    tests = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("*.py")}
    assert {"tests/conftest.py", "tests/helpers.py", "tests/oracles.py", "tests/models/fake_corpora.py"} <= tests
    python = {p.relative_to(ROOT).as_posix() for d in ("benchmarks", "models") for p in (ROOT / d).rglob("*.py")}
    docs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md")}  # the README links them
    assert docs
    missing = (csrc | tests | python | docs | {"LICENSE", "pyproject.toml", "setup.py", "MANIFEST.in"}) - names
    assert not missing, sorted(missing)
    assert not [n for n in names if "/results/" in n or n.endswith((".so", ".pyc"))]  # outputs stay out


def test_wheel_holds_the_cpp_sources_and_the_license(dists):
    _, wheel, _ = dists
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        fields = whl.read(metadata).decode().split("\n\n", 1)[0].splitlines()
    csrc = {p.relative_to(ROOT).as_posix() for p in (ROOT / "fastfusion" / "csrc" / "cpu").iterdir()}
    assert csrc and csrc <= names, sorted(csrc - names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: MIT" in fields
    assert {"Requires-Dist: ninja", "Requires-Dist: filelock"} <= set(fields)
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "models/"))]


# Run by the venv's interpreter from a directory outside the checkout.
_SMOKE = """
import json, sys, torch
import fastfusion as ff
from fastfusion import _extension, info
x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
cotangent = torch.randn(5, 9, dtype=torch.float64)
out = ff.signed_sqrt_l2(x, backend="cpp")
(grad,) = torch.autograd.grad(out, x, cotangent)
expected = ff.signed_sqrt_l2(x, backend="eager")
(expected_grad,) = torch.autograd.grad(expected, x, cotangent)
print(json.dumps({
    "fastfusion": ff.__file__,
    "sources": str(_extension._SOURCE_DIR),
    "loaded": _extension._loaded_path,
    "matches": torch.allclose(out, expected, rtol=1e-12, atol=0)
    and torch.allclose(grad, expected_grad, rtol=1e-10, atol=0),
    "cpp": dict(info.report())["backend cpp"],
}))
"""


def test_wheel_in_a_fresh_venv_runs_the_cpp_backend(dists, tmp_path):
    ready, why = _extension.state()
    if ready is False and ("no C++ compiler" in why or "ninja" in why):
        pytest.skip(f"the C++ extension cannot be built here: {why}")
    _, wheel, _ = dists
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    # --force-reinstall: this interpreter's (editable) fastfusion of the same version is visible
    # to the venv; pip leaves it alone ("outside environment") and installs the wheel beside it.
    _run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(python), "install",
         "--no-deps", "--no-index", "--no-cache-dir", "--force-reinstall", str(wheel)]
    )  # fmt: skip
    cache = _extension._cache_root()
    build_dir = cache / _extension._build_dir(_extension._sources()).name
    try:
        cached = _extension._published_library(build_dir) is not None
    except _extension._BrokenEntry:
        cached = False
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "FASTFUSION_BACKEND")}
    env["FASTFUSION_CACHE_DIR"] = str(cache)
    work = tmp_path / "elsewhere"
    work.mkdir()
    child = _run([str(python), "-c", _SMOKE], cwd=work, env=env)
    result = json.loads(child.stdout.splitlines()[-1])
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert result["fastfusion"] == str(site / "fastfusion" / "__init__.py"), result  # not the checkout
    assert result["sources"] == str(site / "fastfusion" / "csrc" / "cpu"), result
    assert result["matches"], result
    assert result["loaded"] == str(build_dir / (_extension._NAME + ".so")), result
    assert result["cpp"].startswith("ready: loaded from"), result
    if cached:  # the installed sources hash as the checkout's do: the suite's build is reused
        assert "building the C++ extension" not in child.stderr, child.stderr


# --------------------------------------------------------------------------- fastfusion.info


def test_info_without_build_reports_not_built_and_builds_nothing(tmp_path):
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "FASTFUSION_BACKEND"}
    env.update(FASTFUSION_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    result = _run([sys.executable, "-m", "fastfusion.info"], env=env, cwd=tmp_path)
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in result.stdout.splitlines())  # label  value
    cpp = rows["backend cpp"]
    if not cpp.startswith("unavailable: no C++ compiler"):
        assert cpp.startswith("not built (will build on first use") and str(cache) in cpp, cpp
    assert not cache.exists() or not any(cache.rglob("*.so")), "info built the extension"
    assert "building" not in result.stderr, result.stderr
    assert rows["torch"] == torch.__version__ and rows["fastfusion"].startswith(fastfusion.__version__)


def test_info_reports_versions_cpu_and_threads():
    rows = info.report()
    labels = [label for label, _ in rows]
    assert labels[:7] == ["fastfusion", "python", "torch", "triton", "platform", "CPU capability", "threads"]
    values = dict(rows)
    assert values["CPU capability"].startswith(torch.backends.cpu.get_cpu_capability())
    assert values["threads"].startswith(f"{torch.get_num_threads()} torch intra-op threads")
    assert values["python"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}.")
    assert values["fastfusion"] == f"{fastfusion.__version__} ({pathlib.Path(fastfusion.__file__).parent})"
    assert any(v.startswith("cpu (") for label, v in rows if label == "device")
    assert {"backend torch", "backend eager", "backend cpp", "backend triton", "backend cuda"} <= set(values)


def test_info_names_a_missing_compiler_and_triton(monkeypatch, tmp_path):
    monkeypatch.setattr(_extension, "_status", _extension._UNTRIED)
    monkeypatch.setattr(_extension, "_PACKAGE_DIR", tmp_path)  # no ahead-of-time build
    monkeypatch.setenv("FASTFUSION_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "no-such-compiler-fastfusion")
    monkeypatch.setattr(info, "_triton_version", lambda: None)
    values = dict(info.report())
    assert values["backend cpp"] == (
        "unavailable: no C++ compiler: 'no-such-compiler-fastfusion' is not on PATH (set CXX to use another)"
    )
    assert values["backend triton"].startswith("missing: Triton is not installed")
    assert _extension._status is _extension._UNTRIED  # asked, not tried


def test_info_build_loads_the_extension(capsys):
    ready, why = _extension.state()
    if ready is False and ("no C++ compiler" in why or "ninja" in why):
        pytest.skip(f"the C++ extension cannot be built here: {why}")
    assert info.main(["--build"]) == 0
    line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("backend cpp")]
    assert line and "ready: loaded from" in line[0], line
