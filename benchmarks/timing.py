"""Timing, peak memory and copy bandwidth, on CPU and CUDA.

Timing. CUDA: ``triton.testing.do_bench``: CUDA events around every call, the L2 cache
flushed before each, warm-up excluded. CPU: batches of calls (each >= 1 ms, far above the
clock's resolution) timed by ``timeit`` (``time.perf_counter``, the garbage collector
paused), their size from ``torch.utils.benchmark``'s ``blocked_autorange``, after the
caller's warm-up, the functions being compared taking turns, at the caller's thread count.
Both report the 20th, 50th and 80th percentiles of the per-call time.

Peak memory: the most memory a call holds beyond what existed before it, outputs
included. CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call.
CPU: the same quantity from the allocation events of ``torch.profiler`` (profile_memory),
replayed in time order; they cover every tensor from PyTorch's CPU allocator, not
scratch memory that libraries (MKL, pocketfft, oneDNN) allocate themselves.
The lines kineto (the profiler's C++ side) logs at each start and stop are kept off stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import statistics
import sys
import tempfile
import timeit
from typing import Any, Callable

import torch
import torch.utils.benchmark


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
    # torch.utils.benchmark times one statement at a time, so it sizes the batches here (and
    # warms up once more); the samples are taken in rounds, every function one batch per
    # round, which it cannot do: load from outside the process then falls on all alike.
    failed: dict[str, Exception] = {}
    plans: dict[str, tuple[timeit.Timer, int, float]] = {}  # timer, calls per batch, seconds per call
    for name, fn in fns.items():
        try:
            # num_threads: Timer's default is 1, the caller's count is what is measured.
            sizing = torch.utils.benchmark.Timer(
                "fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
            ).blocked_autorange(min_run_time=budget_s / 10)
        except Exception as exc:
            failed[name] = exc
            continue
        per_call = sizing.median
        plans[name] = timeit.Timer(fn), max(1, round(1e-3 / per_call)), per_call
    if not plans:
        return failed
    slowest = max(batch * per_call for _, batch, per_call in plans.values())
    rounds = min(max_rounds, max(min_rounds, round(budget_s / slowest)))
    times: dict[str, list[float]] = {name: [] for name in plans}
    for _ in range(rounds):
        for name in list(times):
            timer, batch, _ = plans[name]
            try:
                times[name].append(timer.timeit(batch) / batch)
            except Exception as exc:
                failed[name] = exc
                del times[name]
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

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _without_kineto_log():
        prof.start()
    try:
        result = fn()  # outside the filter: what the call itself prints reaches the terminal
    finally:
        with _without_kineto_log():
            prof.stop()
    del result
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


# What kineto, torch.profiler's C++ side, logs at every start and stop of a profile, e.g.
# "USDT:2026-12-01 20:51:23 914:914 SyncActivityProfilerHandler.cpp:52] profiler_start".
_KINETO_LOG = re.compile(r"USDT:.*\] profiler_(start|stop)$")


@contextlib.contextmanager
def _without_kineto_log():
    """File descriptor 2 goes to a temporary file for the duration; on exit, every line of it
    but kineto's start/stop lines is written to stderr. Kineto writes them from C++ to the
    descriptor, which neither sys.stderr nor warnings filters reach, and reads its log level
    (KINETO_LOG_LEVEL) only once, when torch is imported."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                sink.seek(0)
                lines = sink.read().decode(errors="replace").splitlines(keepends=True)
                kept = "".join(line for line in lines if not _KINETO_LOG.match(line.rstrip("\n")))
                if kept:
                    sys.stderr.write(kept)
                    sys.stderr.flush()
    finally:
        os.close(saved)


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
