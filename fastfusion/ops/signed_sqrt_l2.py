"""Signed square root followed by L2 normalisation (the MCB / CBP / MFB post-processing).

    s = sign(z) * sqrt(|z| + eps)
    out = s / max(||s||_2, eps)          (norm over the last dimension)

The gradient is finite everywhere: d s / d z = sign(z)^2 / (2 sqrt(|z| + eps)) <= 1 / (2 sqrt(eps)),
which is 0 at z == 0 exactly (as PyTorch's autograd of the formula gives), and an all-zero
vector divides by eps instead of by its zero norm. The norm is taken of s / max|s| and scaled
back, so rows whose squares overflow (|z| near the dtype's maximum) still come out unit-norm.
"""

from __future__ import annotations

import torch

from .. import _custom_op
from .._dispatch import compute_dtype
from .._validation import check_eps, check_tensor
from ..flops import no_flops

# The public function(s), exported by fastfusion, and their references, by fastfusion.reference.
__all__ = ["signed_sqrt_l2", "signed_sqrt_l2_reference"]

DEFAULT_EPS = 1e-12


def _row_norm(s: torch.Tensor) -> torch.Tensor:
    """||s||_2 over the last dimension without overflow in the squares. The scale is
    detached: the norm is 1-homogeneous, so it cancels from the gradient exactly."""
    scale = s.detach().abs().amax(-1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.linalg.vector_norm(s / scale, dim=-1, keepdim=True) * scale


def signed_sqrt_l2_reference(z: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Plain PyTorch, differentiable by autograd. z (..., d) -> (..., d), computed in
    float32 at least and returned in z's dtype."""
    work = z.to(compute_dtype(z.dtype))
    s = torch.sign(work) * torch.sqrt(work.abs() + eps)
    out = s / _row_norm(s).clamp_min(eps)
    return out.to(z.dtype)


def signed_sqrt_l2_vjp(grad: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    """Vector-Jacobian product of :func:`signed_sqrt_l2_reference` at ``z``, in z's dtype."""
    dtype, work = z.dtype, compute_dtype(z.dtype)
    z, grad = z.to(work), grad.to(work)
    root = torch.sqrt(z.abs() + eps)
    s = torch.sign(z) * root
    norm = _row_norm(s)
    out = s / norm.clamp_min(eps)
    # Below eps the denominator is the constant eps, so only the direct term remains.
    radial = (grad * out).sum(-1, keepdim=True)
    grad_s = torch.where(norm < eps, grad / eps, (grad - out * radial) / norm.clamp_min(eps))
    return (grad_s * torch.sign(z).abs() / (2 * root)).to(dtype)


SPEC = _custom_op.register(_custom_op.OpSpec(
    name="signed_sqrt_l2",
    args="Tensor z, float eps",
    forward=signed_sqrt_l2_reference,
    backward=signed_sqrt_l2_vjp,
    fake=lambda z, eps: z.new_empty(z.shape),
    differentiable=("z",),
    flops=no_flops,
    backward_flops=no_flops,
))


def signed_sqrt_l2(z: torch.Tensor, eps: float = DEFAULT_EPS, *, backend: str | None = None) -> torch.Tensor:
    """Signed square root then L2 normalisation over the last dimension.

    z: (..., d) floating tensor. Returns (..., d) in z's dtype. See the module docstring
    for the math and the gradient at z == 0.
    """
    check_tensor("z", z, batched=True)
    eps = check_eps("eps", eps)
    return _custom_op.call("signed_sqrt_l2", backend, z, eps)


_custom_op.declare_benchmark(_custom_op.Benchmark(
    op="signed_sqrt_l2", variant=None, function=signed_sqrt_l2, reference=signed_sqrt_l2_reference,
    shapes={
        "cuda": dict(B=8192, d=16384),
        "cpu": dict(B=1024, d=8192),
        "cpu-quick": dict(B=256, d=4096),
        "tiny": dict(B=4, d=32),
    },
    build=lambda s, randn: ((randn(s["B"], s["d"]),), (), lambda f, b, z: f(z)),
))
