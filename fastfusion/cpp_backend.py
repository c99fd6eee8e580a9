"""The "cpp" backend: the C++/OpenMP CPU kernels of fastfusion/csrc/cpu in the kernel table.

The ``fastfusion::`` ops are Python custom ops that take a backend name and dispatch through
:mod:`fastfusion._dispatch`, which keeps torch.compile support, fake kernels and autograd in
one place and lets one op have several backends at once. The C++ library therefore defines
its own operators, ``torch.ops.fastfusion_cpu.<op>`` and ``<op>_backward``, with exactly the
signatures of each op's "torch" kernels (plus the residuals, for the ops in
``SAVES_RESIDUALS``), and this module registers them as the "cpp" kernels of the CPU.
Importing it builds nothing: :mod:`fastfusion._extension` builds or loads the library the
first time a call resolves to "cpp".
"""

from __future__ import annotations

import torch

from . import _dispatch, _extension

OPS = (
    "count_sketch",
    "compact_bilinear",
    "signed_sqrt_l2",
    "factorized_bilinear",
    "low_rank_fusion",
    "tensor_fusion",
)

# Ops whose C++ kernels hand intermediates of the forward to the backward (see _dispatch).
SAVES_RESIDUALS = frozenset({"compact_bilinear", "factorized_bilinear", "low_rank_fusion", "tensor_fusion"})


def _kernel(name: str):
    def kernel(*args):
        reason = _extension.unavailable_reason()  # loaded by resolution already, unless called directly
        if reason is not None:
            raise _dispatch.BackendUnavailableError(f"fastfusion backend 'cpp' is unavailable: {reason}")
        return getattr(torch.ops.fastfusion_cpu, name)(*args)

    kernel.__name__ = kernel.__qualname__ = f"fastfusion_cpu.{name}"
    return kernel


for _op in OPS:
    _dispatch.register_kernel(
        _op,
        "cpp",
        forward=_kernel(_op),
        backward=_kernel(_op + "_backward"),
        device_types=("cpu",),
        saves_residuals=_op in SAVES_RESIDUALS,
    )
_dispatch.register_probe("cpp", _extension.unavailable_reason)
