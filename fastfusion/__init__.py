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
from .ops import EXPORTS as _OP_EXPORTS

# The public functions of the ops (each op file's __all__ names them; their references are
# fastfusion.reference's).
_PUBLIC_OPS = {name: f for name, f in _OP_EXPORTS.items() if not name.endswith("_reference")}
globals().update(_PUBLIC_OPS)

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
    "draw_hashes_and_signs",
    "selected_backend",
    "set_backend",
    *_PUBLIC_OPS,
]
