"""Factorized bilinear pooling, MFB (Yu et al., ICCV 2017).

    e = (x W_x^T + b_x) * (y W_y^T + b_y)            (..., o*k), times a dropout mask if given
    z_j = sum_{i < k} e_{j*k + i}                     (..., o)   sum pooling of consecutive groups
    out = signed_sqrt_l2(z)                           when ``normalize``

Weights use nn.Linear's layout (o*k, n), and the k entries of one output are adjacent, as
in the original MFB and its ports, so their weights load directly. The original applies
dropout to e; here that is a multiplicative ``dropout_mask`` (0 or 1/(1-p)) so the op
stays deterministic and the mask is reused by the backward.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

from .. import _custom_op
from .._dispatch import compute_dtype
from .._validation import check_eps, check_like, check_positive_int, check_shape, check_tensor
from ..flops import twice
from ._common import flatten_leading
from .signed_sqrt_l2 import DEFAULT_EPS, signed_sqrt_l2_reference, signed_sqrt_l2_vjp

# The public function(s), exported by fastfusion, and their references, by fastfusion.reference.
__all__ = ["factorized_bilinear", "factorized_bilinear_reference"]


def _projections(x, y, weight_x, bias_x, weight_y, bias_y):
    return F.linear(x, weight_x, bias_x), F.linear(y, weight_y, bias_y)


def _forward(x, y, weight_x, bias_x, weight_y, bias_y, factor: int, dropout_mask, normalize: bool, eps: float):
    """Plain-PyTorch MFB on (B, n) inputs -> (B, o); differentiable."""
    proj_x, proj_y = _projections(x, y, weight_x, bias_x, weight_y, bias_y)
    expanded = proj_x * proj_y
    if dropout_mask is not None:
        expanded = expanded * dropout_mask
    z = expanded.unflatten(-1, (-1, factor)).sum(-1)
    return signed_sqrt_l2_reference(z, eps) if normalize else z


def _backward(grad, x, y, weight_x, bias_x, weight_y, bias_y, factor: int, dropout_mask, normalize: bool, eps: float):
    """Gradients [x, y, weight_x, bias_x, weight_y, bias_y]; bias gradients are returned
    even when a bias is None (the autograd wrapper drops them)."""
    proj_x, proj_y = _projections(x, y, weight_x, bias_x, weight_y, bias_y)
    if normalize:
        expanded = proj_x * proj_y
        if dropout_mask is not None:
            expanded = expanded * dropout_mask
        grad = signed_sqrt_l2_vjp(grad, expanded.unflatten(-1, (-1, factor)).sum(-1), eps)
    grad_expanded = grad.repeat_interleave(factor, dim=-1)
    if dropout_mask is not None:
        grad_expanded = grad_expanded * dropout_mask
    grad_px, grad_py = grad_expanded * proj_y, grad_expanded * proj_x
    return [
        grad_px @ weight_x,
        grad_py @ weight_y,
        grad_px.t() @ x,
        grad_px.sum(0),
        grad_py.t() @ y,
        grad_py.sum(0),
    ]


def _flops(args: dict) -> Counter:
    x, y, weight_x = args["x"], args["y"], args["weight_x"]
    return Counter(contraction=2 * x[0] * weight_x[0] * (x[1] + y[1]))


def _residuals(x, y, weight_x, bias_x, weight_y, bias_y, factor, dropout_mask, normalize, eps):
    """The residuals every saving backend returns, in the compute dtype: the projections
    [x W_x^T + b_x, y W_y^T + b_y], each (B, o*k), and with ``normalize`` also z (B, o)
    before the normalisation, from which the backward takes the normalisation's gradient
    without pooling z again."""
    B, hidden, dtype = x.shape[0], weight_x.shape[0], compute_dtype(x.dtype)
    projections = [x.new_empty((B, hidden), dtype=dtype) for _ in range(2)]
    return (projections + [x.new_empty((B, hidden // factor), dtype=dtype)]) if normalize else projections


SPEC = _custom_op.register(_custom_op.OpSpec(
    name="factorized_bilinear",
    args="Tensor x, Tensor y, Tensor weight_x, Tensor? bias_x, Tensor weight_y, Tensor? bias_y, SymInt factor, "
    "Tensor? dropout_mask, bool normalize, float eps",
    forward=_forward,
    backward=_backward,
    fake=lambda x, y, weight_x, bias_x, weight_y, bias_y, factor, *_: x.new_empty((x.shape[0], weight_x.shape[0] // factor)),
    residuals=_residuals,
    differentiable=("x", "y", "weight_x", "bias_x", "weight_y", "bias_y"),
    flops=_flops,
    backward_flops=twice(_flops),
    # The kernels return bias gradients even without biases (see _backward).
    none_grads={"bias_x": lambda a: a["weight_x"].shape[:1], "bias_y": lambda a: a["weight_y"].shape[:1]},
    autocast="lower",
    cpp_saves_residuals=True,
))


def factorized_bilinear(
    x: torch.Tensor,
    y: torch.Tensor,
    weight_x: torch.Tensor,
    bias_x: torch.Tensor | None,
    weight_y: torch.Tensor,
    bias_y: torch.Tensor | None,
    factor: int,
    normalize: bool = True,
    *,
    dropout_mask: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
    backend: str | None = None,
) -> torch.Tensor:
    """Factorized bilinear pooling (MFB); see the module docstring for the math.

    x: (..., n_x), y: (..., n_y) with the same leading shape; weight_x: (o*factor, n_x),
    weight_y: (o*factor, n_y); biases (o*factor,) or None; dropout_mask: (..., o*factor)
    or None. Returns (..., o) in x's dtype (under autocast, the autocast dtype).
    """
    check_tensor("x", x, batched=True)
    check_tensor("y", y, batched=True)
    factor = check_positive_int("factor", factor)
    eps = check_eps("eps", eps)
    check_like("y", y, "x", x)
    if y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"y has leading shape {tuple(y.shape[:-1])} but x has {tuple(x.shape[:-1])}; they must match")
    check_tensor("weight_x", weight_x, min_ndim=2)
    check_tensor("weight_y", weight_y, min_ndim=2)
    hidden = weight_x.shape[0]
    if hidden % factor:
        raise ValueError(f"weight_x has {hidden} rows, not a multiple of factor={factor}")
    check_shape("weight_x", weight_x, (hidden, x.shape[-1]))
    check_shape("weight_y", weight_y, (hidden, y.shape[-1]))
    for name, t in (("weight_x", weight_x), ("weight_y", weight_y)):
        check_like(name, t, "x", x)
    for name, t in (("bias_x", bias_x), ("bias_y", bias_y)):
        if t is not None:
            check_tensor(name, t)
            check_shape(name, t, (hidden,))
            check_like(name, t, "x", x)
    if dropout_mask is not None:
        check_tensor("dropout_mask", dropout_mask, batched=True)
        check_shape("dropout_mask", dropout_mask, tuple(x.shape[:-1]) + (hidden,))
        check_like("dropout_mask", dropout_mask, "x", x, dtype=False)
    if dropout_mask is not None:
        # In the dtype the op computes in (under autocast, the autocast dtype; SPEC.autocast).
        dropout_mask = flatten_leading(dropout_mask.to(_custom_op.cast_dtype(SPEC, x.device.type) or x.dtype))
    out = _custom_op.call(
        "factorized_bilinear", backend, flatten_leading(x), flatten_leading(y), weight_x, bias_x, weight_y, bias_y, factor,
        dropout_mask, normalize, eps,
    )
    return out.reshape(tuple(x.shape[:-1]) + (hidden // factor,))


def factorized_bilinear_reference(
    x, y, weight_x, bias_x, weight_y, bias_y, factor, normalize=True, *, dropout_mask=None, eps=DEFAULT_EPS
) -> torch.Tensor:
    """Plain-PyTorch :func:`factorized_bilinear` (autograd, no custom op)."""
    return factorized_bilinear(
        x, y, weight_x, bias_x, weight_y, bias_y, factor, normalize, dropout_mask=dropout_mask, eps=eps, backend="eager"
    )


def _benchmark_case(s, randn):
    """Two modalities and the MFB parameters, initialised at the scale of nn.Linear's."""
    (n_x, n_y), hidden = s["n"], s["o"] * s["k"]
    args = (
        randn(s["B"], n_x),
        randn(s["B"], n_y),
        randn(hidden, n_x, scale=n_x**-0.5),
        randn(hidden, scale=n_x**-0.5),
        randn(hidden, n_y, scale=n_y**-0.5),
        randn(hidden, scale=n_y**-0.5),
    )
    return args, (), lambda f, b, *a: f(*a, s["k"])


_custom_op.declare_benchmark(_custom_op.Benchmark(
    op="factorized_bilinear", variant=None, function=factorized_bilinear, reference=factorized_bilinear_reference,
    shapes={
        "cuda": dict(B=4096, n=(2048, 1024), o=1000, k=5),
        "cpu": dict(B=512, n=(512, 512), o=500, k=5),
        "cpu-quick": dict(B=128, n=(256, 256), o=250, k=5),
        "tiny": dict(B=4, n=(8, 12), o=6, k=3),
    },
    build=_benchmark_case,
))
