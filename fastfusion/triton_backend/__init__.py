"""The "triton" backend: fused Triton kernels, one file per op family.

Importing this package registers its kernels in the dispatch table. fastfusion imports it
when CUDA is available, or when TRITON_INTERPRET=1, Triton's CPU interpreter, which is
how CI runs every kernel on small shapes (then the kernels also accept CPU tensors).
"""

import os

DEVICE_TYPES = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)

from . import count_sketch  # noqa: E402,F401  (registers the kernels)
from . import signed_sqrt_l2  # noqa: E402,F401
from . import compact_bilinear  # noqa: E402,F401
from . import tensor_fusion  # noqa: E402,F401
from . import low_rank_fusion  # noqa: E402,F401
from . import factorized_bilinear  # noqa: E402,F401
