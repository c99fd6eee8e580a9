"""Triton compact bilinear pooling (tensor sketch, pooled over positions, gated, normalised).

Two algorithms, as ops/compact_bilinear.py resolves ``algorithm`` ("gram" or "fft"); both on
the canonical layout xs[m] (B, T, n_m) -> (B, d), both ending in the row epilogue of
signed_sqrt_l2.py (z * gate, signed sqrt, L2 norm, cast: one program per row, two passes
over the row) and its backward: the FFT path in their own launches, the Gram path inside its
two kernels.

Gram path (two modalities X (B, T, n1), Y (B, T, n2)): z_b = count sketch of G_b = X_b^T Y_b
with hash (h1(i) + h2(j)) mod d and sign s1(i) s2(j). Three launches forward+backward:

forward
  0. torch.zeros: z (B, d) float32 and the per-sample arrival counters, one allocation
  1. _gram_sketch_kernel: one program per (sample, n1 tile, n2 tile); the G tile is a
     tensor-core matmul over T in float32 registers, then signed (and / T for "mean") and
     added into z with atomics; each program then counts itself in its sample's counter
     (acq_rel), and the sample's last program runs the row epilogue (z * gate, signed sqrt,
     L2, cast; _common.epilogue_row) on z[b] -> out[b]
backward
  1. _gram_adjoint_kernel, one grid for both inputs: dX = Y dG^T by the first programs, dY =
     X dG by the rest, with dG_ij = s1(i) s2(j) dz[(h1(i) + h2(j)) mod d] (/ T) gathered into
     register tiles; one program per (sample, position tile, feature tile). With a gate or
     normalisation, dz is the epilogue's backward, formed per gathered entry from grad, z
     (saved by the forward when autograd records the call, the op's residual; recomputed by
     steps 0-1 otherwise) and the gate; with normalisation each program first recomputes its
     sample's norm and <grad, out> (a pass over d values of z and grad, from L2); the first
     dX program of each sample writes dgate.

What it materialises: z (B, d) and the outputs; no dz, no per-position sketch, no spectrum
and no (B, n1, n2) Gram matrix exists in memory. The atomics make z's summation order vary
between runs (see ops.compact_bilinear.choose_algorithm). The Gram path
takes float32, float16 and bfloat16 (tl.dot has no float64 form; see _common.py), whose dots
accumulate in float32; float64 Gram calls run the "torch" kernels (``_accepts``).

FFT path (any number M of modalities): fused Triton kernels around torch.fft (cuFFT on CUDA),
with K = d // 2 + 1 and the work dtype float32 (float64 for float64 inputs; half inputs are
transformed in float32):

forward
  1. gather sketch (one launch per modality)  xs[m] -> S (M, B*T, d)   read x once, write S
  2. torch.fft.rfft(S)                        -> F (M, B*T, K) complex
  3. product-pool kernel                      F -> P (B, K): prod_m F_m summed (mean: / T)
                                              over t in registers
  4. torch.fft.irfft(P, n=d)                  -> z (B, d)
  5. epilogue kernel                          z -> out
backward (recomputes S and F rather than saving them: they are the large tensors)
  1-2. as forward                             S, F
  3-4. as forward, only with a gate or normalize: z (B, d)
  5. epilogue backward kernel                 grad -> dz (B, d), dgate (B, d)
  6. torch.fft.rfft(dz)                       -> G (B, K)
  7. adjoint-product kernel                   dF_k = G conj(prod_{m != k} F_m) (/ T), all k
                                              -> (M, B*T, K) complex
  8. torch.fft.irfft                          -> dS (M, B*T, d)
  9. gather adjoint (one launch per modality) dx_k[i] = s_k(i) dS_k[h_k(i)], cast to x's dtype

What the FFT path materialises: the per-position sketches S (M*B*T*d work-dtype values) and
spectra F (M*B*T*K complex), i.e. about 2 M B T d values; in the backward also dF and dS of
the same size. For pooled sequences (T > 1) these per-position tensors dominate memory, which
is why "auto" takes the Gram path for long sequences of two modalities. Only P, z and the
output are per sample.

The FFTs are exact for any d (real transforms with n=d, odd d included); there is no size
restriction beyond 32-bit column indices (n_m, d < 2**31).

Fused vector path (two unpooled bfloat16, float16 or float32 modalities, d = D1 D2 with D1,
D2 powers of two in [16, 128], or d = D1 N2 N3 with N2, N3 in {16, 32} for three DFT levels;
inference and training): steps 1-5 of the FFT forward are one launch,
_fused_vector_cbp_kernel, whose DFTs are tensor-core matmuls (the four-step decomposition, its
row DFT split again at three levels; three TF32 passes ("tf32x3") in every dtype; see its
section), each persistent program finishing the rows it computes (the
row epilogue on z[b] in its L2-resident scratch: z never reaches HBM). Its backward: z
recomputed only for a gate or normalisation (by the fused forward for a gate alone, by FFT steps 1-4 with normalisation,
see _fused_backward), the epilogue backward, then steps 6-9 in one launch,
_fused_vector_cbp_backward_kernel. Nothing is saved between them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import _dispatch
from .._dispatch import compute_dtype
from . import DEVICE_TYPES
from ._common import (
    KERNEL_DTYPES,
    autotune_configs,
    batch_bucket,
    dot,
    dot_flops,
    dot_precision,
    epilogue_backward,
    epilogue_forward,
    epilogue_row,
    matmul_tile,
    no_dots,
    normalized_grad,
    normalized_grad_scalars,
    padded,
)
from .count_sketch import adjoint_into, inverse_table, sketch_into

_BLOCK_FREQS = 256


@triton.jit
def _sample_and_frequencies(freqs, BLOCK: tl.constexpr):
    """This program's sample b and block of frequencies f (with its mask): one program per
    (sample, frequency block), frequency blocks fastest."""
    pid = tl.program_id(0)
    freq_blocks = tl.cdiv(freqs, BLOCK)
    f = (pid % freq_blocks) * BLOCK + tl.arange(0, BLOCK)
    return (pid // freq_blocks).to(tl.int64), f, f < freqs


@dot_flops(no_dots)
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


@dot_flops(no_dots)
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

# ---------------------------------------------------------------------------- Gram path


@triton.jit
def _bins(h_rows, h_cols, D):
    """(h_rows[:, None] + h_cols[None, :]) mod D for hashes in [0, D), without a modulo, in
    int32 whatever the hashes' dtype (int64 indices would double the tile's registers) and
    without overflow for any D < 2**31: h_r - (D - h_c) lies in (-D, D)."""
    bins = h_rows.to(tl.int32)[:, None] - (D - h_cols.to(tl.int32))[None, :]
    return tl.where(bins < 0, bins + D, bins)


@triton.jit
def _sample_tile(pid, N_ROWS, N_COLS, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Program ``pid``'s sample b and its tile of an (N_ROWS, N_COLS) grid per sample: (b, rows,
    cols), one program per (sample, tile), a sample's tiles adjacent in launch order (rows
    fastest), so that they run together and share the sample's operands in L2."""
    tiles_rows = tl.cdiv(N_ROWS, BLOCK_ROWS)
    tiles = tiles_rows * tl.cdiv(N_COLS, BLOCK_COLS)
    tile = pid % tiles
    rows = tile % tiles_rows * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tile // tiles_rows * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    return (pid // tiles).to(tl.int64), rows, cols


# The row epilogue's block (its kernel's, _common._EPILOGUE_BLOCK) inside the Gram kernels:
# 1024 columns a step, 2 to 8 per thread at 4 to 16 warps.
_GRAM_EPILOGUE_BLOCK = 1024

# Configs for sm_90: tiles of >= 64 rows (a warp group's wgmma M per 4 warps) for the bfloat16
# and float16 dots; at the benchmark's GPU shape (B = 32, n = 512) 128 x 128 tiles make
# 32 x 4 x 4 = 512 programs for an H100's 132 SMs. At most 32 tile entries per thread: the
# scatter holds a 64-bit address per entry beside the accumulator, and at 64 per thread
# (128 x 128 at 8 warps, 64 x 128 at 4) Triton 3.6's ptxas spilled in bfloat16 and float16
# (up to 96 B). Every config compiles without register spills in every dtype there with
# Triton 3.6's and 3.9's ptxas (python -m benchmarks.compile_report --ops 'compact_bilinear[seq]').
_GRAM_CONFIGS = autotune_configs([
    triton.Config({"BLOCK_I": i, "BLOCK_J": j, "BLOCK_T": t}, num_warps=w, num_stages=s)
    for i, j, t, w, s in [(128, 128, 32, 16, 3), (128, 128, 64, 16, 3), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 64, 64, 4, 3)]
])


def _gram_sketch_flops(args, constexprs, programs):
    # One (BLOCK_I, BLOCK_J) tile of X_b^T Y_b per program, over T padded to BLOCK_T steps;
    # the last program of each sample's epilogue has no dots.
    c = constexprs
    return {"x_ptr": programs * 2 * c["BLOCK_I"] * c["BLOCK_J"] * padded(args["T"], c["BLOCK_T"])}


@triton.autotune(configs=_GRAM_CONFIGS, key=["B_BUCKET", "T", "N1", "N2", "D", "MEAN"],
                 reset_to_zero=["z_ptr", "arrived_ptr"])
@dot_flops(_gram_sketch_flops)
@triton.jit(do_not_specialize=["B_BUCKET"])
def _gram_sketch_kernel(
    x_ptr, y_ptr, h1_ptr, s1_ptr, h2_ptr, s2_ptr, z_ptr, arrived_ptr, gate_ptr, out_ptr,
    B_BUCKET, T, N1, N2, D, eps,
    stride_xb, stride_xt, stride_xn, stride_yb, stride_yt, stride_yn,
    stride_h1, stride_s1, stride_h2, stride_s2, stride_zb, stride_gate_b, stride_gate_d, stride_outb,
    MEAN: tl.constexpr, EPILOGUE: tl.constexpr, HAS_GATE: tl.constexpr, NORMALIZE: tl.constexpr,
    PRECISION: tl.constexpr, EPILOGUE_BLOCK: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """z[b, (h1(i) + h2(j)) mod D] += s1(i) s2(j) G[b, i, j] (/ T), G_b = X_b^T Y_b, for this
    program's (sample b, i tile, j tile) (_sample_tile); x (B, T, N1), y (B, T, N2), z (B, D)
    float32, zeroed. With EPILOGUE, also out[b] = epilogue(z[b]) (gate, signed sqrt, L2;
    _common.epilogue_row) by the sample's last program to finish, counted in arrived (B,)
    int32, zeroed."""
    b, i, j = _sample_tile(tl.program_id(0), N1, N2, BLOCK_I, BLOCK_J)
    mask_i, mask_j = i < N1, j < N2
    # G_b[i, j] = (X_b^T)[i, :] Y_b[:, j], summed over t in BLOCK_T steps.
    gram = matmul_tile(x_ptr + b * stride_xb, stride_xn, stride_xt, y_ptr + b * stride_yb, stride_yt, stride_yn,
                       i, j, mask_i, mask_j, 0, T, PRECISION, BLOCK_T)
    h1 = tl.load(h1_ptr + i * stride_h1, mask=mask_i, other=0)
    h2 = tl.load(h2_ptr + j * stride_h2, mask=mask_j, other=0)
    s1 = tl.load(s1_ptr + i * stride_s1, mask=mask_i, other=0).to(tl.float32)
    s2 = tl.load(s2_ptr + j * stride_s2, mask=mask_j, other=0).to(tl.float32)
    value = gram * (s1[:, None] * s2[None, :])
    if MEAN:
        value = value / T
    # Atomics: the order in which the n1 n2 entries reach each bin varies from run to run, so
    # z does too, in its last bits; hence ops.compact_bilinear.choose_algorithm's alert under
    # torch.use_deterministic_algorithms. The bins of one sample (D floats) stay in L2.
    tl.atomic_add(z_ptr + b * stride_zb + _bins(h1, h2, D), value,
                  mask=mask_i[:, None] & mask_j[None, :], sem="relaxed")
    if EPILOGUE:
        # The sample's last program finishes its row. Memory order (PTX's model): the barrier
        # orders every thread's adds above before the counter's add, which one thread issues
        # as a gpu-scope acq_rel atomic, a release cumulative over what the CTA did before the
        # barrier. Whichever program's add returns tiles - 1 came after every other program's
        # release in the counter's order, so its acquire makes all their adds to z visible
        # to it; Triton hands the scalar result to the other threads through shared memory
        # behind a barrier, which extends that to every thread of the program before any
        # reads z. No other program reads z[b] in this launch, so the epilogue's loads find
        # no stale line in L1. The interpreter runs programs one by one: the last one there
        # is the last in the grid.
        tiles = tl.cdiv(N1, BLOCK_I) * tl.cdiv(N2, BLOCK_J)
        tl.debug_barrier()
        if tl.atomic_add(arrived_ptr + b, 1, sem="acq_rel") == tiles - 1:
            epilogue_row(z_ptr, gate_ptr, out_ptr, b, D, eps, stride_zb, 1, stride_gate_b, stride_gate_d, stride_outb,
                         HAS_GATE, NORMALIZE, tl.float32, EPILOGUE_BLOCK)


# The backward's tiles: (BLOCK_I own features, BLOCK_T positions) outputs, BLOCK_J of the
# other modality's features per step. Each gathered dG entry serves 2 BLOCK_T dot FLOPs, so
# BLOCK_T is kept large. Spill-free as _GRAM_CONFIGS; float32 (FMA dots, whose operand tiles
# live in registers next to the gathered tile) spills at BLOCK_J = 64 with 128 x 128 or
# 64 x 128 tiles, at 64 x 128 x 32 and at 128 x 128 x 32 with three stages, and, since the
# epilogue's backward is formed per gathered entry, at 4 warps with 128 x 64 x 32 and
# 64 x 64 x 64 tiles (up to 256 B with Triton 3.9): those run at 8 warps.
_GRAM_ADJOINT_CONFIGS = autotune_configs([
    triton.Config({"BLOCK_I": i, "BLOCK_T": t, "BLOCK_J": j}, num_warps=w, num_stages=s)
    for i, t, j, w, s in [(128, 128, 32, 8, 2), (128, 128, 16, 8, 3), (128, 64, 32, 8, 3), (64, 64, 64, 8, 3)]
])


def _gram_adjoint_flops(args, constexprs, programs):
    # One (BLOCK_I, BLOCK_T) output tile per program, over the other modality's features
    # padded to BLOCK_J steps: B cdiv(N1, BLOCK_I) T-tiles programs for dx over N2, then
    # B cdiv(N2, BLOCK_I) T-tiles for dy over N1.
    c, a = constexprs, args
    t_tiles = triton.cdiv(a["T"], c["BLOCK_T"])
    per_row_step = 2 * c["BLOCK_I"] * c["BLOCK_T"]
    dx_programs = a["B"] * triton.cdiv(a["N1"], c["BLOCK_I"]) * t_tiles
    return {"y_ptr": dx_programs * per_row_step * padded(a["N2"], c["BLOCK_J"]),
            "x_ptr": (programs - dx_programs) * per_row_step * padded(a["N1"], c["BLOCK_J"])}


@triton.jit
def _grad_v(grad_ptr, z_ptr, gate_ptr, b, cols, mask, eps, norm, denom, radial,
            stride_gb, stride_gd, stride_zb, stride_gate_b, stride_gate_d,
            HAS_GATE: tl.constexpr, NORMALIZE: tl.constexpr):
    """(dL/dv, gate) at columns ``cols`` (any shape) of sample b, v = z * gate the epilogue's
    input, from grad = dL/dout, given the row's (norm, denom, radial) (normalized_grad_scalars);
    masked entries 0. Without a gate, ``gate`` is 1 and unused by the callers."""
    g = tl.load(grad_ptr + b * stride_gb + cols * stride_gd, mask=mask, other=0.0).to(tl.float32)
    gate = 1.0
    if HAS_GATE:
        gate = tl.load(gate_ptr + b * stride_gate_b + cols * stride_gate_d, mask=mask, other=0.0).to(tl.float32)
    if NORMALIZE:
        z = tl.load(z_ptr + b * stride_zb + cols, mask=mask, other=0.0)
        # A NaN radial (a NaN sample) would reach the masked entries too: they stay 0.
        g = tl.where(mask, normalized_grad(g, z * gate, norm, denom, radial, eps), 0.0)
    return g, gate


@triton.jit
def _adjoint_tile(
    b, i, t, other_ptr, h_own_ptr, s_own_ptr, h_other_ptr, s_other_ptr, grad_ptr, z_ptr, gate_ptr, out_ptr,
    T, N_OWN, N_OTHER, D, eps, norm, denom, radial,
    stride_ob, stride_ot, stride_on, stride_h_own, stride_s_own, stride_h_other, stride_s_other,
    stride_gb, stride_gd, stride_zb, stride_gate_b, stride_gate_d, stride_outb, stride_outt, stride_outn,
    MEAN: tl.constexpr, HAS_GATE: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """out[b, t, i] = sum_j other[b, t, j] dG[b, i, j] (/ T), dG[b, i, j] = s_own(i) s_other(j)
    dz[b, (h_own(i) + h_other(j)) mod D], dz = dL/dz, for one (BLOCK_I own features i,
    BLOCK_T positions t) tile: the gradient of the Gram forward w.r.t. one modality (own,
    N_OWN features) given the other (B, T, N_OTHER). dG exists only as register tiles
    gathered from grad (and, with a gate or normalisation, z and the gate, from which dz is
    formed per entry: dz = gate dL/dv; D values each per sample, in L1/L2); each is rounded to
    the other operand's dtype for the dot, as a half-precision GEMM's backward rounds its
    incoming gradient. The sign s_own(i) and 1/T are applied once per output, not per
    gathered entry."""
    mask_i, mask_t = i < N_OWN, t < T
    h_own = tl.load(h_own_ptr + i * stride_h_own, mask=mask_i, other=0)
    other_rows = other_ptr + b * stride_ob + t.to(tl.int64)[None, :] * stride_ot
    # out^T (BLOCK_I, BLOCK_T) = dG (BLOCK_I, BLOCK_J) @ other^T (BLOCK_J, BLOCK_T): the gathered
    # operand comes first, where an MMA can take it from registers.
    acc = tl.zeros((i.shape[0], t.shape[0]), dtype=tl.float32)
    for j0 in range(0, N_OTHER, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        mask_j = j < N_OTHER
        h_other = tl.load(h_other_ptr + j * stride_h_other, mask=mask_j, other=0)
        s_other = tl.load(s_other_ptr + j * stride_s_other, mask=mask_j, other=0).to(tl.float32)
        # Masked columns read 0, not a dz entry that may be inf or NaN (0 * NaN would leak).
        bins = _bins(h_own, h_other, D)
        grad_v, gate = _grad_v(grad_ptr, z_ptr, gate_ptr, b, bins, tl.broadcast_to(mask_j[None, :], bins.shape),
                               eps, norm, denom, radial,
                               stride_gb, stride_gd, stride_zb, stride_gate_b, stride_gate_d, HAS_GATE, NORMALIZE)
        if HAS_GATE:
            grad_v = grad_v * gate  # dz = gate dL/dv
        grad_gram = grad_v * s_other[None, :]
        other_t = tl.load(other_rows + j[:, None] * stride_on, mask=mask_j[:, None] & mask_t[None, :], other=0.0)
        acc = dot(grad_gram.to(other_t.dtype), other_t, acc, PRECISION)
    s_own = tl.load(s_own_ptr + i * stride_s_own, mask=mask_i, other=0).to(tl.float32)
    acc = acc * s_own[:, None]
    if MEAN:
        acc = acc / T  # the integer T, as the FFT path divides
    out = out_ptr + b * stride_outb + t.to(tl.int64)[None, :] * stride_outt + i[:, None] * stride_outn
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_i[:, None] & mask_t[None, :])


@triton.autotune(configs=_GRAM_ADJOINT_CONFIGS, key=["B_BUCKET", "T", "N1", "N2", "D", "MEAN"])
@dot_flops(_gram_adjoint_flops)
@triton.jit(do_not_specialize=["B", "B_BUCKET"])
def _gram_adjoint_kernel(
    x_ptr, y_ptr, h1_ptr, s1_ptr, h2_ptr, s2_ptr, grad_ptr, z_ptr, gate_ptr, dx_ptr, dy_ptr, dgate_ptr,
    B, B_BUCKET, T, N1, N2, D, eps,
    stride_xb, stride_xt, stride_xn, stride_yb, stride_yt, stride_yn,
    stride_h1, stride_s1, stride_h2, stride_s2,
    stride_gb, stride_gd, stride_zb, stride_gate_b, stride_gate_d,
    stride_dxb, stride_dxt, stride_dxn, stride_dyb, stride_dyt, stride_dyn, stride_dgate_b,
    MEAN: tl.constexpr, HAS_GATE: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
    EPILOGUE_BLOCK: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Both inputs' gradients of the Gram forward followed by the epilogue, from grad =
    dL/dout (B, D): dx = Y dG^T by the first B cdiv(N1, BLOCK_I) cdiv(T, BLOCK_T) programs,
    dy = X dG by the rest (_adjoint_tile each, one (sample, own-feature tile, position tile)
    per program). With NORMALIZE, each program first forms its sample's (norm, denom,
    radial) from grad and z, the epilogue backward's first pass (D values each, from L2),
    then dz per gathered entry; with a gate, dgate[b] = z[b] dL/dv[b] is written by the
    sample's first dx program. Without either, dz = grad."""
    pid = tl.program_id(0)
    dx_tiles = tl.cdiv(N1, BLOCK_I) * tl.cdiv(T, BLOCK_T)
    is_dy = pid >= B * dx_tiles
    local = tl.where(is_dy, pid - B * dx_tiles, pid)
    b, i, t = _sample_tile(local, tl.where(is_dy, N2, N1), T, BLOCK_I, BLOCK_T)
    norm = 1.0
    denom = 1.0
    radial = 0.0
    if NORMALIZE:
        norm, denom, radial = normalized_grad_scalars(
            grad_ptr, z_ptr, gate_ptr, b, D, eps, stride_gb, stride_gd, stride_zb, 1, stride_gate_b, stride_gate_d,
            HAS_GATE, True, tl.float32, EPILOGUE_BLOCK)
    if HAS_GATE:
        if (local % dx_tiles == 0) & (pid < B * dx_tiles):
            for start in range(0, D, EPILOGUE_BLOCK):
                cols = start + tl.arange(0, EPILOGUE_BLOCK)
                mask = cols < D
                z = tl.load(z_ptr + b * stride_zb + cols, mask=mask, other=0.0)
                grad_v, _ = _grad_v(grad_ptr, z_ptr, gate_ptr, b, cols, mask, eps, norm, denom, radial,
                                       stride_gb, stride_gd, stride_zb, stride_gate_b, stride_gate_d, HAS_GATE, NORMALIZE)
                tl.store(dgate_ptr + b * stride_dgate_b + cols, (grad_v * z).to(dgate_ptr.dtype.element_ty), mask=mask)
    if is_dy:
        _adjoint_tile(b, i, t, x_ptr, h2_ptr, s2_ptr, h1_ptr, s1_ptr, grad_ptr, z_ptr, gate_ptr, dy_ptr,
                      T, N2, N1, D, eps, norm, denom, radial,
                      stride_xb, stride_xt, stride_xn, stride_h2, stride_s2, stride_h1, stride_s1,
                      stride_gb, stride_gd, stride_zb, stride_gate_b, stride_gate_d, stride_dyb, stride_dyt, stride_dyn,
                      MEAN, HAS_GATE, NORMALIZE, PRECISION, BLOCK_J)
    else:
        _adjoint_tile(b, i, t, y_ptr, h1_ptr, s1_ptr, h2_ptr, s2_ptr, grad_ptr, z_ptr, gate_ptr, dx_ptr,
                      T, N1, N2, D, eps, norm, denom, radial,
                      stride_yb, stride_yt, stride_yn, stride_h1, stride_s1, stride_h2, stride_s2,
                      stride_gb, stride_gd, stride_zb, stride_gate_b, stride_gate_d, stride_dxb, stride_dxt, stride_dxn,
                      MEAN, HAS_GATE, NORMALIZE, PRECISION, BLOCK_J)


def _gram_pooled_sketch(xs, hashes, signs, out_dim: int, mean: bool,
                        epilogue: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T, n1), (B, T, n2) -> (z, out): z (B, d) float32, the count sketch of each sample's
    X^T Y, and with ``epilogue`` = (gate, normalize, eps) out (B, d) in x's dtype, z's
    epilogue (gate, signed sqrt, L2), from the same launch (else None). One zeroed allocation
    holds z and the per-sample arrival counters (one launch zeroes both)."""
    (x, y), (h1, h2), (s1, s2) = xs, hashes, signs
    (batch, positions, n1), n2 = x.shape, y.shape[2]
    zeroed = torch.zeros(batch * out_dim + batch, dtype=torch.float32, device=x.device)
    z, arrived = zeroed[: batch * out_dim].view(batch, out_dim), zeroed[batch * out_dim:].view(torch.int32)
    gate, normalize, eps = epilogue or (None, False, 0.0)
    out = None if epilogue is None else torch.empty((batch, out_dim), dtype=x.dtype, device=x.device)
    gate_or_z = z if gate is None else gate  # valid pointers the kernel never reads without them
    grid = lambda meta: (batch * triton.cdiv(n1, meta["BLOCK_I"]) * triton.cdiv(n2, meta["BLOCK_J"]),)  # noqa: E731
    _gram_sketch_kernel[grid](
        x, y, h1, s1, h2, s2, z, arrived, gate_or_z, z if out is None else out,
        batch_bucket(batch), positions, n1, n2, out_dim, eps,
        *x.stride(), *y.stride(), h1.stride(0), s1.stride(0), h2.stride(0), s2.stride(0), z.stride(0),
        *gate_or_z.stride(), out_dim,
        MEAN=mean, EPILOGUE=epilogue is not None, HAS_GATE=gate is not None, NORMALIZE=normalize,
        PRECISION=dot_precision(x.dtype), EPILOGUE_BLOCK=_GRAM_EPILOGUE_BLOCK,
    )
    return z, out


def _gram_adjoint(grad, z, xs, hashes, signs, mean: bool, gate, normalize: bool, eps: float) -> list[torch.Tensor]:
    """[dx, dy] (+ [dgate] with a gate): the gradients w.r.t. x (B, T, n1), y (B, T, n2) and
    the gate of the Gram forward and its epilogue, from grad = dL/dout (B, d), in one launch;
    z (B, d) float32 with unit column stride, needed (else None) with a gate or normalisation.
    Each output has its input's shape and dtype, contiguous."""
    if z is None:
        z = grad  # a valid pointer, never read without a gate or normalisation
    (x, y), (h1, h2), (s1, s2) = xs, hashes, signs
    (batch, positions, n1), n2, out_dim = x.shape, y.shape[2], grad.shape[1]
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dy = torch.empty_like(y, memory_format=torch.contiguous_format)
    dgate = None if gate is None else torch.empty((batch, out_dim), dtype=gate.dtype, device=gate.device)
    gate_or_z, dgate_or_dx = (z, dx) if gate is None else (gate, dgate)  # never read or written without a gate
    grid = lambda meta: (batch * (triton.cdiv(n1, meta["BLOCK_I"]) + triton.cdiv(n2, meta["BLOCK_I"]))  # noqa: E731
                         * triton.cdiv(positions, meta["BLOCK_T"]),)
    _gram_adjoint_kernel[grid](
        x, y, h1, s1, h2, s2, grad, z, gate_or_z, dx, dy, dgate_or_dx,
        batch, batch_bucket(batch), positions, n1, n2, out_dim, eps,
        *x.stride(), *y.stride(), h1.stride(0), s1.stride(0), h2.stride(0), s2.stride(0),
        *grad.stride(), z.stride(0), *gate_or_z.stride(),
        *dx.stride(), *dy.stride(), dgate_or_dx.stride(0),
        MEAN=mean, HAS_GATE=gate is not None, NORMALIZE=normalize, PRECISION=dot_precision(x.dtype),
        EPILOGUE_BLOCK=_GRAM_EPILOGUE_BLOCK,
    )
    return [dx, dy] + ([] if dgate is None else [dgate])


# ------------------------------------------------------- fused vector path (four-step DFT)
#
# Unpooled (T = 1) CBP of two modalities with d = D1 D2 (D1, D2 powers of two in [16, 128]) or
# d = D1 N2 N3 (three levels, N2, N3 in {16, 32}): one persistent kernel computes
# z = IDFT(DFT(a) DFT(b)), a and b the two count sketches, with every transform as matmuls
# (the four-step decomposition, applied twice at three levels), so no sketch and no
# spectrum reaches DRAM beyond a per-program float32 scratch of 4 d values, which stays in L2;
# another computes the gradients the same way (below).
#
# Index n = D2 n1 + n2 (A[n1, n2] = a[n], the row-major (D1, D2) view of a length-d vector) and
# k = k1 + D1 k2; F_N[j, k] = exp(-2 pi i j k / N) = C_N - i S_N (C = cos, S = sin of
# 2 pi j k / N), w = exp(-2 pi i / d), W[k1, n2] = w^(n2 k1) = TC - i TS. Since
# n k = D2 n1 k1 + d n1 k2 + n2 k1 + D1 n2 k2 (and m k likewise),
#   DFT(a)[k1, k2] = ((F_D1 @ A) * W) @ F_D2
#   z[m1, m2]      = Re(conj(F_D1) @ ((P @ conj(F_D2)) * conj(W))) / d.
# Both sketches are real, so one complex transform serves both: u = DFT(a + i b) gives
# DFT(a) = (u + v) / 2 and DFT(b) = (u - v) / (2i) with v[k] = conj(u[-k]), hence the
# spectral product P = DFT(a) DFT(b) = (u^2 - v^2) / (4i). Per sample:
#   phase A   T = (F_D1 @ (A + i B)) * W, by column blocks of n2: 4 real dots; A's and B's
#             tiles gathered through the count sketches' inverse tables, as
#             _gather_sketch_kernel does (deterministic, no atomics). Four, not Gauss's
#             three (C (A + B), (C + S) A, (C - S) B: 2 d D1 FLOPs fewer a sample): at
#             d = 32 x 32 x 16 with the epilogue those took Triton 3.6's float32 forward to
#             255 registers and 4 bytes of spill (every float16 / float32 build at 255)
#   phase B1  U = T @ F_D2, by row blocks of k1, written over T: 3 real dots (Gauss's
#             complex product with the constant sums C +- S precomputed)
#   phase B2  P from U's rows k and -k, V = (P @ conj(F_D2)) * conj(W), by row blocks of k1:
#             3 real dots
#   phase C   z = (C_D1 @ Re V - S_D1 @ Im V) / d, by column blocks of m2: 2 real dots
#   epilogue  (the op's forward, EPILOGUE) z goes to the free plane 0 of the scratch, not to
#             z (B, d); the program runs the row epilogue on it (gate, signed sqrt, L2;
#             _common.epilogue_row, no dots) -> out[b] in the input dtype, so the forward is
#             one launch and z (B d float32) is neither written to nor read from HBM
# separated by tl.debug_barrier(): a CTA-wide bar.sync, after which every thread of the
# program sees the scratch its other threads wrote. FLOPs per sample, 2 per multiply-add:
# 12 d D1 (phases A and C) + 12 d D2 (B1 and B2); at d = 128 x 128, 50.3 MFLOP.
#
# Three levels. The FLOPs grow with the sum of the factors, so for d >= 4096 the row DFT of
# length D2 = N2 N3 is itself split (phases A and C unchanged). In a row, input column
# c = n2 N3 + n3 and row frequency j = k2 + N2 k3; since c j = N3 n2 k2 + n3 k2 + N2 n3 k3
# (mod D2), DFT_D2 = F_N3 after the twiddle w_D2^(n3 k2) after F_N2. Phase B1, per row block,
# in place in U's rows: stage 2 loads the tile [(r, n3), n2] (column n2 N3 + n3; (r, n3)
# flattened by the addressing, no permute), times F_N2 (Gauss, 3 dots), times w_D2^(n3 k2),
# stores at k2 N3 + n3; stage 3 loads [(r, k2), n3] there, times F_N3 (3 dots), stores at
# k2 N3 + k3. Plane position (k1, k2 N3 + k3) then holds k = k1 + D1 (k2 + N2 k3), and -k of
# the packing is j' = (-j - [k1 > 0]) mod D2 at column (j' mod N2) N3 + j' div N2. Phase B2's
# inverse is the transpose in reverse: P (or Q) formed directly as a [(r, k2), k3] tile, times
# conj(F_N3), times w_D2^(-n3 k2), stored at k2 N3 + n3; then [(r, n3), k2] times conj(F_N2)
# and conj(W), in place at n2 N3 + n3. Barriers as in B1 between a tile's reads and
# overwrites. FLOPs per sample 12 d (D1 + N2 + N3): at d = 32 x 32 x 16, 15.7 MFLOP (80
# against 256 for 128 x 128). fused_factors takes the least D1 + N2 + N3 (N3 = 1 for two
# levels), ties to the larger D1 (wider phase A / C dots, a shorter row), then the larger N2:
# 16384 -> (32, 32, 16), 8192 -> (32, 16, 16), 4096 -> (16, 16, 16); d < 4096 keeps two.
#
# Accuracy. Every dtype runs "tf32x3": each operand split a_hi = tf32(a), a_lo = tf32(a - a_hi),
# a_hi b_hi + a_hi b_lo + a_lo b_hi, three TF32 MMAs a dot, which three levels make
# affordable (3 x 80 = 240 < 256 FLOP units at d = 16384). One TF32 pass (operands rounded to
# 10 mantissa bits) was measured and is not enough in any dtype, emulated in the interpreter
# (tf32_dots in tests/test_triton_kernels.py), each result rounded to the input dtype against
# PyTorch's own error in that dtype (eager, FFT path), both against float64:
# - z of dense inputs (n = 512, 1024, every bin of z a sum of ~100 products): bfloat16 1.13x
#   at one pass, but float16 4.25x and float32 3500x; at tf32x3 1.00-1.28x.
# - the gated, normalised output of sparse inputs (n = 37, 300, bins of z empty): the signed
#   sqrt turns a transform's noise eps at an empty bin into sqrt(eps): bfloat16 5.5x at
#   d = 4096 and 19x at 16384 with one pass, 1.00-1.03x at tf32x3 (float16 39-68x and
#   1.11-1.34x, float32 76-83x and 1.42-1.48x).
# - their gradients (_fused_backward; normalisation's gradient 1 / (2 sqrt|z|) is large at
#   those bins, and the transforms spread one pass's error from there to every input):
#   bfloat16 dx, dy 14x and 37x at d = 2048, 123x and 422x at 4096 with one pass; within
#   0.78-1.36x at tf32x3 in every dtype.
# (test_fused_vector_cbp_tf32_accuracy_decides_its_precision, _backward_tf32_accuracy.)
# float64 is not routed: tl.dot has no float64 form. Under the interpreter every dot is
# float32 unless emulated, which is how the kernels are tested against float64.
#
# Backward. With g = dL/dz (real), grad_a[n] = sum_m g[m] b[m - n], the circular correlation
# IDFT(DFT(g) conj(DFT(b))), and grad_b likewise with a. Packed: conj(DFT(b)) + i conj(DFT(a))
# = conj(DFT(b - i a)) = conj(-i u) = i conj(u), so grad_a + i grad_b = IDFT(i DFT(g) conj(u)),
# u = DFT(a + i b) as in the forward: one complex inverse, no index -k. Per sample, with the
# same helpers (planes 0-1 U, 2-3 DFT(g)):
#   phase A   T_u as the forward (4 dots), T_g = (F_D1 @ g) * W (2 dots)
#   phase B1  U = T_u @ F_D2, DFT(g) = T_g @ F_D2 (3 + 3 dots)
#   phase B2  Q = i DFT(g) conj(U), V = (Q @ conj(F_D2)) * conj(W) over DFT(g) (3 dots)
#   phase C   grad_a + i grad_b = conj(F_D1) @ V / d over U (4 dots, each part on its own)
#   phase D   dx[i] = s_x(i) grad_a[h_x(i)], dy from grad_b: gathered from the scratch
# FLOPs per sample: 20 d D1 + 18 d D2 (three levels: 20 d D1 + 18 d (N2 + N3); at
# d = 32 x 32 x 16, 24.6 MFLOP, three times that at tf32x3); at d = 128 x 128, 79.7 MFLOP.
# Accuracy: the section's "Accuracy" above.

_FUSED_DIMS = (16, 32, 64, 128)
_FUSED_ROW_DIMS = (16, 32)
_FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Three TF32 passes (hi/lo split, 3xTF32) in every dtype: one pass misses the 2x rule in each
# (section comment). Under the interpreter every dot is float32.
_FUSED_PRECISION = {torch.bfloat16: "tf32x3", torch.float16: "tf32x3", torch.float32: "tf32x3"}
# Two levels: phase B1 holds 3 (BLOCK_ROWS, D2) float32 accumulators, B2 the (BLOCK_ROWS, D2) product;
# at 8 warps and 32 rows each is 16 registers a thread at D2 = 128. At d = 128 x 128 Triton
# 3.9 makes 171 registers a thread, no spills, 100 KiB of shared memory on sm_90 (16 rows:
# 254 registers; 16 x 16 blocks: 164, but K steps of 16 for every dot).
_FUSED_BLOCK_ROWS = 32
_FUSED_BLOCK = 32
# Three levels or tf32x3 (whose dots split every operand into two): phase A's and C's column
# blocks of 16, at two levels row blocks of 16, at three levels row blocks of at most this
# many values a plane (BLOCK_ROWS D2) by precision. Measured on sm_90 (ptxas, through
# benchmarks.compile_report) at d = 32 x 32 x 16: with column blocks of 32 every dtype
# spilled (32-136 bytes); with 16 and 4 rows (tf32) / 8 rows (tf32x3) the forward makes
# 194 / 231 registers with Triton 3.9, 227 / 248 with 3.6 (with the row epilogue, as the
# op runs it: 199-206 / 233-235 and 235-241 / 251), the backward 202 / 224 and 230 / 246,
# no spills (tf32 at 8 rows: 252 and 248 with 3.9 but 16 bytes of spill in the
# backward with 3.6; tf32x3 at 4 rows spilled 8 bytes with 3.9). float32 at 64 x 32
# spilled 364 bytes with 32-wide blocks, none with 16.
_FUSED_BLOCK_NARROW = 16
_FUSED_ROW_BLOCK = {"tf32": 2048, "tf32x3": 4096}
_FUSED_NUM_WARPS = 8
_FUSED_NUM_STAGES = 2
# The backward's in-kernel gather (phase D): inputs per step, one per thread at 8 warps. The
# backward kernel makes 254 registers a thread at d = 128 x 128 on sm_90 with Triton 3.9, no
# spills; with 1024 inputs a step, or phase C's two accumulators at once, it spilled.
_FUSED_BLOCK_GATHER = 256
# The forward's in-kernel row epilogue: columns per step, 4 per thread at 8 warps (as the
# epilogue kernel's and the Gram kernels' 1024); it runs after phase C, whose accumulators
# are dead by then.
_FUSED_EPILOGUE_BLOCK = 1024
# Resident programs per SM for the persistent grid (one: the kernel's registers at 8 warps
# leave no room for a second on sm_90, see benchmarks.compile_report), and the SM count
# assumed for meta tensors standing for CUDA ones (an H100's), where no device can be asked.
_FUSED_PROGRAMS_PER_SM = 1
_ASSUMED_SMS = 132


def fused_factors(out_dim: int) -> tuple[int, ...] | None:
    """The DFT levels for d = out_dim: (D1, D2) (two levels, D1, D2 in _FUSED_DIMS) or
    (D1, N2, N3) (three, D1 in _FUSED_DIMS, N2, N3 in _FUSED_ROW_DIMS), the sum of the factors
    least (the FLOPs are 12 d (D1 + N2 + N3), N3 = 1 for two levels); ties go to the larger D1,
    then the larger N2 (wider phase A / C and stage-2 dots, a shorter row D2). None when d has
    no such factorisation."""
    candidates = [(d1, out_dim // d1) for d1 in _FUSED_DIMS if out_dim % d1 == 0 and out_dim // d1 in _FUSED_DIMS]
    candidates += [(d1, n2, n3) for d1 in _FUSED_DIMS for n2 in _FUSED_ROW_DIMS for n3 in _FUSED_ROW_DIMS
                   if d1 * n2 * n3 == out_dim]
    return min(candidates, key=lambda f: (sum(f), -f[0], -f[1]), default=None)


def _check_factors(out_dim: int, factors) -> tuple[int, int, int]:
    """(D1, D2, N3) for ``factors`` (default :func:`fused_factors`), N3 = 1 for two levels;
    ValueError naming ``factors`` where the kernels cannot run them."""
    factors = tuple(factors) if factors is not None else fused_factors(out_dim)
    ok = (factors is not None and len(factors) in (2, 3) and factors[0] in _FUSED_DIMS
          and (set(factors[1:]) <= set(_FUSED_ROW_DIMS) if len(factors) == 3 else factors[1] in _FUSED_DIMS)
          and factors[0] * factors[1] * (factors[2] if len(factors) == 3 else 1) == out_dim)
    if not ok:
        raise ValueError(f"factors: the fused kernel needs d = D1 D2 with D1, D2 in {_FUSED_DIMS} or "
                         f"d = D1 N2 N3 with D1 in {_FUSED_DIMS}, N2, N3 in {_FUSED_ROW_DIMS}; "
                         f"got d = {out_dim}, factors {factors}")
    n3 = factors[2] if len(factors) == 3 else 1
    return factors[0], factors[1] * n3, n3


@functools.cache
def _dft_tables(d1: int, d2: int, n3: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(C_D1, S_D1, C_N2, C_N2 + S_N2, C_N2 - S_N2, TC, TS, C_N3, C_N3 + S_N3, C_N3 - S_N3, RC, RS),
    float32, contiguous, N2 = D2 / N3: cos and sin of 2 pi j k / N for the (N, N) DFT matrices,
    of 2 pi k1 n2 / d for the (D1, D2) twiddles W and of 2 pi n3 k2 / D2 for the (N3, N2) row
    twiddles (N3 = 1: (1, 1) and (1, D2) tables the kernels do not read). The angles are reduced
    mod N in integers and everything is evaluated in float64, then rounded once. Cached per
    (D1, D2, N3, device) like the inverse tables: built once, no host-to-device copy on later
    calls (a handful of sizes per process; the twiddles W, 8 d bytes, dominate: at most
    448 KiB at two levels, 1 MiB at d = 128 x 32 x 32)."""

    def cos_sin(rows: int, cols: int, period: int):
        j = torch.arange(rows, dtype=torch.int64, device=device)
        k = torch.arange(cols, dtype=torch.int64, device=device)
        angle = torch.outer(j, k).remainder(period).double() * (2 * torch.pi / period)
        return torch.cos(angle), torch.sin(angle)

    n2 = d2 // n3
    c1, s1 = cos_sin(d1, d1, d1)
    c2, s2 = cos_sin(n2, n2, n2)
    tc, ts = cos_sin(d1, d2, d1 * d2)
    c3, s3 = cos_sin(n3, n3, n3)
    rc, rs = cos_sin(n3, n2, d2)
    return tuple(t.float().contiguous() for t in (c1, s1, c2, c2 + s2, c2 - s2, tc, ts, c3, c3 + s3, c3 - s3, rc, rs))


def _fused_flops(args, constexprs, programs):
    # Every sample, whichever program runs it: 12 d (D1 + N2 + N3) (N3 = 1 adds nothing for
    # two levels, see above); the dots' first operands are float32 tables or scratch, keyed
    # by the scratch.
    d1, d2, n3 = constexprs["D1"], constexprs["D2"], constexprs["N3"]
    rows = d2 if n3 == 1 else d2 // n3 + n3  # D2, or N2 + N3
    return {"scratch_ptr": args["B"] * 12 * d1 * d2 * (d1 + rows)}


def _fused_backward_flops(args, constexprs, programs):
    # Every sample: 2 d (10 D1 + 9 (N2 + N3)) (see above), keyed as _fused_flops.
    d1, d2, n3 = constexprs["D1"], constexprs["D2"], constexprs["N3"]
    rows = d2 if n3 == 1 else d2 // n3 + n3  # D2, or N2 + N3
    return {"scratch_ptr": args["B"] * 2 * d1 * d2 * (10 * d1 + 9 * rows)}


@triton.jit
def _sketch_tile(x_row, stride_xn, offsets_ptr, perm_ptr, sign_ptr, n1, n2, D2: tl.constexpr):
    """A[n1, n2] = sketch[D2 n1 + n2] in float32 for a (len(n1), len(n2)) tile: each bin sums
    its inputs through the CSR inverse table, as _gather_sketch_kernel does, up to the
    tile's fullest bin."""
    bins = n1[:, None] * D2 + n2[None, :]
    start = tl.load(offsets_ptr + bins)
    count = tl.load(offsets_ptr + bins + 1) - start
    acc = tl.zeros((n1.shape[0], n2.shape[0]), dtype=tl.float32)
    for k in range(0, tl.max(tl.max(count, axis=1), axis=0)):
        live = k < count
        src = tl.load(perm_ptr + start + k, mask=live, other=0)
        s = tl.load(sign_ptr + start + k, mask=live, other=0.0)
        # Dead entries read 0, not an input (0 * NaN would leak a NaN into other bins).
        v = tl.load(x_row + src.to(tl.int64) * stride_xn, mask=live, other=0.0)
        acc += v.to(tl.float32) * s
    return acc


@triton.jit
def _gauss_dot(re, im, p_ptr, q_ptr, r_ptr, rows, cols, stride, t1, t2, t3, PRECISION: tl.constexpr):
    """Accumulate Gauss's three real products of (re + i im) @ (P[rows, cols] + i E): t1 +=
    (re + im) @ P, t2 += re @ Q, t3 += im @ R with Q = E - P, R = P + E, tables of row stride
    ``stride``; then the product is (t1 - t3) + i (t1 + t2)."""
    at = rows[:, None] * stride + cols[None, :]
    t1 = dot(re + im, tl.load(p_ptr + at), t1, PRECISION)
    t2 = dot(re, tl.load(q_ptr + at), t2, PRECISION)
    t3 = dot(im, tl.load(r_ptr + at), t3, PRECISION)
    return t1, t2, t3


@triton.jit
def _transform_columns(x_row, stride_xn, x_offsets_ptr, x_perm_ptr, x_sign_ptr,
                       y_row, stride_yn, y_offsets_ptr, y_perm_ptr, y_sign_ptr,
                       c1_ptr, s1_ptr, tc_ptr, ts_ptr, out_re, out_im,
                       SKETCHED: tl.constexpr, PRECISION: tl.constexpr,
                       D1: tl.constexpr, D2: tl.constexpr, BLOCK: tl.constexpr):
    """Phase A, T = (F_D1 @ X) * W into the (D1, D2) planes out_re, out_im, by column blocks
    of n2. SKETCHED: X = A + i B, the count sketches of x and y (4 real dots); otherwise X is
    the real row x (d values, stride stride_xn, any float dtype; 2 dots) and y is unused."""
    k1 = tl.arange(0, D1)
    for c0 in range(0, D2, BLOCK):
        n2 = c0 + tl.arange(0, BLOCK)
        re = tl.zeros((D1, BLOCK), dtype=tl.float32)
        im = tl.zeros((D1, BLOCK), dtype=tl.float32)
        for r0 in range(0, D1, BLOCK):
            n1 = r0 + tl.arange(0, BLOCK)
            c = tl.load(c1_ptr + k1[:, None] * D1 + n1[None, :])
            s = tl.load(s1_ptr + k1[:, None] * D1 + n1[None, :])
            if SKETCHED:
                a = _sketch_tile(x_row, stride_xn, x_offsets_ptr, x_perm_ptr, x_sign_ptr, n1, n2, D2)
                bb = _sketch_tile(y_row, stride_yn, y_offsets_ptr, y_perm_ptr, y_sign_ptr, n1, n2, D2)
                # (C - i S)(A + i B) = (C A + S B) + i (C B - S A)
                re = dot(c, a, dot(s, bb, re, PRECISION), PRECISION)
                im = dot(c, bb, dot(-s, a, im, PRECISION), PRECISION)
            else:
                a = tl.load(x_row + (n1[:, None] * D2 + n2[None, :]).to(tl.int64) * stride_xn).to(tl.float32)
                re = dot(c, a, re, PRECISION)
                im = dot(-s, a, im, PRECISION)
        at = k1[:, None] * D2 + n2[None, :]
        tw_c = tl.load(tc_ptr + at)
        tw_s = tl.load(ts_ptr + at)
        tl.store(out_re + at, re * tw_c + im * tw_s)  # times TC - i TS
        tl.store(out_im + at, im * tw_c - re * tw_s)


@triton.jit
def _row_dft(re, im, c_ptr, q_ptr, r_ptr, N: tl.constexpr, PRECISION: tl.constexpr):
    """(re + i im) @ (C_N - i S_N) for an (M, N) register tile with the tables (C, C + S, C - S),
    or @ (C_N + i S_N) with (C, C - S, C + S): Gauss's three products (E = -S, Q = -(C + S),
    R = C - S; t2 accumulates +(C + S), hence the imaginary part t1 - t2). Returns (re, im)."""
    j = tl.arange(0, N)
    zero = tl.zeros((re.shape[0], N), dtype=tl.float32)
    t1, t2, t3 = _gauss_dot(re, im, c_ptr, q_ptr, r_ptr, j, j, N, zero, zero, zero, PRECISION)
    return t1 - t3, t1 - t2


@triton.jit
def _transform_rows(re_ptr, im_ptr, c2_ptr, c2ps2_ptr, c2ms2_ptr, c3_ptr, c3ps3_ptr, c3ms3_ptr, rc_ptr, rs_ptr,
                    PRECISION: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, N3: tl.constexpr,
                    BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Phase B1, in place: U[rows, :] = DFT_D2 of T[rows, :] for the (D1, D2) planes re, im;
    each row block reads only its own rows. N3 = 1: one stage, T @ (C - i S) by column blocks
    (row frequency k2 at column k2). Otherwise D2 = N2 N3 in two stages (section comment):
    row frequency k2 + N2 k3 at column k2 N3 + k3."""
    if N3 == 1:
        k2 = tl.arange(0, D2)
        for r0 in range(0, D1, BLOCK_ROWS):
            rows = r0 + tl.arange(0, BLOCK_ROWS)
            t1 = tl.zeros((BLOCK_ROWS, D2), dtype=tl.float32)
            t2 = tl.zeros((BLOCK_ROWS, D2), dtype=tl.float32)
            t3 = tl.zeros((BLOCK_ROWS, D2), dtype=tl.float32)
            for c0 in range(0, D2, BLOCK):
                n2 = c0 + tl.arange(0, BLOCK)
                t_re = tl.load(re_ptr + rows[:, None] * D2 + n2[None, :])
                t_im = tl.load(im_ptr + rows[:, None] * D2 + n2[None, :])
                t1, t2, t3 = _gauss_dot(t_re, t_im, c2_ptr, c2ps2_ptr, c2ms2_ptr, n2, k2, D2, t1, t2, t3, PRECISION)
            # Every thread has read these rows of T before any overwrites them.
            tl.debug_barrier()
            at = rows[:, None] * D2 + k2[None, :]
            tl.store(re_ptr + at, t1 - t3)
            tl.store(im_ptr + at, t1 - t2)  # t2 accumulated +(C + S), not Q = -(C + S)
    else:
        N2: tl.constexpr = D2 // N3
        i2 = tl.arange(0, BLOCK_ROWS * N3)  # tile row (r, n3) = (i2 // N3, i2 % N3)
        i3 = tl.arange(0, BLOCK_ROWS * N2)  # tile row (r, k2) = (i3 // N2, i3 % N2)
        twiddle = (i2 % N3)[:, None] * N2 + tl.arange(0, N2)[None, :]  # (rc - i rs)[n3, k2]
        for r0 in range(0, D1, BLOCK_ROWS):
            # Stage 2: [(r, n3), n2] at n2 N3 + n3, times F_N2 and w_D2^(n3 k2), in place.
            at = ((r0 + i2 // N3) * D2 + i2 % N3)[:, None] + tl.arange(0, N2)[None, :] * N3
            re, im = _row_dft(tl.load(re_ptr + at), tl.load(im_ptr + at), c2_ptr, c2ps2_ptr, c2ms2_ptr, N2, PRECISION)
            tw_c = tl.load(rc_ptr + twiddle)
            tw_s = tl.load(rs_ptr + twiddle)
            tl.debug_barrier()  # every thread has read the tile before any overwrites it
            tl.store(re_ptr + at, re * tw_c + im * tw_s)
            tl.store(im_ptr + at, im * tw_c - re * tw_s)
            tl.debug_barrier()  # stage 3 reads what other threads wrote
            # Stage 3: [(r, k2), n3] at k2 N3 + n3, times F_N3, in place (k3 at k2 N3 + k3).
            at = ((r0 + i3 // N2) * D2 + (i3 % N2) * N3)[:, None] + tl.arange(0, N3)[None, :]
            re, im = _row_dft(tl.load(re_ptr + at), tl.load(im_ptr + at), c3_ptr, c3ps3_ptr, c3ms3_ptr, N3, PRECISION)
            tl.debug_barrier()
            tl.store(re_ptr + at, re)
            tl.store(im_ptr + at, im)


@triton.jit
def _spectrum_tile(r0, D2: tl.constexpr, N3: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """The register tile that phase B2 gives the row block r0: (k1, j, at), the spectrum's row
    k1 (a column), row frequency j and scratch position at = k1 D2 + column(j) of its entries,
    column(j) = (j mod N2) N3 + j div N2 (j itself for N3 = 1). Tile shape (BLOCK_ROWS, D2) for
    N3 = 1, else [(r, k2), k3] (BLOCK_ROWS N2, N3), the shape _inverse_rows's first stage takes."""
    if N3 == 1:
        k1 = (r0 + tl.arange(0, BLOCK_ROWS))[:, None]
        j = tl.arange(0, D2)[None, :]
    else:
        N2: tl.constexpr = D2 // N3
        i3 = tl.arange(0, BLOCK_ROWS * N2)
        k1 = (r0 + i3 // N2)[:, None]
        j = (i3 % N2)[:, None] + N2 * tl.arange(0, N3)[None, :]
    return k1, j, k1 * D2 + _spectrum_column(j, D2, N3)


@triton.jit
def _spectrum_column(j, D2: tl.constexpr, N3: tl.constexpr):
    """The column of a row's scratch that holds its row frequency j (see _transform_rows)."""
    N2: tl.constexpr = D2 // N3
    return (j % N2) * N3 + j // N2


@triton.jit
def _inverse_rows(p_re, p_im, r0, out_re, out_im, c2_ptr, c2ps2_ptr, c2ms2_ptr, c3_ptr, c3ps3_ptr, c3ms3_ptr,
                  rc_ptr, rs_ptr, tc_ptr, ts_ptr, PRECISION: tl.constexpr, D2: tl.constexpr, N3: tl.constexpr,
                  BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Phase B2's transform: V[rows, :] = IDFT_D2(P) * conj(W) (not divided by D2) for the rows
    r0 + [0, BLOCK_ROWS), P = p_re + i p_im the register tile of _spectrum_tile, into the planes
    out_re, out_im. N3 = 1: P @ conj(F_D2) by column blocks. Otherwise the forward's two
    stages transposed and in reverse: [(r, k2), k3] @ conj(F_N3) times w_D2^(-n3 k2), stored at
    k2 N3 + n3; then [(r, n3), k2] @ conj(F_N2), in place at n2 N3 + n3. Writes only its rows."""
    if N3 == 1:
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        k2 = tl.arange(0, D2)
        for c0 in range(0, D2, BLOCK):
            m2 = c0 + tl.arange(0, BLOCK)
            zero = tl.zeros((BLOCK_ROWS, BLOCK), dtype=tl.float32)
            # P @ (C + i S), by Gauss with E = S: Q = S - C = -(C - S), R = C + S.
            t1, t2, t3 = _gauss_dot(p_re, p_im, c2_ptr, c2ms2_ptr, c2ps2_ptr, k2, m2, D2, zero, zero, zero, PRECISION)
            v_re = t1 - t3
            v_im = t1 - t2
            out = rows[:, None] * D2 + m2[None, :]
            tw_c = tl.load(tc_ptr + out)
            tw_s = tl.load(ts_ptr + out)
            tl.store(out_re + out, v_re * tw_c - v_im * tw_s)  # times conj(W) = TC + i TS
            tl.store(out_im + out, v_re * tw_s + v_im * tw_c)
    else:
        N2: tl.constexpr = D2 // N3
        i3 = tl.arange(0, BLOCK_ROWS * N2)
        n3 = tl.arange(0, N3)
        y_re, y_im = _row_dft(p_re, p_im, c3_ptr, c3ms3_ptr, c3ps3_ptr, N3, PRECISION)
        twiddle = n3[None, :] * N2 + (i3 % N2)[:, None]
        tw_c = tl.load(rc_ptr + twiddle)
        tw_s = tl.load(rs_ptr + twiddle)
        at = ((r0 + i3 // N2) * D2 + (i3 % N2) * N3)[:, None] + n3[None, :]
        tl.store(out_re + at, y_re * tw_c - y_im * tw_s)  # times w_D2^(-n3 k2) = rc + i rs
        tl.store(out_im + at, y_re * tw_s + y_im * tw_c)
        tl.debug_barrier()  # the second stage reads what other threads wrote
        i2 = tl.arange(0, BLOCK_ROWS * N3)
        at = ((r0 + i2 // N3) * D2 + i2 % N3)[:, None] + tl.arange(0, N2)[None, :] * N3
        v_re, v_im = _row_dft(tl.load(out_re + at), tl.load(out_im + at), c2_ptr, c2ms2_ptr, c2ps2_ptr, N2, PRECISION)
        tw_c = tl.load(tc_ptr + at)
        tw_s = tl.load(ts_ptr + at)
        tl.debug_barrier()  # every thread has read the tile before any overwrites it
        tl.store(out_re + at, v_re * tw_c - v_im * tw_s)  # times conj(W)
        tl.store(out_im + at, v_re * tw_s + v_im * tw_c)


@triton.jit
def _inverse_columns(v_re_ptr, v_im_ptr, c1_ptr, s1_ptr, m2, IMAG: tl.constexpr, PRECISION: tl.constexpr,
                     D1: tl.constexpr, D2: tl.constexpr, BLOCK: tl.constexpr):
    """Phase C for the columns m2: one part of conj(F_D1) @ V[:, m2] = (C + i S)(V_re + i V_im),
    not yet divided by d, by 2 real dots: the real part C V_re - S V_im, or with IMAG the
    imaginary part S V_re + C V_im. (One accumulator at a time: both at once spilled.)"""
    m1 = tl.arange(0, D1)
    acc = tl.zeros((D1, BLOCK), dtype=tl.float32)
    for r0 in range(0, D1, BLOCK):
        k = r0 + tl.arange(0, BLOCK)  # rows k1 of V
        v_re = tl.load(v_re_ptr + k[:, None] * D2 + m2[None, :])
        v_im = tl.load(v_im_ptr + k[:, None] * D2 + m2[None, :])
        c = tl.load(c1_ptr + m1[:, None] * D1 + k[None, :])
        s = tl.load(s1_ptr + m1[:, None] * D1 + k[None, :])
        if IMAG:
            acc = dot(s, v_re, dot(c, v_im, acc, PRECISION), PRECISION)
        else:
            acc = dot(c, v_re, dot(-s, v_im, acc, PRECISION), PRECISION)
    return acc


@triton.jit
def _gather_row(out_row, stride_outn, n, h_ptr, s_ptr, src, BLOCK: tl.constexpr):
    """out[i] = s(i) src[h(i)] for i < n (the count sketch's adjoint of one row), cast to
    out's dtype; src float32 (the scratch), h and s contiguous."""
    for i0 in range(0, n, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        mask = i < n
        h = tl.load(h_ptr + i, mask=mask, other=0)
        s = tl.load(s_ptr + i, mask=mask, other=0).to(tl.float32)
        v = tl.load(src + h, mask=mask, other=0.0)
        # s is +-1: the only rounding is the cast.
        tl.store(out_row + i.to(tl.int64) * stride_outn, (v * s).to(out_row.dtype.element_ty), mask=mask)


@dot_flops(_fused_flops)
@triton.jit
def _fused_vector_cbp_kernel(
    x_ptr, y_ptr,
    x_offsets_ptr, x_perm_ptr, x_sign_ptr, y_offsets_ptr, y_perm_ptr, y_sign_ptr,
    c1_ptr, s1_ptr, c2_ptr, c2ps2_ptr, c2ms2_ptr, tc_ptr, ts_ptr, c3_ptr, c3ps3_ptr, c3ms3_ptr, rc_ptr, rs_ptr,
    scratch_ptr, z_ptr, gate_ptr, out_ptr,
    B, eps, stride_xb, stride_xn, stride_yb, stride_yn, stride_zb, stride_gate_b, stride_gate_d, stride_outb,
    PRECISION: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, N3: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr,
    EPILOGUE: tl.constexpr, HAS_GATE: tl.constexpr, NORMALIZE: tl.constexpr, EPILOGUE_BLOCK: tl.constexpr,
):
    """z[b] = IDFT(DFT(sketch_x[b]) DFT(sketch_y[b])) (d = D1 D2 float32 values) for every
    sample b of x (B, n_x), y (B, n_y), one persistent program per scratch slot of 4 d float32
    values ((programs, 4, d): T then U (re, im), V (re, im)); phases in the section comment.
    Without EPILOGUE z[b] goes to z (B, d); with it z[b] goes to the scratch's plane 0 and the
    program finishes the row there: out[b] = epilogue(z[b]) (z * gate, signed sqrt, L2, cast
    to out's dtype; _common.epilogue_row), z_ptr unused, gate (B, d) any strides."""
    D: tl.constexpr = D1 * D2
    pid = tl.program_id(0)
    scratch = scratch_ptr + pid.to(tl.int64) * (4 * D)
    u_re, u_im, v_re, v_im = scratch, scratch + D, scratch + 2 * D, scratch + 3 * D
    for b in range(pid, B, tl.num_programs(0)):
        b64 = tl.cast(b, tl.int64)
        _transform_columns(x_ptr + b64 * stride_xb, stride_xn, x_offsets_ptr, x_perm_ptr, x_sign_ptr,
                           y_ptr + b64 * stride_yb, stride_yn, y_offsets_ptr, y_perm_ptr, y_sign_ptr,
                           c1_ptr, s1_ptr, tc_ptr, ts_ptr, u_re, u_im, True, PRECISION, D1, D2, BLOCK)
        tl.debug_barrier()
        _transform_rows(u_re, u_im, c2_ptr, c2ps2_ptr, c2ms2_ptr, c3_ptr, c3ps3_ptr, c3ms3_ptr, rc_ptr, rs_ptr,
                        PRECISION, D1, D2, N3, BLOCK_ROWS, BLOCK)
        tl.debug_barrier()
        # Phase B2: P = (u^2 - v^2) / (4i), v = conj(U[-k]): with k = k1 + D1 j (j the row
        # frequency), -k = (-k1 mod D1) + D1 ((-j - [k1 > 0]) mod D2). V goes to its own
        # planes: the rows -k of U are read by other row blocks.
        for r0 in range(0, D1, BLOCK_ROWS):
            k1, j, at = _spectrum_tile(r0, D2, N3, BLOCK_ROWS)
            neg_j = (2 * D2 - j - (k1 > 0).to(tl.int32)) % D2
            neg_at = ((D1 - k1) % D1) * D2 + _spectrum_column(neg_j, D2, N3)
            ur = tl.load(u_re + at)
            ui = tl.load(u_im + at)
            vr = tl.load(u_re + neg_at)
            vi = -tl.load(u_im + neg_at)
            p_re = (ur * ui - vr * vi) * 0.5
            p_im = ((ui * ui - ur * ur) + (vr * vr - vi * vi)) * 0.25
            _inverse_rows(p_re, p_im, r0, v_re, v_im, c2_ptr, c2ps2_ptr, c2ms2_ptr, c3_ptr, c3ps3_ptr, c3ms3_ptr,
                          rc_ptr, rs_ptr, tc_ptr, ts_ptr, PRECISION, D2, N3, BLOCK_ROWS, BLOCK)
        tl.debug_barrier()
        # Phase C, by column blocks of m2: z[:, m2] = Re(conj(F_D1) @ V[:, m2]) / d. The next
        # sample's phase A writes only U, which no thread reads after the barrier above; so
        # does the epilogue's z, row-major in plane 0, which no thread reads after it either.
        if EPILOGUE:
            z_row = u_re
        else:
            z_row = z_ptr + b64 * stride_zb
        m1 = tl.arange(0, D1)
        for c0 in range(0, D2, BLOCK):
            m2 = c0 + tl.arange(0, BLOCK)
            re = _inverse_columns(v_re, v_im, c1_ptr, s1_ptr, m2, False, PRECISION, D1, D2, BLOCK)
            # d is a power of two: the division is exact.
            tl.store(z_row + m1[:, None] * D2 + m2[None, :], re / D)
        if EPILOGUE:
            # The row's epilogue reads z[b] as other threads wrote it (from L1/L2, never
            # HBM); the barrier after it keeps the next sample's phase A from overwriting
            # plane 0 while a thread still reads it. z's row stride 0: plane 0 is this row.
            tl.debug_barrier()
            epilogue_row(u_re, gate_ptr, out_ptr, b64, D, eps, 0, 1, stride_gate_b, stride_gate_d, stride_outb,
                         HAS_GATE, NORMALIZE, tl.float32, EPILOGUE_BLOCK)
            tl.debug_barrier()


@dot_flops(_fused_backward_flops)
@triton.jit
def _fused_vector_cbp_backward_kernel(
    g_ptr, x_ptr, y_ptr,
    x_offsets_ptr, x_perm_ptr, x_sign_ptr, y_offsets_ptr, y_perm_ptr, y_sign_ptr,
    hx_ptr, sx_ptr, hy_ptr, sy_ptr,
    c1_ptr, s1_ptr, c2_ptr, c2ps2_ptr, c2ms2_ptr, tc_ptr, ts_ptr, c3_ptr, c3ps3_ptr, c3ms3_ptr, rc_ptr, rs_ptr,
    scratch_ptr, dx_ptr, dy_ptr,
    B, NX, NY, stride_gb, stride_gd, stride_xb, stride_xn, stride_yb, stride_yn,
    stride_dxb, stride_dxn, stride_dyb, stride_dyn,
    PRECISION: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, N3: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_GATHER: tl.constexpr,
):
    """dx[b], dy[b] from g[b] = dL/dz[b] (B, d, any float dtype) for every sample b, one
    persistent program per scratch slot of 4 d float32 values ((programs, 4, d): planes 0-1
    U, then grad_a + i grad_b; planes 2-3 DFT(g), then V); phases in the section comment."""
    D: tl.constexpr = D1 * D2
    pid = tl.program_id(0)
    scratch = scratch_ptr + pid.to(tl.int64) * (4 * D)
    u_re, u_im, g_re, g_im = scratch, scratch + D, scratch + 2 * D, scratch + 3 * D
    for b in range(pid, B, tl.num_programs(0)):
        b64 = tl.cast(b, tl.int64)
        x_row, y_row = x_ptr + b64 * stride_xb, y_ptr + b64 * stride_yb
        _transform_columns(x_row, stride_xn, x_offsets_ptr, x_perm_ptr, x_sign_ptr,
                           y_row, stride_yn, y_offsets_ptr, y_perm_ptr, y_sign_ptr,
                           c1_ptr, s1_ptr, tc_ptr, ts_ptr, u_re, u_im, True, PRECISION, D1, D2, BLOCK)
        _transform_columns(g_ptr + b64 * stride_gb, stride_gd, x_offsets_ptr, x_perm_ptr, x_sign_ptr,
                           y_row, stride_yn, y_offsets_ptr, y_perm_ptr, y_sign_ptr,
                           c1_ptr, s1_ptr, tc_ptr, ts_ptr, g_re, g_im, False, PRECISION, D1, D2, BLOCK)
        tl.debug_barrier()
        _transform_rows(u_re, u_im, c2_ptr, c2ps2_ptr, c2ms2_ptr, c3_ptr, c3ps3_ptr, c3ms3_ptr, rc_ptr, rs_ptr,
                        PRECISION, D1, D2, N3, BLOCK_ROWS, BLOCK)
        _transform_rows(g_re, g_im, c2_ptr, c2ps2_ptr, c2ms2_ptr, c3_ptr, c3ps3_ptr, c3ms3_ptr, rc_ptr, rs_ptr,
                        PRECISION, D1, D2, N3, BLOCK_ROWS, BLOCK)
        tl.debug_barrier()
        # Phase B2: Q = i DFT(g) conj(u), elementwise, then V = IDFT_D2(Q) * conj(W) written
        # over DFT(g)'s rows, each row block reading only its own.
        for r0 in range(0, D1, BLOCK_ROWS):
            _, _, at = _spectrum_tile(r0, D2, N3, BLOCK_ROWS)
            ur = tl.load(u_re + at)
            ui = tl.load(u_im + at)
            gr = tl.load(g_re + at)
            gi = tl.load(g_im + at)
            # i (gr + i gi)(ur - i ui) = (gr ui - gi ur) + i (gr ur + gi ui)
            q_re = gr * ui - gi * ur
            q_im = gr * ur + gi * ui
            tl.debug_barrier()
            _inverse_rows(q_re, q_im, r0, g_re, g_im, c2_ptr, c2ps2_ptr, c2ms2_ptr, c3_ptr, c3ps3_ptr, c3ms3_ptr,
                          rc_ptr, rs_ptr, tc_ptr, ts_ptr, PRECISION, D2, N3, BLOCK_ROWS, BLOCK)
        tl.debug_barrier()
        # Phase C, by column blocks of m2: grad_a + i grad_b = conj(F_D1) @ V / d, over U
        # (no thread reads U after the barrier above).
        m1 = tl.arange(0, D1)
        for c0 in range(0, D2, BLOCK):
            m2 = c0 + tl.arange(0, BLOCK)
            at = m1[:, None] * D2 + m2[None, :]
            tl.store(u_re + at, _inverse_columns(g_re, g_im, c1_ptr, s1_ptr, m2, False, PRECISION, D1, D2, BLOCK) / D)
            tl.store(u_im + at, _inverse_columns(g_re, g_im, c1_ptr, s1_ptr, m2, True, PRECISION, D1, D2, BLOCK) / D)
        tl.debug_barrier()
        # Phase D: the count sketches' adjoints, gathered from the scratch; the barrier after
        # it keeps the next sample's phase A from overwriting what another thread still reads.
        _gather_row(dx_ptr + b64 * stride_dxb, stride_dxn, NX, hx_ptr, sx_ptr, u_re, BLOCK_GATHER)
        _gather_row(dy_ptr + b64 * stride_dyb, stride_dyn, NY, hy_ptr, sy_ptr, u_im, BLOCK_GATHER)
        tl.debug_barrier()


def _resident_programs(device: torch.device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else _ASSUMED_SMS
    return sms * _FUSED_PROGRAMS_PER_SM


def _fused_setup(x: torch.Tensor, y: torch.Tensor, out_dim: int, factors, programs, precision):
    """Checks the fused kernels' arguments; (D1, D2), the grid size (0 for no samples) and the
    launch options both kernels share."""
    d1, d2, n3 = _check_factors(out_dim, factors)
    if x.dtype not in KERNEL_DTYPES or y.dtype != x.dtype:
        raise ValueError(f"x, y: the fused kernel takes float32, float16 or bfloat16 of one dtype, got {x.dtype}, {y.dtype}")
    if precision not in (None, *_FUSED_ROW_BLOCK):
        raise ValueError(f"precision: expected None or one of {tuple(_FUSED_ROW_BLOCK)}, got {precision!r}")
    programs = min(x.shape[0], programs or _resident_programs(x.device))
    precision = precision or _FUSED_PRECISION[x.dtype]
    narrow = n3 > 1 or precision == "tf32x3"
    if n3 > 1:
        block_rows = _FUSED_ROW_BLOCK[precision] // d2
    else:
        block_rows = _FUSED_BLOCK_NARROW if narrow else _FUSED_BLOCK_ROWS
    options = dict(
        PRECISION=precision, D1=d1, D2=d2, N3=n3,
        BLOCK_ROWS=min(block_rows, d1),
        BLOCK=min(_FUSED_BLOCK_NARROW if narrow else _FUSED_BLOCK, d1, d2),
        num_warps=_FUSED_NUM_WARPS, num_stages=_FUSED_NUM_STAGES,
    )
    return (d1, d2, n3), programs, options


def _tables(hashes, signs, out_dim: int) -> list[torch.Tensor]:
    """The CSR inverse tables' (offsets, perm, sign) of both modalities, x's first."""
    tables = [inverse_table(h, s, out_dim) for h, s in zip(hashes, signs)]
    return [t for table in tables for t in (table.offsets, table.perm, table.sign)]


def fused_vector_sketch(x: torch.Tensor, y: torch.Tensor, hashes, signs, out_dim: int,
                        factors: tuple[int, ...] | None = None, programs: int | None = None,
                        epilogue: tuple | None = None, precision: str | None = None) -> torch.Tensor:
    """z (B, d) float32 = IDFT(DFT(C1 x) DFT(C2 y)), the unpooled tensor sketch of x (B, n1),
    y (B, n2) (any strides), in one launch of _fused_vector_cbp_kernel. float16 and float32
    dots run at _FUSED_PRECISION[x.dtype] (tf32x3; IEEE float32 under the interpreter) unless
    ``precision`` ("tf32" or "tf32x3") says otherwise: one pass is the faster, measured
    alternative the accuracy tests hold against the routed one. ``factors``: (D1, D2) or
    (D1, N2, N3) (default: :func:`fused_factors`); ``programs``: the persistent grid's size
    (default: as many as the device keeps resident, at most B).

    With ``epilogue`` = (gate, normalize, eps) it returns instead out (B, d), contiguous in
    x's dtype: out[b] = z[b] * gate[b] (gate (B, d), any float dtype and strides, or None for
    1), then with ``normalize`` s = sign(v) sqrt(|v| + eps) and out[b] = s / max(||s||_2, eps)
    (as _common.epilogue_forward); from the same launch, each program finishing the rows it
    computes, so z never reaches memory beyond the program's scratch."""
    tables, programs, options = _fused_setup(x, y, out_dim, factors, programs, precision)
    batch = x.shape[0]
    gate, normalize, eps = epilogue or (None, False, 0.0)
    if gate is not None and gate.shape != (batch, out_dim):
        raise ValueError(f"gate: expected shape {(batch, out_dim)}, got {tuple(gate.shape)}")
    result = torch.empty((batch, out_dim), dtype=torch.float32 if epilogue is None else x.dtype, device=x.device)
    if programs == 0:
        return result
    scratch = torch.empty((programs, 4, out_dim), dtype=torch.float32, device=x.device)
    # Without an epilogue, result is z (and out_ptr a pointer never written); with one it is
    # out (and z_ptr never written). gate_or_out: a pointer never read without a gate.
    gate_or_out = result if gate is None else gate
    _fused_vector_cbp_kernel[(programs,)](
        x, y, *_tables(hashes, signs, out_dim), *_dft_tables(*tables, x.device), scratch, result, gate_or_out, result,
        batch, eps, *x.stride(), *y.stride(), result.stride(0), *gate_or_out.stride(), result.stride(0),
        EPILOGUE=epilogue is not None, HAS_GATE=gate is not None, NORMALIZE=normalize,
        EPILOGUE_BLOCK=_FUSED_EPILOGUE_BLOCK, **options,
    )
    return result


def fused_vector_sketch_backward(grad_z: torch.Tensor, x: torch.Tensor, y: torch.Tensor, hashes, signs,
                                 out_dim: int, factors: tuple[int, ...] | None = None,
                                 programs: int | None = None, precision: str | None = None,
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dy), the vector-Jacobian product of :func:`fused_vector_sketch` at x (B, n1),
    y (B, n2) with grad_z (B, d) (any float dtype and strides): dx[b, i] = s1(i) grad_a[b, h1(i)],
    grad_a = IDFT(DFT(g) conj(DFT(sketch_y))), and dy likewise with the roles swapped; in one
    launch of _fused_vector_cbp_backward_kernel. x's and y's dtypes and shapes, contiguous;
    precision and arguments as :func:`fused_vector_sketch`."""
    tables, programs, options = _fused_setup(x, y, out_dim, factors, programs, precision)
    if grad_z.shape != (x.shape[0], out_dim):
        raise ValueError(f"grad_z: expected shape {(x.shape[0], out_dim)}, got {tuple(grad_z.shape)}")
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if programs == 0:
        return dx, dy
    scratch = torch.empty((programs, 4, out_dim), dtype=torch.float32, device=x.device)
    (hx, hy), (sx, sy) = [h.contiguous() for h in hashes], [s.contiguous() for s in signs]
    _fused_vector_cbp_backward_kernel[(programs,)](
        grad_z, x, y, *_tables(hashes, signs, out_dim), hx, sx, hy, sy, *_dft_tables(*tables, x.device),
        scratch, dx, dy,
        x.shape[0], x.shape[1], y.shape[1], *grad_z.stride(), *x.stride(), *y.stride(), *dx.stride(), *dy.stride(),
        BLOCK_GATHER=_FUSED_BLOCK_GATHER, **options,
    )
    return dx, dy


def _takes_fused(xs, out_dim: int) -> bool:
    """The fused vector kernels' domain, forward and backward alike: two unpooled modalities
    of a float dtype, d factorisable (:func:`fused_factors`)."""
    return (len(xs) == 2 and xs[0].shape[1] == 1 and xs[0].dtype in _FUSED_DTYPES
            and fused_factors(out_dim) is not None)


# ----------------------------------------------------------------------------- dispatch


def _forward(xs, hashes, signs, out_dim: int, mean: bool, gate, normalize: bool, eps: float, algorithm: str,
             save_residuals: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(output, residuals). The Gram path saves z (B, d), the op's residual, when it has a gate
    or normalisation and autograd records the call: one X^T Y fewer in the backward, for
    B * d values. The FFT path, fused or not, saves nothing (its residuals would be the
    per-position spectra): its backward recomputes."""
    if algorithm == "gram":
        z, out = _gram_pooled_sketch(xs, hashes, signs, out_dim, mean, (gate, normalize, eps))
        return out, [z] if save_residuals and (gate is not None or normalize) else []
    if _takes_fused(xs, out_dim):
        # T = 1: the sum over positions and the mean are the sample itself. Nothing is saved:
        # the fused backward recomputes z when its epilogue needs it.
        out = fused_vector_sketch(xs[0][:, 0], xs[1][:, 0], hashes, signs, out_dim, epilogue=(gate, normalize, eps))
        return out, []
    work = compute_dtype(xs[0].dtype)
    z = _pooled_sketch(_spectra(xs, hashes, signs, out_dim, work), xs[0].shape[0], out_dim, mean)
    return epilogue_forward(z, gate, normalize, eps, xs[0].dtype), []


def _gram_backward(grad, residuals, xs, hashes, signs, out_dim: int, mean: bool, gate, normalize: bool, eps: float):
    """[dx, dy] (+ [dgate]): z (saved, or recomputed, only with a gate or normalisation), then
    one launch for both inputs' gradients with the epilogue's backward folded in."""
    z = None
    if gate is not None or normalize:
        z = residuals[0] if residuals else _gram_pooled_sketch(xs, hashes, signs, out_dim, mean)[0]
    return _gram_adjoint(grad, z, xs, hashes, signs, mean, gate, normalize, eps)


def _fused_backward(grad, xs, hashes, signs, out_dim: int, gate, normalize: bool, eps: float) -> list[torch.Tensor]:
    """[dx, dy] (+ [dgate]) on the fused vector path: z recomputed for the epilogue's backward
    only (as the FFT path recomputes it), then one fused backward launch.

    With normalisation z comes from the FFT path (float32 FFTs), not the fused forward, in
    every dtype: the signed sqrt's derivative 1 / (2 sqrt|z|) magnifies the error of the bins
    nearest 0. A float32-accurate fused z (float32 dots, as tf32x3 gives) made dy of float16
    CBP 2.26x PyTorch's float16 error at d = 2048
    (test_fused_vector_cbp_backward_half_within_twice_torch_error), outside the 2x rule. With
    a gate only, dgate = (dL/dout) z is linear in z."""
    x, y = xs[0][:, 0], xs[1][:, 0]
    grads_gate = []
    if gate is not None or normalize:
        if normalize:
            z = _pooled_sketch(_spectra(xs, hashes, signs, out_dim, torch.float32), x.shape[0], out_dim, False)
        else:
            z = fused_vector_sketch(x, y, hashes, signs, out_dim)
        grad, grad_gate = epilogue_backward(grad, z, gate, normalize, eps, torch.float32)
        if grad_gate is not None:
            grads_gate = [grad_gate]
    dx, dy = fused_vector_sketch_backward(grad, x, y, hashes, signs, out_dim)
    return [dx[:, None], dy[:, None]] + grads_gate


def _backward(
    grad, residuals, xs, hashes, signs, out_dim: int, mean: bool, gate, normalize: bool, eps: float, algorithm: str
) -> list[torch.Tensor]:
    if algorithm == "gram":
        return _gram_backward(grad, residuals, xs, hashes, signs, out_dim, mean, gate, normalize, eps)
    if _takes_fused(xs, out_dim):
        return _fused_backward(grad, xs, hashes, signs, out_dim, gate, normalize, eps)
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


def _saves_residuals(xs, hashes, signs, out_dim, mean, gate, normalize, eps, algorithm) -> bool:
    return algorithm == "gram"  # see _forward


def _accepts(xs, hashes, signs, out_dim, mean, gate, normalize, eps, algorithm) -> bool:
    """The FFT path computes every dtype (float64 in float64); the Gram path's tl.dot lacks float64."""
    return algorithm == "fft" or xs[0].dtype in KERNEL_DTYPES


_dispatch.register_kernel(
    "compact_bilinear", "triton", forward=_forward, backward=_backward, device_types=DEVICE_TYPES,
    saves_residuals=_saves_residuals, dtypes=_accepts,
)
