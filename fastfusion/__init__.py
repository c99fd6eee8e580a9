"""fastfusion: fused kernels for multimodal fusion operators.

Functional ops, their nn.Modules and backend control. The plain-PyTorch references live
in :mod:`fastfusion.reference`; FLOP counting in :mod:`fastfusion.flops` (count_flops needs fvcore; FlopCounterMode
counts the ops too), numerical checks for your own use in :mod:`fastfusion.testing`.
"""

from ._dispatch import BackendUnavailableError, available_backends, backend, selected_backend, set_backend
from .modules import (
    CompactBilinearPooling,
    FactorizedBilinearPooling,
    GatedCompactBilinearPooling,
    LowRankFusion,
    TensorFusion,
    draw_hashes_and_signs,
)
from .ops.compact_bilinear import compact_bilinear, tensor_sketch
from .ops.count_sketch import count_sketch
from .ops.factorized_bilinear import factorized_bilinear
from .ops.low_rank_fusion import low_rank_fusion
from .ops.signed_sqrt_l2 import signed_sqrt_l2
from .ops.tensor_fusion import tensor_fusion

__version__ = "0.1.0"


def _load_triton_backend() -> None:
    import os

    import torch

    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    from . import triton_backend  # noqa: F401  (registers the kernels)


_load_triton_backend()

from . import cpp_backend as _cpp_backend  # noqa: E402,F401  (registers "cpp"; builds on first use)
from . import flops as _flops  # noqa: E402  (no fvcore: that is imported by count_flops)

_flops.register_flop_formulas_when_imported()  # FlopCounterMode then counts the fastfusion ops

__all__ = [
    "BackendUnavailableError",
    "CompactBilinearPooling",
    "FactorizedBilinearPooling",
    "GatedCompactBilinearPooling",
    "LowRankFusion",
    "TensorFusion",
    "available_backends",
    "backend",
    "compact_bilinear",
    "count_sketch",
    "draw_hashes_and_signs",
    "factorized_bilinear",
    "low_rank_fusion",
    "selected_backend",
    "set_backend",
    "signed_sqrt_l2",
    "tensor_fusion",
    "tensor_sketch",
]
