"""Triton signed square root + L2 normalisation: the row epilogue of :mod:`._common` without a
gate, one program per row (see there for the passes and the arithmetic's dtype).
"""

from __future__ import annotations

import torch

from .. import _dispatch
from . import DEVICE_TYPES
from ._common import epilogue_backward, epilogue_forward


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])  # a view whenever the leading dims collapse


def _forward(z: torch.Tensor, eps: float) -> torch.Tensor:
    return epilogue_forward(_rows(z), None, True, eps, z.dtype).view(z.shape)


def _backward(grad: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    grad_z, _ = epilogue_backward(_rows(grad), _rows(z), None, True, eps, grad.dtype)
    return grad_z.view(z.shape)


_dispatch.register_kernel("signed_sqrt_l2", "triton", forward=_forward, backward=_backward, device_types=DEVICE_TYPES)
