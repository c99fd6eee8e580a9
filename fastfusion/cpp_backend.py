"""The "cpp" backend: the C++/OpenMP CPU kernels of fastfusion/csrc/cpu in the kernel table.

The ``fastfusion::`` ops are Python custom ops that take a backend name and dispatch through
:mod:`fastfusion._dispatch`, which keeps torch.compile support, fake kernels and autograd in
one place and lets one op have several backends at once. The C++ library therefore defines
its own operators, ``torch.ops.fastfusion_cpu.<op>`` and ``<op>_backward`` for every op of
:data:`fastfusion._custom_op.SPECS` whose spec says ``cpp_kernels`` (the default), with exactly the signatures of each op's "torch" kernels
(plus the residuals, for the ops whose spec says ``cpp_saves_residuals``), and this module
registers them as the "cpp" kernels of the CPU.
Importing it builds nothing: :mod:`fastfusion._extension` builds or loads the library the
first time a call resolves to "cpp". Import it after the op files, which register the specs.
"""

from __future__ import annotations

import torch

from . import _custom_op, _dispatch, _extension


def _kernel(name: str):
    def kernel(*args):
        reason = _extension.unavailable_reason()  # loaded by resolution already, unless called directly
        if reason is not None:
            raise _dispatch.BackendUnavailableError(f"fastfusion backend 'cpp' is unavailable: {reason}")
        return getattr(torch.ops.fastfusion_cpu, name)(*args)

    kernel.__name__ = kernel.__qualname__ = f"fastfusion_cpu.{name}"
    return kernel


for _spec in (s for s in _custom_op.SPECS.values() if s.cpp_kernels):
    _dispatch.register_kernel(
        _spec.name,
        "cpp",
        forward=_kernel(_spec.name),
        backward=_kernel(_spec.name + "_backward"),
        device_types=("cpu",),
        saves_residuals=_spec.cpp_saves_residuals,
    )
_dispatch.register_probe("cpp", _extension.unavailable_reason)
