"""benchmarks/gpu_check.sh and its helpers, on the CPU: the scripts' syntax (and shellcheck's
verdict where it is installed), the wheel check of gpu_wheels.sh, and a dry run
(GPU_CHECK_DRY_RUN=1) of every step, in a copy of the tree without git as the GPU machine gets
it, at tiny sizes."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["benchmarks/gpu_check.sh", "benchmarks/gpu_wheels.sh", "benchmarks/compat_check.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(REPO / script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_pass_shellcheck(script):
    done = subprocess.run(["shellcheck", str(REPO / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


# --------------------------------------------------------------------------- wheels


def make_wheel(directory: Path, name: str, version: str, requires: list[str] = ()) -> Path:
    """A minimal valid pure-Python wheel holding module ``name`` (pip checks RECORD's hashes)."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": "VALUE = 1\n",
        f"{info}/METADATA": "\n".join(
            ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
        ) + "\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }

    def record_line(path: str, text: str) -> str:
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        return f"{path},sha256={digest},{len(text.encode())}"

    files[f"{info}/RECORD"] = "\n".join([*(record_line(p, t) for p, t in files.items()), f"{info}/RECORD,,"]) + "\n"
    path = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
    return path


def test_check_wheels_finds_uncovered_requirements_and_duplicates(tmp_path):
    # Markers are those of the GPU image's Python 3.12: an old-Python or extra requirement is no need.
    make_wheel(tmp_path, "alpha", "1.0", ["beta>=1", "NumPy", "dataclasses; python_version < '3.7'", "gamma; extra == 'x'"])
    assert gpu_check.uncovered_requirements(tmp_path) == ["alpha-1.0-py3-none-any.whl: beta>=1"]
    make_wheel(tmp_path, "beta", "1.0")
    assert gpu_check.uncovered_requirements(tmp_path) == [] and gpu_check.duplicate_wheels(tmp_path) == []
    make_wheel(tmp_path, "Beta", "2.0")
    assert gpu_check.duplicate_wheels(tmp_path) == ["Beta-2.0-py3-none-any.whl, beta-1.0-py3-none-any.whl"]


# --------------------------------------------------------------------------- dry run

# What the device tool brings back from $OUT: at most 8 files, two folders down, plain names.
OUT_NAME = re.compile(r"[A-Za-z0-9._-]+")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    """The tree as the GPU machine gets it: no git, no build outputs; one tiny wheel in .whl/."""
    copy = tmp_path_factory.mktemp("gpu") / "tree"
    ignore = shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".whl", "results")
    shutil.copytree(REPO, copy, ignore=ignore)
    (copy / ".whl").mkdir()
    make_wheel(copy / ".whl", "carried", "0.1")
    return copy


def dry_run(tree: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    variables = {
        **os.environ,
        "OUT": str(out),
        "GPU_CHECK_DRY_RUN": "1",
        "GPU_CHECK_COMMIT": COMMIT,
        # One kernel test and one benchmark case: the steps are under test, not the kernels.
        "GPU_CHECK_TESTS": "tests/test_count_sketch.py::test_deterministic[triton]",
        "GPU_CHECK_BENCH_ARGS": "--tiny --compile-backend eager --ops count_sketch --providers eager torch",
        **env,
    }
    return subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=tree, env=variables, capture_output=True, text=True)


def steps(out: Path) -> dict[str, list[str]]:
    rows = re.findall(r"^\| (\w+) \| ([^|]+) \| (\d+) \| (.*) \|$", (out / "summary.md").read_text(), re.M)
    return {name: [status.strip(), detail.strip()] for name, status, _, detail in rows if name != "step"}


def test_dry_run_runs_every_step_and_brings_back_what_the_device_tool_can(tree_copy, tmp_path):
    out = tmp_path / "out"
    done = dry_run(tree_copy, out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert done.stdout.rstrip().endswith(summary.rstrip())  # printed last
    found = steps(out)
    for name in ("wheels", "install", "versions", "tests", "bench"):
        assert found[name][0] == "ok", (name, found[name])
    assert re.search(r"\b1 passed\b", found["tests"][1]), found["tests"]
    assert found["roofline"][0] == "ok", found["roofline"]
    assert "# Roofline model vs measurement" in summary  # the model's error per kernel, in the summary
    assert f"- commit: {COMMIT}" in summary and f"- fastfusion: {tree_copy / 'fastfusion'}" in summary

    (measured,) = (out / "bench").glob("*.json")
    data = json.loads(measured.read_text())
    assert data["header"]["git_commit"] == COMMIT  # no git in the copy: the commit passed in
    assert sorted((r["mode"], r["provider"]) for r in data["rows"]) == [
        (mode, provider) for mode in ("forward", "forward+backward") for provider in ("eager", "torch")
    ]
    assert all(r["error"] is None for r in data["rows"])

    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8
    for path in files:
        parts = path.relative_to(out).parts
        assert len(parts) <= 3 and all(OUT_NAME.fullmatch(part) for part in parts), path


def test_dry_run_respects_its_deadline(tree_copy, tmp_path):
    # With no time left every step is skipped, the check fails, and the summary still comes.
    out = tmp_path / "out"
    done = dry_run(tree_copy, out, GPU_CHECK_BUDGET_S="5")
    assert done.returncode == 1
    found = steps(out)
    for name in ("wheels", "install", "versions", "tests", "bench"):
        assert found[name] == ["SKIPPED", "no time left before the deadline"], (name, found[name])
