"""Time your own functions the way fastfusion's benchmarks do: per-call medians with the
20th and 80th percentiles, the functions being compared taking turns.

    from fastfusion.timing import measure
    results = measure({"fused": lambda: fused(x), "eager": lambda: eager(x)}, device, budget_s=1.0)
    results["fused"].p50_ms                     # or the exception that call raised

CUDA: ``triton.testing.do_bench``: CUDA events around every call, the L2 cache flushed
before each, warm-up excluded. CPU: batches of calls (each >= 1 ms, far above the clock's
resolution) timed by ``timeit`` (``time.perf_counter``, the garbage collector paused),
their size from ``torch.utils.benchmark``'s ``blocked_autorange``, after the caller's
warm-up, the functions taking turns one batch each per round (so that load from outside
the process falls on all of them alike), at the caller's thread count. Both report the
20th, 50th and 80th percentiles of the per-call time (:class:`Timing`, milliseconds).
Warm up (compile, autotune, first-touch) before calling :func:`measure`.
"""

from __future__ import annotations

import dataclasses
import statistics
import timeit
from typing import Any, Callable

import torch
import torch.utils.benchmark

__all__ = ["Timing", "measure", "synchronize"]


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
