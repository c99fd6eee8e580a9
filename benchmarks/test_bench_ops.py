"""pytest-benchmark suite: every kernel x provider x mode on the available device.

    pytest benchmarks/ --benchmark-only [--benchmark-autosave] [--benchmark-compare]

Shapes: the cpu-quick set on CPU, the GPU set on CUDA (see shapes.py). Each eager
variant of count sketch is its own benchmark ("eager[index_add]", ...). pytest-benchmark
times wall-clock calls; on CUDA every timed call ends with a device synchronize, so a
sample is the full latency of one call (launch included) with the GPU idle at its start.
The report CLI (python -m benchmarks.run) times with CUDA events instead and adds errors,
memory and bandwidth; this suite is for tracking the timings across commits.

Not under tests/: plain ``pytest`` (testpaths = tests) never collects it.
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks import ops
from benchmarks.shapes import KERNELS, SHAPE_SETS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = SHAPE_SETS["cuda" if DEVICE.type == "cuda" else "cpu-quick"]


def _providers(kernel: str) -> list[str]:
    tiny = ops.make_case(kernel, SHAPE_SETS["tiny"][kernel], torch.float32, torch.device("cpu"))
    eager = ["eager"] if len(tiny.eager_variants) == 1 else [f"eager[{v}]" for v in tiny.eager_variants]
    return eager + list(ops.providers(DEVICE.type)[1:])


# Kernel-major, so that the single cached case below serves consecutive tests.
PARAMS = [(k, p, m) for k in KERNELS for p in _providers(k) for m in ops.MODES]


@functools.lru_cache(maxsize=1)
def _case(kernel: str):
    case = ops.make_case(kernel, SHAPES[kernel], torch.float32, DEVICE)
    grad_out, _ = ops.oracle(case)
    return case, grad_out, ops.flops(case)


def _fn(case: ops.Case, provider: str):
    if provider.startswith("eager"):
        variants = ops.eager_fns(case)
        return variants[provider[len("eager[") : -1]] if provider != "eager" else next(iter(variants.values()))
    return ops.forward_fn(case, provider)


@pytest.mark.parametrize("kernel, provider, mode", PARAMS, ids=["-".join(p) for p in PARAMS])
def test_bench(benchmark, kernel, provider, mode):
    case, grad_out, flops = _case(kernel)
    run = ops.runner(case, _fn(case, provider), mode, grad_out)
    run()  # warm-up; compiles for torch.compile
    benchmark.group = f"{kernel} {mode}"
    benchmark.extra_info.update(device=str(DEVICE), sizes=case.sizes, flops=flops[mode])
    if DEVICE.type == "cuda":

        def timed():
            run()
            torch.cuda.synchronize(DEVICE)

        benchmark(timed)
    else:
        benchmark(run)
