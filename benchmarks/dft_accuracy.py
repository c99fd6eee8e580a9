"""How accurate a tensor-core DFT of compact bilinear pooling's length would be: the evidence
behind benchmarks/README.md's note on a fused vector-CBP kernel (issue 14, item 2).

A length-N DFT, N = N1 N2, as two matmuls with the N1- and N2-point DFT matrices around a
twiddle multiply (the four-step / Monarch decomposition FlashFFTConv runs on tensor cores),
with the operands of each matmul rounded as tensor cores round them (TF32: 10 mantissa bits,
bf16: 7) and float32 accumulation (emulated: float64 products of the rounded operands, the
sum rounded to float32), once, or three times with hi/lo splits of both operands
(hi*hi + hi*lo + lo*hi, the "3xTF32" scheme). Input: the count sketch of a random 2048-vector,
as compact_bilinear[vec]'s. Printed: ||X - X_64|| / ||X_64|| for each, beside torch.fft in float32.

    python -m benchmarks.dft_accuracy [--n1 128] [--n2 128] [--seed 0]
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


def four_step_dft(x: torch.Tensor, n1: int, n2: int, rounding, passes: int) -> torch.Tensor:
    """X[k1 + n1 k2] = sum_{n2'} W_N2^{n2' k2} W_N^{n2' k1} sum_{n1'} W_N1^{n1' k1} x[n2 n1' + n2']."""
    n = n1 * n2
    r1, r2 = torch.arange(n1, dtype=torch.float64), torch.arange(n2, dtype=torch.float64)
    f1 = torch.exp(-2j * torch.pi * torch.outer(r1, r1) / n1)
    f2 = torch.exp(-2j * torch.pi * torch.outer(r2, r2) / n2)
    twiddle = torch.exp(-2j * torch.pi * torch.outer(r1, r2) / n)
    a = x.reshape(n1, n2).to(torch.complex128)
    d = _matmul(_matmul(f1, a, rounding, passes) * twiddle, f2, rounding, passes)
    return d.T.reshape(-1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dft_accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n1", type=int, default=128)
    parser.add_argument("--n2", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n = args.n1 * args.n2
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.zeros(n, dtype=torch.float64)
    x.index_add_(0, torch.randint(0, n, (2048,), generator=gen), torch.randn(2048, generator=gen, dtype=torch.float64))
    exact = torch.fft.fft(x)

    def error(y: torch.Tensor) -> float:
        return ((y - exact).abs().norm() / exact.abs().norm()).item()

    print(f"length {n} = {args.n1} x {args.n2}, relative error against float64:")
    print(f"  torch.fft, float32:        {error(torch.fft.fft(x.float()).to(torch.complex128)):.2e}")
    for name, rounding in ROUNDINGS.items():
        for passes in (1, 3):
            label = f"{name}, {passes} pass{'es' if passes > 1 else ''}:"
            print(f"  four-step, {label:<15} {error(four_step_dft(x, args.n1, args.n2, rounding, passes)):.2e}")


if __name__ == "__main__":
    main()
