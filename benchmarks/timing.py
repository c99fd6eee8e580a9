"""Timing, peak memory and copy bandwidth, on CPU and CUDA.

Timing. CUDA: ``triton.testing.do_bench``: CUDA events around every call, the L2 cache
flushed before each, warm-up excluded. CPU: ``time.perf_counter`` around batches of calls
(each batch >= 1 ms, far above the clock's resolution) after the caller's warm-up, the
functions being compared taking turns, with the garbage collector paused as in
``timeit``, at torch's default thread count. Both report the 20th, 50th and 80th
percentiles of the per-call time.

Peak memory: the most memory a call holds beyond what existed before it, outputs
included. CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call.
CPU: the same quantity from the allocation events of ``torch.profiler`` (profile_memory),
replayed in time order; they cover every tensor from PyTorch's CPU allocator, not
scratch memory that libraries (MKL, pocketfft, oneDNN) allocate themselves.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Any, Callable

import torch


@dataclasses.dataclass(frozen=True)
class Timing:
    p20_ms: float
    p50_ms: float
    p80_ms: float


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns: dict[str, Callable[[], Any]], device: torch.device, budget_s: float) -> dict[str, Timing | Exception]:
    """Per-call time percentiles of each of ``fns``; a function that raises gets its
    exception instead.

    CUDA: ``budget_s`` seconds of do_bench each. CPU: the functions take turns, one batch
    each per round, so that load from outside the process (a shared machine, a change of
    clock frequency) falls on all of them alike and their ratios stay fair; the slowest
    gets about ``budget_s`` seconds, every one the same number of samples (10 to 500).
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        results: dict[str, Timing | Exception] = {}
        for name, fn in fns.items():
            try:
                warmup_ms, rep_ms = max(1, round(budget_s * 250)), max(1, round(budget_s * 1000))
                p20, p50, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
                results[name] = Timing(p20, p50, p80)
            except Exception as exc:
                results[name] = exc
        return results
    return _measure_cpu(fns, budget_s)


def _measure_cpu(
    fns: dict[str, Callable[[], Any]], budget_s: float, min_rounds: int = 10, max_rounds: int = 500
) -> dict[str, Timing | Exception]:
    failed: dict[str, Exception] = {}
    plans: dict[str, tuple[int, float]] = {}  # calls per batch, seconds per call
    for name, fn in fns.items():  # size batches of >= 1 ms (warm-up is the caller's)
        try:
            start, calls = time.perf_counter(), 0
            while calls < 1 or time.perf_counter() - start < budget_s / 10:
                fn()
                calls += 1
        except Exception as exc:
            failed[name] = exc
            continue
        per_call = (time.perf_counter() - start) / calls
        plans[name] = max(1, round(1e-3 / per_call)), per_call
    if not plans:
        return failed
    slowest = max(batch * per_call for batch, per_call in plans.values())
    rounds = min(max_rounds, max(min_rounds, round(budget_s / slowest)))
    times: dict[str, list[float]] = {name: [] for name in plans}
    gc.disable()
    try:
        for _ in range(rounds):
            for name in list(times):
                batch, _ = plans[name]
                fn = fns[name]
                try:
                    t0 = time.perf_counter()
                    for _ in range(batch):
                        fn()
                    times[name].append((time.perf_counter() - t0) / batch)
                except Exception as exc:
                    failed[name] = exc
                    del times[name]
    finally:
        gc.enable()
    results: dict[str, Timing | Exception] = dict(failed)
    for name, samples in times.items():
        deciles = statistics.quantiles(samples, n=10, method="inclusive")
        results[name] = Timing(deciles[1] * 1e3, deciles[4] * 1e3, deciles[7] * 1e3)
    return results


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by one call of ``fn`` beyond the memory in use before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        del result
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def copy_bandwidth(device: torch.device, budget_s: float) -> dict[str, float]:
    """Device memory bandwidth of ``dst.copy_(src)`` (bytes read + written per second), the
    ceiling a bandwidth-bound kernel can hope for: 256 MiB on CUDA (far beyond L2), 64 MiB
    on CPU (beyond last-level caches)."""
    nbytes = (256 if device.type == "cuda" else 64) * 2**20
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: first-touch page faults are not bandwidth
    timing = measure({"copy": lambda: dst.copy_(src)}, device, budget_s)["copy"]
    if isinstance(timing, Exception):
        raise timing
    return {"bytes": nbytes, "gb_per_s": 2 * nbytes / (timing.p50_ms * 1e-3) / 1e9}
