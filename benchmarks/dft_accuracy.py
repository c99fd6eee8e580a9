"""How accurate a tensor-core DFT of compact bilinear pooling's length would be: the evidence
behind benchmarks/README.md's note on a fused vector-CBP kernel (issue 14, item 2).

A length-N DFT, N = N1 N2, as two matmuls with the N1- and N2-point DFT matrices around a
twiddle multiply (the four-step / Monarch decomposition FlashFFTConv runs on tensor cores), or
at three levels, N = N1 N2 N3, with the length-N2 N3 row DFT itself decomposed the same way
(what the fused vector-CBP kernel runs for d >= 4096),
with the operands of each matmul rounded as tensor cores round them (TF32: 10 mantissa bits,
bf16: 7) and float32 accumulation (emulated: float64 products of the rounded operands, the
sum rounded to float32), once, or three times with hi/lo splits of both operands
(hi*hi + hi*lo + lo*hi, the "3xTF32" scheme). Input: the count sketch of a random 2048-vector,
as compact_bilinear[vec]'s. Printed: ||X - X_64|| / ||X_64|| for each, beside torch.fft in float32.

    python -m benchmarks.dft_accuracy [--n1 128] [--n2 128] [--n3 1] [--seed 0]

(--n1 32 --n2 32 --n3 16: the three-level rows at d = 16384.)
"""

from __future__ import annotations

import argparse

import torch


def _round_tf32(t: torch.Tensor) -> torch.Tensor:
    bits = t.float().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).double()  # round to nearest, 10 bits


def _round_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).double()


ROUNDINGS = {"tf32": _round_tf32, "bf16": _round_bf16}


def _complex_round(z: torch.Tensor, rounding) -> torch.Tensor:
    return torch.complex(rounding(z.real), rounding(z.imag))


def _matmul(a: torch.Tensor, b: torch.Tensor, rounding, passes: int) -> torch.Tensor:
    """a @ b (complex) on rounded operands with float32 sums; 3 passes: split hi/lo operands."""
    a_hi, b_hi = _complex_round(a, rounding), _complex_round(b, rounding)
    pairs = [(a_hi, b_hi)] if passes == 1 else [(a_hi, b_hi), (a_hi, b - b_hi), (a - a_hi, b_hi)]
    out = 0
    for x, y in pairs:
        x, y = _complex_round(x, rounding), _complex_round(y, rounding)
        re = (x.real @ y.real - x.imag @ y.imag).float().double()
        im = (x.real @ y.imag + x.imag @ y.real).float().double()
        out = out + torch.complex(re, im)
    return out


def _dft_rows(a: torch.Tensor, factors: tuple[int, ...], rounding, passes: int) -> torch.Tensor:
    """The DFT of every row of a (R, N), N = prod(factors), frequencies in natural order. One
    factor: a @ F_N. More: n = M j1 + j2 with M = N / N1 the rest, then
    X[k1 + N1 k2] = sum_j2 w_M^(j2 k2) w_N^(j2 k1) sum_j1 w_N1^(j1 k1) a[M j1 + j2],
    the inner sums one matmul, the outer ones the rest's DFT of each row, recursively."""
    rows, n = a.shape
    n1, m = factors[0], n // factors[0]
    r1 = torch.arange(n1, dtype=torch.float64)
    f1 = torch.exp(-2j * torch.pi * torch.outer(r1, r1) / n1)
    if len(factors) == 1:
        return _matmul(a, f1, rounding, passes)
    rm = torch.arange(m, dtype=torch.float64)
    twiddle = torch.exp(-2j * torch.pi * torch.outer(rm, r1) / n)  # [j2, k1]
    t = _matmul(a.reshape(rows, n1, m).transpose(1, 2).reshape(rows * m, n1), f1, rounding, passes)
    t = (t.reshape(rows, m, n1) * twiddle).transpose(1, 2).reshape(rows * n1, m)  # [(r, k1), j2]
    t = _dft_rows(t, factors[1:], rounding, passes).reshape(rows, n1, m)  # [r, k1, k2]
    return t.transpose(1, 2).reshape(rows, n)  # k1 + N1 k2


def four_step_dft(x: torch.Tensor, n1: int, n2: int, rounding, passes: int, n3: int = 1) -> torch.Tensor:
    """The DFT of x (length N1 N2 N3) at two levels (N3 = 1: the four-step decomposition) or
    three (the row DFT of length N2 N3 decomposed again), every matmul on rounded operands."""
    factors = (n1, n2) if n3 == 1 else (n1, n2, n3)
    return _dft_rows(x.reshape(1, -1).to(torch.complex128), factors, rounding, passes).reshape(-1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dft_accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n1", type=int, default=128)
    parser.add_argument("--n2", type=int, default=128)
    parser.add_argument("--n3", type=int, default=1, help="1: two levels; else the third level's length")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n = args.n1 * args.n2 * args.n3
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.zeros(n, dtype=torch.float64)
    x.index_add_(0, torch.randint(0, n, (2048,), generator=gen), torch.randn(2048, generator=gen, dtype=torch.float64))
    exact = torch.fft.fft(x)

    def error(y: torch.Tensor) -> float:
        return ((y - exact).abs().norm() / exact.abs().norm()).item()

    shape = f"{args.n1} x {args.n2}" + (f" x {args.n3}" if args.n3 > 1 else "")
    print(f"length {n} = {shape}, relative error against float64:")
    print(f"  torch.fft, float32:        {error(torch.fft.fft(x.float()).to(torch.complex128)):.2e}")
    for name, rounding in ROUNDINGS.items():
        for passes in (1, 3):
            label = f"{name}, {passes} pass{'es' if passes > 1 else ''}:"
            dft = four_step_dft(x, args.n1, args.n2, rounding, passes, args.n3)
            print(f"  {'four-step' if args.n3 == 1 else 'three-level'}, {label:<15} {error(dft):.2e}")


if __name__ == "__main__":
    main()
