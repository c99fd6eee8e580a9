"""One file per op: its math, its "torch" kernels and spec (fastfusion._custom_op.OpSpec), and the
public function with its reference.

Importing the package imports every op file, which registers its op: adding an op is adding its
file. Each file's ``__all__`` names what it exports: the public functions, which fastfusion
exports, and their ``*_reference`` functions, which fastfusion.reference exports.
"""

import importlib
import pkgutil

# Sorted, so that the ops register in the same order on every machine (an op file imports the
# ops it builds on, which then register first).
MODULES = tuple(
    importlib.import_module(f"{__name__}.{m.name}")
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)
    if not m.name.startswith("_")
)
EXPORTS = {name: getattr(module, name) for module in MODULES for name in module.__all__}
