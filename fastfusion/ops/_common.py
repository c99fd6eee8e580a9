"""Small helpers shared by the op files."""

from __future__ import annotations

from typing import Sequence

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in float32 (FFTs, norms); others in their own dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# Looked up, not asked, in code that torch.compile traces: dynamo before torch 2.13 cannot
# trace torch._C._is_autocast_available and fails fullgraph compiles of every op that asks.
# The device types fastfusion runs on (meta: shapes only) are known at import.
_AUTOCAST_AVAILABLE = {t: torch.amp.is_autocast_available(t) for t in ("cpu", "cuda", "meta")}


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for ``device_type``, or None when autocast is off (or
    does not exist there, as on the meta device)."""
    available = _AUTOCAST_AVAILABLE.get(device_type)
    if available is None:  # another device type: asked directly (outside fastfusion's kernels)
        available = torch.amp.is_autocast_available(device_type)
    if not available or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_all(tensors: Sequence[torch.Tensor | None], dtype: torch.dtype) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(dtype) for t in tensors]


def flatten_leading(t: torch.Tensor, trailing: int = 1) -> torch.Tensor:
    """View (..., *trailing dims) as (B, *trailing dims) with B the product of the leading dims."""
    return t.reshape((-1,) + tuple(t.shape[t.dim() - trailing:]))


def product(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Elementwise product of a non-empty sequence of broadcastable tensors."""
    result = factors[0]
    for f in factors[1:]:
        result = result * f
    return result


def mark_residuals(ctx, residuals: Sequence[torch.Tensor]) -> None:
    """In a setup_context: the forward's residual outputs feed only the backward. They are
    not differentiable, and autograd must not zero-fill gradients for them, so the backward
    receives None for them, and for the output too when its gradient is undefined."""
    ctx.mark_non_differentiable(*residuals)
    ctx.set_materialize_grads(False)


def once_differentiable(op: str, backward_op) -> None:
    """Make a double backward through ``backward_op`` (the backward custom op of ``op``) raise one
    clear error: the fused backward kernels have no derivatives of their own. Without this,
    torch reports a missing autograd formula of an internal op. First-order gradients, with
    ``create_graph=True`` too, are unaffected."""
    def _second_derivative(ctx, *grads):
        raise RuntimeError(
            f"{op} is once differentiable: its fused backward has no derivative. For double backward "
            f"(gradgradcheck, gradient penalties) run it with backend='eager', the plain-PyTorch reference."
        )

    backward_op.register_autograd(_second_derivative)
