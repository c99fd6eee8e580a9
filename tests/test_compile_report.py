"""The Triton kernels compiled for an H100 (sm_90) at the benchmarks' GPU shapes, on the CPU,
by ``python -m benchmarks.compile_report``: no config the autotuner may pick spills
registers or asks for more shared memory than a Hopper SM gives one program.

Only one dtype is compiled (every kernel's every config in it), to bound the time; the full
report, every dtype and sm_80 too, is benchmarks/results/compile-report.md.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.compile_report import mma_kinds
from benchmarks.ops import MODES
from benchmarks.shapes import KERNELS

REPO = Path(__file__).resolve().parent.parent
# float32's dots run on CUDA cores, whose operand tiles live in registers: the dtype that
# spills first (the bfloat16 and float16 tensor-core builds spilled a subset of its configs).
DTYPE = "float32"
HOPPER_SHARED_MEMORY = 227 * 1024  # the most dynamic shared memory one program may request


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compile-report")
    # conftest.py sets TRITON_INTERPRET=1 for this process; under it there is nothing to
    # compile, and fastfusion keeps only the first autotune config.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_report", "--arch", "90", "--dtypes", DTYPE,
         "--out-dir", str(out), "--jobs", "2"],
        cwd=REPO, env=env, check=True,
    )
    return json.loads((out / "compile-report.json").read_text())


def test_report_covers_every_benchmark_case(report):
    uses = {use for row in report["rows"] for use in row["uses"]}
    assert uses == {f"{kernel} {mode}" for kernel in KERNELS for mode in MODES}
    assert {row["arch"] for row in report["rows"]} == {"sm_90"}


def _fails(row: dict) -> bool:
    return "error" in row or row["spill_stores"] or row["spill_loads"] or row["shared"] > HOPPER_SHARED_MEMORY


def test_no_pickable_config_spills_or_overflows_shared_memory(report):
    bad = [
        f"{r['kernel']} [{r['config']}] {r['variant']}: "
        + (r["error"] if "error" in r else
           f"{r['registers']} registers, spill stores/loads {r['spill_stores']}/{r['spill_loads']} B, "
           f"shared {r['shared']} B")
        for r in report["rows"] if r["pickable"] and _fails(r)
    ]
    assert not bad, "configs the autotuner may pick that spill, overflow shared memory or fail:\n" + "\n".join(bad)


def test_float32_dots_run_on_cuda_cores_unless_split_into_tf32(report):
    # float32 dots at IEEE precision (TF32 not allowed) have no tensor-core form; "tf32x3"
    # ones (the fused vector CBP's: each operand split into two TF32 halves) are all MMAs.
    kinds = {}
    for row in report["rows"]:
        kinds.setdefault(row["precision"] == "tf32x3", set()).update(row["dots"])
    assert kinds[False] == {"fma"}
    assert kinds[True] and "fma" not in kinds[True], kinds


# Lines of Triton 3.9's TTGIR for sm_90 (tensor_fusion's dx kernel in bfloat16, and
# low_rank_fusion's forward kernel), operand types shortened.
_TTGIR = """
#blocked2 = #ttg.blocked<{sizePerThread = [4, 4], threadsPerWarp = [1, 32], warpsPerCTA = [8, 1]}>
#mma = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [2, 4], instrShape = [16, 8]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 2], instrShape = [16, 32, 16]}>
  %acc_128 = tt.dot %a_117, %b_127, %arg16 : tensor<32x32xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma}>> * \
tensor<32x32xbf16, #ttg.dot_op<{opIdx = 1, parent = #mma}>> -> tensor<32x32xf32, #mma> loc(#loc189)
  %acc_101 = tt.dot %part_99, %one_hot_100, %acc_49 : tensor<32x32xf32, #ttg.dot_op<{opIdx = 0, parent = \
#blocked2}>> * tensor<32x128xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked2}>> -> tensor<32x128xf32, #blocked2>
  %acc_129 = ttng.warp_group_dot %a_126, %b_128, %arg20 {isAsync = true} : !ttg.memdesc<64x32xbf16, #shared1> * \
!ttg.memdesc<32x64xbf16, #shared, #smem, mutable> -> tensor<64x64xf32, #mma1> loc(#loc135)
"""  # (a backslash-newline joins what TTGIR prints as one line)


def test_mma_kinds_reads_each_dot_layout():
    assert mma_kinds(_TTGIR) == ["mma.sync", "fma", "wgmma"]
