"""Tensor fusion, TFN (Zadeh et al., EMNLP 2017).

Each modality gets a constant 1 prepended, x~_m = [1; x_m], and

    out = W vec(x~_1 (x) x~_2 (x) ... (x) x~_M) + b            (..., h)

with the outer product flattened modality-0-major (the official order: index
i_0 * prod_{m>0}(n_m+1) + ...), W in nn.Linear's layout (h, prod_m (n_m + 1)), so the
official post-fusion layer's weights load directly. The reference materialises the outer
product, (B, prod_m (n_m + 1)) values, which is what fused kernels avoid.

Kernels that avoid it split the modalities into a leading group [0, k) and a trailing one
[k, M): the outer product is then that of the groups' own outer products, of sizes P_A and
P_B, and W (h, P_A P_B) is W (h P_A, P_B) in memory, so TFN is one GEMM, Y = u W'^T with u the
trailing group's outer product, and a contraction of Y (B, h P_A) with the leading group's.
k = 0 leaves the leading group empty (P_A = 1): Y = z W^T, the reference's own GEMM, the
cheaper choice when the outer product is small against h.
The op takes k as its argument ``split``, chosen once here (:func:`residual_split`), so that
every kernel and the residual's shape (Y, which a saving kernel hands to its backward) follow
the same choice.
"""

from __future__ import annotations

import math
import string
from collections import Counter

import torch
import torch.nn.functional as F

from .. import _custom_op
from .._dispatch import compute_dtype
from .._validation import check_like, check_modality_tensors, check_shape, check_tensor
from ..flops import twice
from ._common import flatten_leading

# The public function(s), exported by fastfusion, and their references, by fastfusion.reference.
__all__ = ["tensor_fusion", "tensor_fusion_reference"]


def _with_one(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (1, 0), value=1.0)


def _outer(xs) -> torch.Tensor:
    """vec(x~_1 (x) ... (x) x~_M) for (B, n_m) inputs: (B, prod_m (n_m + 1))."""
    result = _with_one(xs[0])
    for x in xs[1:]:
        result = (result.unsqueeze(-1) * _with_one(x).unsqueeze(-2)).flatten(-2)
    return result


def _forward(xs, weight, bias, split) -> torch.Tensor:
    """Plain-PyTorch TFN on (B, n_m) inputs -> (B, h); differentiable. It materialises the
    whole outer product, so ``split`` does not change what it computes."""
    return F.linear(_outer(xs), weight, bias)


def _backward(grad, xs, weight, bias, split) -> list[torch.Tensor]:
    """Gradients [*xs, weight, bias]; the bias gradient is returned even when bias is None."""
    grad_outer = (grad @ weight).unflatten(-1, [x.shape[-1] + 1 for x in xs])
    padded = [_with_one(x) for x in xs]
    letters = string.ascii_letters[1 : len(xs) + 1]  # 'a' is the batch
    grad_xs = []
    for m in range(len(xs)):
        others = [f"a{letters[k]}" for k in range(len(xs)) if k != m]
        spec = f"a{letters},{','.join(others)}->a{letters[m]}"
        contracted = torch.einsum(spec, grad_outer, *[p for k, p in enumerate(padded) if k != m])
        grad_xs.append(contracted[:, 1:])
    return grad_xs + [grad.t() @ _outer(xs), grad.sum(0)]


def residual_split(dims, hidden: int) -> int:
    """The split k of the modalities (module docstring) for modality sizes ``dims`` (n_m) and
    output size ``hidden``: the first k in [0, M) minimising the per-sample buffers h P_A + P_B."""
    sizes = [n + 1 for n in dims]
    costs = [(hidden * math.prod(sizes[:k]) + math.prod(sizes[k:]), k) for k in range(len(sizes))]
    return min(costs, key=lambda cost_split: cost_split[0])[1]  # min keeps the first of equals


def _residuals(xs, weight, bias, split) -> list[torch.Tensor]:
    """The residual a saving backend returns: Y = u @ W.view(h * P_A, P_B)^T, (B, h * P_A) in
    the compute dtype, u the trailing group's outer product (module docstring)."""
    width = weight.shape[0] * math.prod(x.shape[1] + 1 for x in xs[:split])
    return [xs[0].new_empty((xs[0].shape[0], width), dtype=compute_dtype(xs[0].dtype))]


def _flops(args: dict) -> Counter:
    # The outer product is pointwise; the linear layer over its prod_m(n_m+1) entries is not.
    return Counter(contraction=2 * args["xs"][0][0] * math.prod(args["weight"]))


SPEC = _custom_op.register(_custom_op.OpSpec(
    name="tensor_fusion",
    args="Tensor[] xs, Tensor weight, Tensor? bias, int split",
    forward=_forward,
    backward=_backward,
    fake=lambda xs, weight, bias, split: xs[0].new_empty((xs[0].shape[0], weight.shape[0])),
    residuals=_residuals,
    differentiable=("xs", "weight", "bias"),
    flops=_flops,
    backward_flops=twice(_flops),
    none_grads={"bias": lambda a: a["weight"].shape[:1]},  # the kernels return it even without a bias
    autocast="lower",
    cpp_saves_residuals=True,
))


def tensor_fusion(xs, weight, bias, *, backend: str | None = None) -> torch.Tensor:
    """Tensor fusion; see the module docstring for the math.

    xs: list of M >= 2 floating tensors (..., n_m) with the same leading shape;
    weight: (h, prod_m (n_m + 1)); bias: (h,) or None. Returns (..., h).
    """
    xs = check_modality_tensors("xs", xs)
    check_tensor("weight", weight, min_ndim=2)
    fused_dim = 1
    for x in xs:
        fused_dim *= x.shape[-1] + 1
    check_shape("weight", weight, (weight.shape[0], fused_dim))
    check_like("weight", weight, "xs[0]", xs[0])
    if bias is not None:
        check_tensor("bias", bias)
        check_shape("bias", bias, weight.shape[:1])
        check_like("bias", bias, "xs[0]", xs[0])
    split = residual_split([x.shape[-1] for x in xs], weight.shape[0])
    out = _custom_op.call("tensor_fusion", backend, [flatten_leading(x) for x in xs], weight, bias, split)
    return out.reshape(tuple(xs[0].shape[:-1]) + (weight.shape[0],))


def tensor_fusion_reference(xs, weight, bias) -> torch.Tensor:
    """Plain-PyTorch :func:`tensor_fusion` (autograd, no custom op)."""
    return tensor_fusion(xs, weight, bias, backend="eager")


def _benchmark_case(s, randn):
    """Modalities, and a weight of 1/sqrt(fan-in) scale with a small bias."""
    fused_dim = math.prod(n + 1 for n in s["n"])
    xs = tuple(randn(s["B"], n) for n in s["n"])
    args = xs + (randn(s["h"], fused_dim, scale=fused_dim**-0.5), randn(s["h"], scale=0.1))
    m = len(s["n"])
    return args, (), lambda f, b, *a: f(list(a[:m]), a[m], a[m + 1])


_custom_op.declare_benchmark(_custom_op.Benchmark(
    op="tensor_fusion", variant=None, function=tensor_fusion, reference=tensor_fusion_reference,
    shapes={
        "cuda": dict(B=4096, n=(32, 32, 64), h=128),
        "cpu": dict(B=256, n=(32, 32, 64), h=128),
        "cpu-quick": dict(B=64, n=(16, 16, 32), h=64),
        "tiny": dict(B=4, n=(3, 4, 5), h=6),
    },
    build=_benchmark_case,
))
