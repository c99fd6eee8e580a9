"""Where compact bilinear pooling's Gram path overtakes its FFT path in the "cpp" backend.

Times fastfusion.compact_bilinear(..., backend="cpp", pool_dim=1, normalize=True) in float32
with algorithm="fft" and "gram", forward alone (under no_grad) and forward + backward, at the
shapes given (default: SHAPES), and prints a markdown table of medians. The two algorithms of a
shape take turns within one run (fastfusion.timing.measure), so that load from other processes
falls on both alike; compare ratios, not runs. The table is what the CPU constants of
fastfusion.ops.compact_bilinear.algorithm_costs are calibrated from.

    python -m benchmarks.gram_crossover [--shape B,T,n1,n2,d ...] [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import time

import torch

import fastfusion as ff
from fastfusion.timing import measure

# (B, T, n1, n2, d); the first is the CPU benchmark shape compact_bilinear[seq] (declared in fastfusion/ops/compact_bilinear.py).
SHAPES = (
    (8, 49, 256, 256, 4096),
    (8, 196, 256, 256, 4096),
    (8, 9, 512, 512, 8192),
    (64, 1, 512, 1024, 8192),
    (4, 49, 128, 128, 2048),
    (32, 16, 128, 128, 4096),
    (8, 49, 512, 512, 8192),
    (2, 784, 512, 512, 8192),
)
ALGORITHMS = ("fft", "gram")
MIN_ROUNDS = 25  # samples per median at least


def _calls(shape):
    """name -> zero-argument call, for both algorithms, forward and forward + backward."""
    B, T, n1, n2, d = shape
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(B, T, n, generator=gen).requires_grad_() for n in (n1, n2)]
    hashes = [torch.randint(0, d, (n,), generator=gen) for n in (n1, n2)]
    signs = [torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1 for n in (n1, n2)]
    cotangent = torch.randn(B, d, generator=gen)

    def run(algorithm):
        return ff.compact_bilinear(xs, hashes, signs, d, pool_dim=1, backend="cpp", algorithm=algorithm)

    def forward(algorithm):
        with torch.no_grad():
            return run(algorithm)

    calls = {}
    for algorithm in ALGORITHMS:
        calls[f"{algorithm} forward"] = lambda a=algorithm: forward(a)
        calls[f"{algorithm} forward+backward"] = lambda a=algorithm: torch.autograd.grad(run(a), xs, cotangent)
    return calls


def time_shape(shape, budget_s: float) -> dict[str, float]:
    """Median milliseconds of each call of :func:`_calls`."""
    calls = _calls(shape)
    slowest = 0.0
    for fn in calls.values():  # warm-up, and the longest call, so that every median has MIN_ROUNDS samples
        fn()
        start = time.perf_counter()
        fn()
        slowest = max(slowest, time.perf_counter() - start, 1e-3)
    timings = measure(calls, torch.device("cpu"), max(budget_s, MIN_ROUNDS * slowest))
    return {name: t.p50_ms for name, t in timings.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", help="B,T,n1,n2,d (repeatable; default: the built-in list)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timing per shape, at least")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else SHAPES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, normalize=True, medians in ms\n")
    print("| B | T | n1 | n2 | d | fft fwd | gram fwd | fwd speed-up | fft fwd+bwd | gram fwd+bwd | fwd+bwd speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        ms = time_shape(shape, args.budget)
        fwd = (ms["fft forward"], ms["gram forward"])
        both = (ms["fft forward+backward"], ms["gram forward+backward"])
        cells = [*map(str, shape), f"{fwd[0]:.3f}", f"{fwd[1]:.3f}", f"{fwd[0] / fwd[1]:.2f}x",
                 f"{both[0]:.3f}", f"{both[1]:.3f}", f"{both[0] / both[1]:.2f}x"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
