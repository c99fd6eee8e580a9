"""The "triton" backend: fused Triton kernels, one file per op family.

Importing this package registers its kernels in the dispatch table. fastfusion imports it
when CUDA is available, or when TRITON_INTERPRET=1, Triton's CPU interpreter, which is
how CI runs every kernel on small shapes (then the kernels also accept CPU tensors).
"""

import os

DEVICE_TYPES = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)

# After DEVICE_TYPES, which the kernel files read; importing each registers its kernels.
from . import (  # noqa: E402
    compact_bilinear,  # noqa: F401
    count_sketch,  # noqa: F401
    factorized_bilinear,  # noqa: F401
    low_rank_fusion,  # noqa: F401
    signed_sqrt_l2,  # noqa: F401
    tensor_fusion,  # noqa: F401
)
