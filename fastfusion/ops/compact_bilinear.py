"""Tensor sketch and compact bilinear pooling (CBP), optionally gated (CBGP).

Tensor sketch of M >= 2 modalities, each count-sketched to length d:

    TS(x_1, ..., x_M) = IFFT( prod_m FFT(C_m(x_m)) )          (circular, length d)

It is *exactly* the count sketch of the flattened outer product x_1 (x) ... (x) x_M with
hash (sum_m h_m(i_m)) mod d and sign prod_m s_m(i_m), so <TS(x, y), TS(z, w)> is an
unbiased estimate of <x, z><y, w>. Real FFTs of length d (rfft / irfft with n=d) keep
odd d exact. The scale is the mathematical one (normalised inverse FFT); Caffe-derived
code multiplies by d, a constant that the L2 normalisation cancels.

Pooling over positions t (time steps, spatial cells) happens in the frequency domain:
sum_t IFFT(P_t) = IFFT(sum_t P_t), one inverse transform per sample. "mean" divides by T.

Compact bilinear pooling:  z = g * sum_t TS(x_1t, ..., x_Mt), with an optional gate g
(CBGP, shape (..., d), e.g. softmax(W [pooled inputs] + b)), then signed sqrt and L2
normalisation when ``normalize``.

Two algorithms compute the pooled sketch of two modalities; they agree to rounding:

- "fft": as above, M rffts per position, the spectra multiplied and summed over t, one irfft
  per sample: about (M + 1) T d log2 d work and M T d intermediate values per sample.
- "gram": pooling is linear, so sum_t TS(x_t, y_t) is the count sketch of the Gram matrix
  G = X^T Y (X (T, n_1), Y (T, n_2)) with the combined hash (h_1(i) + h_2(j)) mod d and sign
  s_1(i) s_2(j): an exact identity. One GEMM (2 T n_1 n_2 flops) and a scatter of n_1 n_2
  values per sample; no per-position sketch or spectrum exists. Its backward gathers
  dG_ij = s_1(i) s_2(j) dz_{(h_1(i) + h_2(j)) mod d} and forms dX = Y dG^T, dY = X dG.

"auto" picks per call from the sizes (:func:`algorithm_costs`): the Gram path wins for long
sequences of small features (spatial cells, frames), the FFT path for single vectors and wide
features. Only two modalities have a Gram path.

The custom op works on a canonical layout: every modality (B, T, n_m), output (B, d);
unpooled calls use T = 1. Inputs in float16/bfloat16 are transformed in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections import Counter

import torch

from .. import _custom_op, _dispatch
from .._dispatch import compute_dtype
from .._validation import (
    check_eps,
    check_like,
    check_modality_tensors,
    check_positive_int,
    check_same_count,
    check_shape,
    check_tensor,
)
from ..flops import fft_flops
from ._common import product
from .count_sketch import check_sketch_args, count_sketch_adjoint, count_sketch_reference
from .signed_sqrt_l2 import DEFAULT_EPS, signed_sqrt_l2_reference, signed_sqrt_l2_vjp

# The public function(s), exported by fastfusion, and their references, by fastfusion.reference.
__all__ = ["compact_bilinear", "tensor_sketch", "compact_bilinear_reference", "tensor_sketch_reference"]

POOL_MODES = ("sum", "mean")
ALGORITHMS = ("auto", "gram", "fft")


@dataclasses.dataclass(frozen=True)
class _Throughput:
    """What a device does per second, for :func:`algorithm_costs`."""

    gemm_flops: dict  # dtype -> dense matmul flop/s (2 per multiply-add)
    scatter: float  # Gram entries added into (or gathered from) the d bins
    fft_flops: float  # 2.5 N log2 N per real transform of length N
    bandwidth: float  # bytes of memory traffic


# cuda: an H100, derated from its datasheet (bf16 989, TF32 495, FP32 67 TFLOP/s, 3.35 TB/s)
# to what large kernels reach; the Gram scatter is one red.global.add per entry into bins that
# stay in L2. cpu: the C++ backend on 2 cores (AMD EPYC, python -m benchmarks.gram_crossover,
# both algorithms timed interleaved at eight shapes from T = 1 to 784): MKL's SGEMM about
# 60 GFLOP/s, the scatter about 1.1e9 entries/s, and a length-d transform with the sketch,
# product and pooling around it about 2.5 d log2 d / 20e9 s. The two models rank all eight
# shapes as measured; the closest call, B = 8, T = 9, n = (512, 512), d = 8192, measured
# 2.7 ms (fft) against 3.9 ms (gram).
_THROUGHPUT = {
    "cuda": _Throughput({torch.float64: 50e12, torch.float32: 50e12, "tf32": 350e12, torch.bfloat16: 600e12,
                         torch.float16: 600e12}, scatter=250e9, fft_flops=40e12, bandwidth=2.8e12),
    "cpu": _Throughput({torch.float64: 30e9, torch.float32: 60e9, torch.bfloat16: 60e9, torch.float16: 60e9},
                       scatter=1.1e9, fft_flops=20e9, bandwidth=200e9),
}


def algorithm_costs(device_type: str, batch: int, positions: int, dims, out_dim: int, dtype: torch.dtype) -> dict:
    """Modelled seconds of each algorithm for a call of this size: ``{"fft": s, "gram": s}``,
    without "gram" unless there are two modalities. A model to rank the two (FLOPs and bytes of
    each at a device's throughput), not a prediction of time; :func:`choose_algorithm` takes
    the cheaper."""
    rates = _THROUGHPUT.get(device_type, _THROUGHPUT["cpu"])
    size = dtype.itemsize
    rows = batch * positions
    transform = 2.5 * out_dim * math.log2(max(out_dim, 2)) / rates.fft_flops
    # Per position and modality a sketch, its spectrum and the product pass: about five
    # float32 passes over d values; per sample one inverse transform.
    fft = rows * len(dims) * (transform + 5 * 4 * out_dim / rates.bandwidth) + batch * transform
    costs = {"fft": fft}
    if len(dims) == 2:
        n1, n2 = dims
        unit = "tf32" if dtype == torch.float32 and device_type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else dtype
        gemm = 2 * rows * n1 * n2 / rates.gemm_flops[unit]
        costs["gram"] = gemm + batch * n1 * n2 / rates.scatter + rows * (n1 + n2) * size / rates.bandwidth
    return costs


def choose_algorithm(algorithm: str, device_type: str, batch: int, positions: int, dims, out_dim: int, dtype) -> str:
    """``algorithm`` resolved to "gram" or "fft": as asked, or for "auto" the cheaper by
    :func:`algorithm_costs`. On CUDA the Gram path adds into its bins with atomics, whose order
    varies, so under ``torch.use_deterministic_algorithms(True)`` "auto" takes the FFT path and
    an explicit "gram" raises (or warns, with warn_only) as PyTorch's own such ops do."""
    if algorithm == "auto":
        if device_type == "cuda" and torch.are_deterministic_algorithms_enabled():
            return "fft"
        costs = algorithm_costs(device_type, batch, positions, dims, out_dim, dtype)
        return "gram" if "gram" in costs and costs["gram"] < costs["fft"] else "fft"
    if algorithm == "gram" and device_type == "cuda" and torch.are_deterministic_algorithms_enabled():
        message = (
            "compact_bilinear with algorithm='gram' on CUDA sums in an order that varies between runs, but "
            "torch.use_deterministic_algorithms(True) is set: use algorithm='fft' (or 'auto', which does)"
        )
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(message)
        warnings.warn(message, stacklevel=4)
    return algorithm


def _transform(fft, t: torch.Tensor, n: int) -> torch.Tensor:
    """``fft`` (torch.fft.rfft or irfft) of length n over the last dimension. MKL, behind
    torch.fft on the CPU, rejects an empty batch ("Inconsistent configuration parameters"), so
    an empty one is transformed as a single row of zeros, then dropped: the empty result,
    still on autograd's graph."""
    if t.numel():
        return fft(t, n=n)
    row = fft(torch.cat([t.reshape(0, t.shape[-1]), t.new_zeros(1, t.shape[-1])]), n=n)
    return row[:0].reshape(t.shape[:-1] + row.shape[-1:])


def _spectra(xs, hashes, signs, out_dim: int, work: torch.dtype) -> list[torch.Tensor]:
    """rfft of each modality's count sketch: (B, T, n_m) -> (B, T, out_dim // 2 + 1)."""
    return [
        _transform(torch.fft.rfft, count_sketch_reference(x.to(work), h, s, out_dim), out_dim)
        for x, h, s in zip(xs, hashes, signs)
    ]


def _pooled_sketch(spectra: list[torch.Tensor], out_dim: int, mean: bool) -> torch.Tensor:
    """(B, T, d//2+1) spectra -> (B, d) pooled tensor sketch: one inverse FFT per sample."""
    pooled = product(spectra).sum(1)
    if mean:
        pooled = pooled / spectra[0].shape[1]
    return _transform(torch.fft.irfft, pooled, out_dim)


def _combined_hash(hashes, signs, out_dim: int, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gram path's hash and sign of entry (i, j): (h_1(i) + h_2(j)) mod d and
    s_1(i) s_2(j), each (n_1, n_2)."""
    bins = (hashes[0].long()[:, None] + hashes[1].long()[None, :]) % out_dim
    return bins, signs[0].to(work)[:, None] * signs[1].to(work)[None, :]


def _gram_pooled_sketch(xs, hashes, signs, out_dim: int, mean: bool, work: torch.dtype) -> torch.Tensor:
    """(B, T, n_1), (B, T, n_2) -> (B, d): the count sketch of each sample's X^T Y."""
    x, y = (t.to(work) for t in xs)
    bins, sign = _combined_hash(hashes, signs, out_dim, work)
    gram = torch.bmm(x.transpose(1, 2), y) * sign
    z = gram.new_zeros(gram.shape[0], out_dim).index_add(1, bins.flatten(), gram.flatten(1))
    return z / x.shape[1] if mean else z


def _gram_input_grads(g, xs, hashes, signs, out_dim: int, work: torch.dtype) -> list[torch.Tensor]:
    """[dx, dy] from g (B, d), the gradient reaching the pooled sketch ("mean"'s 1/T applied):
    dX = Y dG^T, dY = X dG with dG_ij = s_1(i) s_2(j) g[(h_1(i) + h_2(j)) mod d]."""
    bins, sign = _combined_hash(hashes, signs, out_dim, work)
    grad_gram = g.to(work)[:, bins] * sign  # (B, n_1, n_2)
    x, y = (t.to(work) for t in xs)
    dx, dy = torch.bmm(y, grad_gram.transpose(1, 2)), torch.bmm(x, grad_gram)
    return [dx.to(xs[0].dtype), dy.to(xs[1].dtype)]


def _pooled(xs, hashes, signs, out_dim: int, mean: bool, algorithm: str, work: torch.dtype) -> torch.Tensor:
    if algorithm == "gram":
        return _gram_pooled_sketch(xs, hashes, signs, out_dim, mean, work)
    return _pooled_sketch(_spectra(xs, hashes, signs, out_dim, work), out_dim, mean)


def _forward(xs, hashes, signs, out_dim: int, mean: bool, gate, normalize: bool, eps: float, algorithm: str) -> torch.Tensor:
    """Plain-PyTorch compact bilinear pooling on the canonical layout; differentiable."""
    work = compute_dtype(xs[0].dtype)
    z = _pooled(xs, hashes, signs, out_dim, mean, algorithm, work)
    if gate is not None:
        z = z * gate.to(work)
    if normalize:
        z = signed_sqrt_l2_reference(z, eps)
    return z.to(xs[0].dtype)


def _backward(
    grad, xs, hashes, signs, out_dim: int, mean: bool, gate, normalize: bool, eps: float, algorithm: str
) -> list[torch.Tensor]:
    """Gradients w.r.t. each xs[m] (B, T, n_m), then w.r.t. gate if one was given.

    FFT path: the adjoint of circular convolution is circular correlation, so with F_m the
    spectra, dC_k = IFFT( FFT(g) * conj(prod_{m != k} F_m) ), and dx_k is C_k's adjoint (a
    gather). Gram path: see the module docstring.
    """
    work = compute_dtype(xs[0].dtype)
    spectra = None if algorithm == "gram" else _spectra(xs, hashes, signs, out_dim, work)
    g = grad.to(work)
    grads_gate = []
    if gate is not None or normalize:
        if algorithm == "gram":
            z = _gram_pooled_sketch(xs, hashes, signs, out_dim, mean, work)
        else:
            z = _pooled_sketch(spectra, out_dim, mean)
        gated = z if gate is None else z * gate.to(work)
        if normalize:
            g = signed_sqrt_l2_vjp(g, gated, eps)
        if gate is not None:
            grads_gate = [(g * z).to(gate.dtype)]
            g = g * gate.to(work)
    if mean:
        g = g / xs[0].shape[1]
    if algorithm == "gram":
        return _gram_input_grads(g, xs, hashes, signs, out_dim, work) + grads_gate
    g_hat = _transform(torch.fft.rfft, g, out_dim).unsqueeze(1)
    grads = []
    for k, (x, h, s) in enumerate(zip(xs, hashes, signs)):
        others = product([f for m, f in enumerate(spectra) if m != k])
        # conj_physical, not the lazy conj: AOT-compiled graphs drop the lazy conjugate bit.
        grad_sketch = _transform(torch.fft.irfft, g_hat * others.conj_physical(), out_dim)
        grads.append(count_sketch_adjoint(grad_sketch, h, s).to(x.dtype))
    return grads + grads_gate


def _residuals(xs, hashes, signs, out_dim, mean, gate, normalize, eps, algorithm) -> list[torch.Tensor]:
    """The residuals a saving backend returns: on the FFT path the spectra rfft(C_m(x_m)) of
    every modality, (B, T, d//2 + 1) complex; then, on either path, with a gate or
    normalisation, the pooled sketch z before the gate (B, d); all in the compute dtype.
    ``algorithm`` is resolved: "gram" or "fft"."""
    batch, positions = xs[0].shape[:2]
    work = compute_dtype(xs[0].dtype)
    residuals = []
    if algorithm == "fft":
        residuals = [xs[0].new_empty((batch, positions, out_dim // 2 + 1), dtype=work.to_complex()) for _ in xs]
    if gate is not None or normalize:
        residuals.append(xs[0].new_empty((batch, out_dim), dtype=work))
    return residuals


def _flop_algorithm(args: dict) -> str:
    algorithm = args["algorithm"]
    if algorithm not in ("gram", "fft"):
        raise ValueError(f"fastfusion::compact_bilinear ran with algorithm={algorithm!r}; its FLOPs need 'gram' or 'fft'")
    return algorithm


def _flops(args: dict) -> Counter:
    """FFT path: count sketch and rfft per position and modality, the product pooled over T in
    the frequency domain, one irfft per sample. Gram path: X^T Y per sample and the scatter of
    its n_1 n_2 entries. (xs (B, T, n_m), as shapes.)"""
    xs, out_dim = args["xs"], args["out_dim"]
    batch, positions = xs[0][0], xs[0][1]
    if _flop_algorithm(args) == "gram":
        (_, _, n1), (_, _, n2) = xs
        return Counter(contraction=2 * batch * positions * n1 * n2, scatter_add=batch * n1 * n2)
    return Counter(
        scatter_add=sum(math.prod(x) for x in xs),
        fft=len(xs) * fft_flops(batch * positions, out_dim, complex_input=False)
        + fft_flops(batch, out_dim, complex_input=False),
    )


def _backward_flops(args: dict) -> Counter:
    xs, out_dim = args["xs"], args["out_dim"]
    batch, positions = xs[0][0], xs[0][1]
    if _flop_algorithm(args) == "gram":
        (_, _, n1), (_, _, n2) = xs
        return Counter(contraction=2 * (2 * batch * positions * n1 * n2))
    return Counter(
        fft=fft_flops(batch, out_dim, complex_input=False)
        + len(xs) * fft_flops(batch * positions, out_dim, complex_input=False)
    )


SPEC = _custom_op.register(_custom_op.OpSpec(
    name="compact_bilinear",
    args="Tensor[] xs, Tensor[] hashes, Tensor[] signs, SymInt out_dim, bool mean, Tensor? gate, bool normalize, "
    "float eps, str algorithm",
    forward=_forward,
    backward=_backward,
    fake=lambda xs, hashes, signs, out_dim, *_: xs[0].new_empty((xs[0].shape[0], out_dim)),
    residuals=_residuals,
    differentiable=("xs", "gate"),
    flops=_flops,
    backward_flops=_backward_flops,
    autocast="float32",  # the transforms run in float32 under autocast, like torch.fft's own policy
    cpp_saves_residuals=True,
))


def check_algorithm(algorithm, modalities: int) -> str:
    """``algorithm`` if it is one of ALGORITHMS that ``modalities`` inputs can take."""
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm == "gram" and modalities != 2:
        raise ValueError(f"algorithm='gram' needs exactly 2 modalities, got {modalities}; use 'fft' or 'auto'")
    return algorithm


def _check_inputs(xs, hashes, signs, out_dim, pool_dim, pool, gate, eps, algorithm, check_values):
    """Validates the public arguments; returns (xs, hashes, signs, out_dim, pool_dim, eps)."""
    min_ndim = 1 if pool_dim is None else 2
    xs = check_modality_tensors("xs", xs, min_ndim=min_ndim)
    hashes = check_same_count("hashes", hashes, "xs", len(xs))
    signs = check_same_count("signs", signs, "xs", len(xs))
    out_dim = check_positive_int("out_dim", out_dim)
    eps = check_eps("eps", eps)
    if pool not in POOL_MODES:
        raise ValueError(f"pool must be one of {POOL_MODES}, got {pool!r}")
    check_algorithm(algorithm, len(xs))
    for m, x in enumerate(xs):
        check_sketch_args(f"[{m}]", x, hashes[m], signs[m], out_dim, values=check_values)
    lead = xs[0].shape[:-1]
    if pool_dim is not None:
        if isinstance(pool_dim, bool) or not isinstance(pool_dim, int) or not -len(lead) - 1 <= pool_dim < len(lead):
            raise ValueError(
                f"pool_dim must index a leading (non-feature) dimension of xs, i.e. lie in "
                f"[{-len(lead) - 1}, {len(lead) - 1}] but not be the last, got {pool_dim!r}"
            )
        pool_dim = pool_dim % (len(lead) + 1)
        if pool_dim == len(lead):
            raise ValueError("pool_dim must not be the last (feature) dimension of xs")
    if gate is not None:
        check_tensor("gate", gate, batched=True)
        out_lead = lead if pool_dim is None else lead[:pool_dim] + lead[pool_dim + 1 :]
        check_shape("gate", gate, tuple(out_lead) + (out_dim,))
        check_like("gate", gate, "xs[0]", xs[0], dtype=False)
    return xs, hashes, signs, out_dim, pool_dim, eps


def _canonical(xs, pool_dim):
    """Move the pooled dimension next to the features and flatten the rest: (B, T, n_m). (B is
    given, not -1, which an empty T would leave undetermined.)"""
    if pool_dim is None:
        return [x.reshape(-1, 1, x.shape[-1]) for x in xs], xs[0].shape[:-1]
    moved = [x.movedim(pool_dim, -2) for x in xs]
    lead = moved[0].shape[:-2]
    return [x.reshape(math.prod(lead), x.shape[-2], x.shape[-1]) for x in moved], lead


def sketch_and_pool(
    xs, hashes, signs, out_dim, pool_dim, pool, gate, normalize, eps, backend, algorithm="auto", *, check_values=True
):
    """The body of :func:`compact_bilinear`; modules pass ``check_values=False`` for their
    hash/sign buffers, which were checked when built or loaded."""
    xs, hashes, signs, out_dim, pool_dim, eps = _check_inputs(
        xs, hashes, signs, out_dim, pool_dim, pool, gate, eps, algorithm, check_values
    )
    # Under autocast the inputs are cast (SPEC.autocast) when the op is called: the algorithm and
    # the gate's dtype follow the dtype the op computes in.
    dtype = _custom_op.cast_dtype(SPEC, xs[0].device.type) or xs[0].dtype
    if gate is not None:
        gate = gate.to(dtype)
    canonical, out_lead = _canonical(xs, pool_dim)
    flat_gate = None if gate is None else gate.reshape(-1, out_dim)
    batch, positions = canonical[0].shape[:2]
    algorithm = choose_algorithm(
        algorithm, _dispatch.device_type(xs[0]), batch, positions, [x.shape[-1] for x in xs], out_dim, dtype
    )
    out = _custom_op.call(
        "compact_bilinear", backend, canonical, hashes, signs, out_dim, pool == "mean", flat_gate, normalize, eps,
        algorithm,
    )
    return out.reshape(tuple(out_lead) + (out_dim,))


def tensor_sketch(
    xs, hashes, signs, out_dim, *, pool_dim=None, pool="sum", backend=None, algorithm="auto"
) -> torch.Tensor:
    """N-modal tensor sketch, optionally pooled over one leading dimension.

    xs: list of M >= 2 floating tensors (..., n_m) sharing their leading shape and dtype;
    hashes[m]: (n_m,) int32/int64 in [0, out_dim); signs[m]: (n_m,) of +1/-1.
    Returns (..., out_dim), or with ``pool_dim`` set that dimension summed (pool="sum")
    or averaged (pool="mean") away. ``algorithm``: "fft", "gram" (two modalities) or "auto",
    which picks per call from the sizes (see the module docstring).
    """
    return sketch_and_pool(xs, hashes, signs, out_dim, pool_dim, pool, None, False, DEFAULT_EPS, backend, algorithm)


def compact_bilinear(
    xs, hashes, signs, out_dim, *, pool_dim=None, pool="sum", gate=None, normalize=True, eps=DEFAULT_EPS, backend=None,
    algorithm="auto",
) -> torch.Tensor:
    """Compact bilinear pooling (CBP); gated (CBGP) when ``gate`` is given.

    Same inputs as :func:`tensor_sketch`; ``gate`` has the output's shape (..., out_dim)
    and multiplies the pooled sketch elementwise. With ``normalize`` the result goes
    through signed square root and L2 normalisation (see :func:`signed_sqrt_l2`).
    """
    return sketch_and_pool(xs, hashes, signs, out_dim, pool_dim, pool, gate, normalize, eps, backend, algorithm)


def tensor_sketch_reference(xs, hashes, signs, out_dim, *, pool_dim=None, pool="sum") -> torch.Tensor:
    """Plain-PyTorch :func:`tensor_sketch` by FFTs, as the papers state it (autograd, no custom op)."""
    return tensor_sketch(xs, hashes, signs, out_dim, pool_dim=pool_dim, pool=pool, backend="eager", algorithm="fft")


def compact_bilinear_reference(
    xs, hashes, signs, out_dim, *, pool_dim=None, pool="sum", gate=None, normalize=True, eps=DEFAULT_EPS
) -> torch.Tensor:
    """Plain-PyTorch :func:`compact_bilinear` by FFTs, as the papers state it (autograd, no custom op)."""
    return compact_bilinear(
        xs, hashes, signs, out_dim, pool_dim=pool_dim, pool=pool, gate=gate, normalize=normalize, eps=eps,
        backend="eager", algorithm="fft",
    )


def _benchmark_build(pooled: bool, gated: bool):
    """The case builder of two-or-more-modality CBP: vectors, or sequences sum-pooled over
    dim 1 (``pooled``), with a softmax gate over the output (``gated``)."""

    def build(s, randn):
        from ..modules import draw_hashes_and_signs  # modules imports the ops: imported on use

        drawn = draw_hashes_and_signs(s["n"], s["d"], seed=0)
        lead = (s["B"], s["T"]) if pooled else (s["B"],)
        args = tuple(randn(*lead, n) for n in s["n"])
        if gated:
            args += (randn(s["B"], s["d"]),)  # gate logits
        m = len(drawn)

        def apply(f, b, *args):
            gate = torch.softmax(args[-1], dim=-1) if gated else None
            return f(list(args[:m]), list(b[:m]), list(b[m:]), s["d"], pool_dim=1 if pooled else None, gate=gate)

        return args, (*(h for h, _ in drawn), *(g for _, g in drawn)), apply

    return build


def _benchmark_formulations(sizes) -> dict:
    """Besides the FFT reference, the Gram identity (module docstring) for two modalities."""
    if len(sizes["n"]) != 2:
        return {}
    return {"gram": functools.partial(compact_bilinear, backend="eager", algorithm="gram")}


def _declare_benchmark(variant: str, pooled: bool, gated: bool, shapes: dict) -> None:
    _custom_op.declare_benchmark(_custom_op.Benchmark(
        op="compact_bilinear", variant=variant, function=compact_bilinear, reference=compact_bilinear_reference,
        shapes=shapes, build=_benchmark_build(pooled, gated), formulations=_benchmark_formulations,
    ))


_declare_benchmark("vec", pooled=False, gated=False, shapes={
    "cuda": dict(B=512, n=(2048, 2048), d=16384),
    "cpu": dict(B=64, n=(512, 1024), d=8192),
    "cpu-quick": dict(B=32, n=(256, 512), d=4096),
    "tiny": dict(B=4, n=(8, 12), d=32),
})
_declare_benchmark("seq", pooled=True, gated=False, shapes={
    "cuda": dict(B=32, T=784, n=(512, 512), d=8192),
    "cpu": dict(B=8, T=49, n=(256, 256), d=4096),
    "cpu-quick": dict(B=4, T=49, n=(128, 128), d=2048),
    "tiny": dict(B=2, T=3, n=(8, 12), d=31),
})
_declare_benchmark("gated", pooled=False, gated=True, shapes={  # the vec case with a softmax gate
    "cuda": dict(B=512, n=(2048, 2048), d=16384),
    "cpu": dict(B=64, n=(512, 1024), d=8192),
    "cpu-quick": dict(B=32, n=(256, 512), d=4096),
    "tiny": dict(B=4, n=(8, 12), d=32),
})
