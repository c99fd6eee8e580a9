"""Triton compact bilinear pooling (tensor sketch, pooled over positions, gated, normalised).

First version: fused Triton kernels around torch.fft (cuFFT on CUDA). On the canonical layout
xs[m] (B, T, n_m) -> (B, d), with K = d // 2 + 1 and the work dtype float32 (float64 for
float64 inputs; half inputs are transformed in float32):

forward
  1. gather sketch (one launch per modality)  xs[m] -> S (M, B*T, d)   read x once, write S
  2. torch.fft.rfft(S)                        -> F (M, B*T, K) complex
  3. product-pool kernel                      F -> P (B, K): prod_m F_m summed (mean: / T)
                                              over t in registers
  4. torch.fft.irfft(P, n=d)                  -> z (B, d)
  5. epilogue kernel (signed_sqrt_l2.py)      z * gate, signed sqrt, L2 norm, cast: one
                                              program per row, two passes over the row
backward (recomputes S and F rather than saving them: they are the large tensors)
  1-2. as forward                             S, F
  3-4. as forward, only with a gate or normalize: z (B, d)
  5. epilogue backward kernel                 grad -> dz (B, d), dgate (B, d)
  6. torch.fft.rfft(dz)                       -> G (B, K)
  7. adjoint-product kernel                   dF_k = G conj(prod_{m != k} F_m) (/ T), all k
                                              -> (M, B*T, K) complex
  8. torch.fft.irfft                          -> dS (M, B*T, d)
  9. gather adjoint (one launch per modality) dx_k[i] = s_k(i) dS_k[h_k(i)], cast to x's dtype

What this version still materialises: the per-position sketches S (M*B*T*d work-dtype values)
and spectra F (M*B*T*K complex), i.e. about 2 M B T d values; in the backward also dF and dS
of the same size. For pooled sequences (T > 1) these per-position tensors dominate memory
(the cbp_seq target wants them gone: an in-kernel DFT that pools spectra without writing
them is the planned next step). Only P, z and the output are per sample.

The FFTs are exact for any d (real transforms with n=d, odd d included); there is no size
restriction beyond 32-bit column indices (n_m, d < 2**31).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _dispatch
from ..ops._common import compute_dtype
from . import DEVICE_TYPES
from .count_sketch import adjoint_into, inverse_table, sketch_into
from .signed_sqrt_l2 import epilogue_backward, epilogue_forward

_BLOCK_FREQS = 256


@triton.jit
def _sample_and_frequencies(freqs, BLOCK: tl.constexpr):
    """This program's sample b and block of frequencies f (with its mask): one program per
    (sample, frequency block), frequency blocks fastest."""
    pid = tl.program_id(0)
    freq_blocks = tl.cdiv(freqs, BLOCK)
    f = (pid % freq_blocks) * BLOCK + tl.arange(0, BLOCK)
    return (pid // freq_blocks).to(tl.int64), f, f < freqs


@triton.jit
def _product_pool_kernel(
    f_ptr, out_ptr,
    positions, freqs,
    stride_f_modality, stride_f_row, stride_out_row,
    M: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr,
):
    # f is the real view of (M, B*T, K) complex spectra: real parts at 2f, imaginary at 2f+1.
    b, f, mask = _sample_and_frequencies(freqs, BLOCK)
    acc_re = tl.zeros((BLOCK,), dtype=out_ptr.dtype.element_ty)
    acc_im = tl.zeros((BLOCK,), dtype=out_ptr.dtype.element_ty)
    for t in range(0, positions):
        at = f_ptr + (b * positions + t) * stride_f_row + 2 * f
        re = tl.load(at, mask=mask, other=0.0)
        im = tl.load(at + 1, mask=mask, other=0.0)
        for m in tl.static_range(1, M):
            o_re = tl.load(at + m * stride_f_modality, mask=mask, other=0.0)
            o_im = tl.load(at + m * stride_f_modality + 1, mask=mask, other=0.0)
            re, im = re * o_re - im * o_im, re * o_im + im * o_re
        acc_re += re
        acc_im += im
    if MEAN:
        # Dividing by the integer T (not multiplying by a float 1/T, which Triton would pass
        # rounded to float32) keeps float64 exact.
        acc_re = acc_re / positions
        acc_im = acc_im / positions
    out = out_ptr + b * stride_out_row + 2 * f
    tl.store(out, acc_re, mask=mask)
    tl.store(out + 1, acc_im, mask=mask)


@triton.jit
def _adjoint_product_kernel(
    f_ptr, g_ptr, out_ptr,
    positions, freqs,
    stride_f_modality, stride_f_row, stride_g_row,
    M: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr,
):
    # out has f's layout: out_k = g conj(prod_{m != k} f_m) (/ T) for every modality k.
    b, f, mask = _sample_and_frequencies(freqs, BLOCK)
    g_at = g_ptr + b * stride_g_row + 2 * f
    g_re = tl.load(g_at, mask=mask, other=0.0)
    g_im = tl.load(g_at + 1, mask=mask, other=0.0)
    if MEAN:
        g_re = g_re / positions
        g_im = g_im / positions
    for t in range(0, positions):
        offset = (b * positions + t) * stride_f_row + 2 * f
        for k in tl.static_range(M):
            re = g_re
            im = g_im
            for m in tl.static_range(M):
                if m != k:
                    o_re = tl.load(f_ptr + offset + m * stride_f_modality, mask=mask, other=0.0)
                    o_im = tl.load(f_ptr + offset + m * stride_f_modality + 1, mask=mask, other=0.0)
                    re, im = re * o_re + im * o_im, im * o_re - re * o_im
            tl.store(out_ptr + offset + k * stride_f_modality, re, mask=mask)
            tl.store(out_ptr + offset + k * stride_f_modality + 1, im, mask=mask)


def _spectra(xs, hashes, signs, out_dim: int, work: torch.dtype) -> torch.Tensor:
    """(M, B*T, K, 2) real view of the rfft of every modality's count sketch."""
    batch, positions = xs[0].shape[:2]
    sketches = torch.empty((len(xs), batch * positions, out_dim), dtype=work, device=xs[0].device)
    for m, (x, h, s) in enumerate(zip(xs, hashes, signs)):
        sketch_into(sketches[m], x, inverse_table(h, s, out_dim))
    return torch.view_as_real(torch.fft.rfft(sketches, n=out_dim))


def _pooled_sketch(spectra: torch.Tensor, batch: int, out_dim: int, mean: bool) -> torch.Tensor:
    """(M, B*T, K, 2) spectra -> (B, d) pooled tensor sketch, one inverse FFT per sample."""
    modalities, rows, freqs, _ = spectra.shape
    positions = rows // batch
    pooled = torch.empty((batch, freqs, 2), dtype=spectra.dtype, device=spectra.device)
    _product_pool_kernel[(batch * triton.cdiv(freqs, _BLOCK_FREQS),)](
        spectra, pooled,
        positions, freqs,
        spectra.stride(0), spectra.stride(1), pooled.stride(0),
        M=modalities, MEAN=mean, BLOCK=_BLOCK_FREQS,
    )
    return torch.fft.irfft(torch.view_as_complex(pooled), n=out_dim)


def _forward(xs, hashes, signs, out_dim: int, mean: bool, gate, normalize: bool, eps: float, algorithm: str) -> torch.Tensor:
    if algorithm == "gram":
        raise NotImplementedError("TODO(gram helper)")
    work = compute_dtype(xs[0].dtype)
    z = _pooled_sketch(_spectra(xs, hashes, signs, out_dim, work), xs[0].shape[0], out_dim, mean)
    return epilogue_forward(z, gate, normalize, eps, xs[0].dtype)


def _backward(
    grad, xs, hashes, signs, out_dim: int, mean: bool, gate, normalize: bool, eps: float, algorithm: str
) -> list[torch.Tensor]:
    if algorithm == "gram":
        raise NotImplementedError("TODO(gram helper)")
    work = compute_dtype(xs[0].dtype)
    batch, positions = xs[0].shape[:2]
    spectra = _spectra(xs, hashes, signs, out_dim, work)
    grads_gate = []
    if gate is not None or normalize:
        z = _pooled_sketch(spectra, batch, out_dim, mean)
        grad, grad_gate = epilogue_backward(grad, z, gate, normalize, eps, work)
        if grad_gate is not None:
            grads_gate = [grad_gate]
    g_hat = torch.view_as_real(torch.fft.rfft(grad.to(work), n=out_dim))
    grad_spectra = torch.empty_like(spectra)
    modalities, _, freqs, _ = spectra.shape
    _adjoint_product_kernel[(batch * triton.cdiv(freqs, _BLOCK_FREQS),)](
        spectra, g_hat, grad_spectra,
        positions, freqs,
        spectra.stride(0), spectra.stride(1), g_hat.stride(0),
        M=modalities, MEAN=mean, BLOCK=_BLOCK_FREQS,
    )
    del spectra  # the (M, B*T, K) buffers are the peak: free each before the next is allocated
    grad_sketches = torch.fft.irfft(torch.view_as_complex(grad_spectra), n=out_dim)
    del grad_spectra
    grads = []
    for x, h, s, gs in zip(xs, hashes, signs, grad_sketches):
        dx = x.new_empty(x.shape)
        adjoint_into(dx.view(-1, x.shape[-1]), gs, h, s)
        grads.append(dx)
    return grads + grads_gate


_dispatch.register_kernel("compact_bilinear", "triton", forward=_forward, backward=_backward, device_types=DEVICE_TYPES)
