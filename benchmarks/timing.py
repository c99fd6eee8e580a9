"""Peak memory and copy bandwidth, on CPU and CUDA; the timing itself is
:mod:`fastfusion.timing` (``measure``), which :mod:`models.experiments.compare` shares.

Peak memory: the most memory a call holds beyond what existed before it, outputs
included. CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call.
CPU: the same quantity from the allocation events of ``torch.profiler`` (profile_memory),
replayed in time order; they cover every tensor from PyTorch's CPU allocator, not
scratch memory that libraries (MKL, pocketfft, oneDNN) allocate themselves.
The lines kineto (the profiler's C++ side) logs at each start and stop are kept off stderr.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Any, Callable

import torch

# copy_bandwidth times with it; run.py and the harness tests reach it as timing.measure.
from fastfusion.timing import measure


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
