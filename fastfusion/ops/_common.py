"""Small helpers shared by the op files."""

from __future__ import annotations

from typing import Sequence

import torch


def flatten_leading(t: torch.Tensor, trailing: int = 1) -> torch.Tensor:
    """View (..., *trailing dims) as (B, *trailing dims) with B the product of the leading dims."""
    return t.reshape((-1,) + tuple(t.shape[t.dim() - trailing:]))


def product(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Elementwise product of a non-empty sequence of broadcastable tensors."""
    result = factors[0]
    for f in factors[1:]:
        result = result * f
    return result
