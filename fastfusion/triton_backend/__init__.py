"""The "triton" backend: fused Triton kernels, one file per op (shared helpers in _common.py).

Importing this package registers its kernels in the dispatch table. fastfusion imports it
when CUDA is available, or when TRITON_INTERPRET=1, Triton's CPU interpreter, which is
how CI runs every kernel on small shapes (then the kernels also accept CPU tensors).
"""

import importlib
import os
import pkgutil

DEVICE_TYPES = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)

# Every module of the package, after DEVICE_TYPES, which they read: importing an op's file
# registers its kernels, so adding one is adding its file.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
