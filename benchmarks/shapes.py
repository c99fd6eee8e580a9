"""Named benchmark shapes, per kernel and shape set, read from the ops' declarations.

Each op declares its benchmark cases beside its public function (``fastfusion/ops/<op>.py``,
the contract in ``fastfusion._custom_op.Benchmark`` and docs/op-contract.md). A kernel is named
``<op>`` or ``<op>[<variant>]`` and has one shape per set, named after the kernel (the rows of
"Reference sizes" in docs/design.md), so results stay comparable across commits and devices:
the name says *what* is measured, the set says at which size, and every result row records
the sizes it actually ran.

Sets (``fastfusion._custom_op.SHAPE_SETS``):
- ``cuda``: the GPU sizes of docs/design.md.
- ``cpu``: the 2-core CPU sizes of docs/design.md.
- ``cpu-quick``: the CPU shapes shrunk (2-4x per dimension) so that ``--quick`` on two
  cores, torch.compile warm-up included, ends in under 3 minutes.
- ``tiny``: a few kilobytes per tensor, for testing the harness itself.

Size keys (by convention): B batch, T positions, n per-modality input dims, d sketch dim,
o MFB output dim, k MFB factor, rank LMF rank, h LMF/TFN output dim.
"""

from __future__ import annotations

from types import MappingProxyType

import fastfusion  # noqa: F401  (imports every op, which declares its benchmarks)
from fastfusion import _custom_op

# kernel name -> its declaration, in report order (the ops' registration order, then declaration order).
BENCHMARKS = MappingProxyType({b.name: b for b in _custom_op.benchmarks()})

# The benchmark kernels, in report order.
KERNELS = tuple(BENCHMARKS)

# shape set -> kernel -> sizes; every set lists every kernel of KERNELS, in its order.
SHAPE_SETS = MappingProxyType({
    shape_set: {kernel: b.shapes[shape_set] for kernel, b in BENCHMARKS.items()} for shape_set in _custom_op.SHAPE_SETS
})


def shape_set_for(device_type: str, quick: bool) -> str:
    """The set a CLI run uses: GPU sizes on CUDA (already fast), shrunk ones for a quick CPU run."""
    if device_type == "cuda":
        return "cuda"
    return "cpu-quick" if quick else "cpu"
