"""The plain-PyTorch references of every op, differentiated by PyTorch's autograd.

They are the oracle of the tests and the "eager" baseline of the benchmarks; calling
one is the same as calling the public function with ``backend="eager"``. Each op file's
``__all__`` names its references (``<function>_reference``); this module exports them all.
"""

from .ops import EXPORTS as _OP_EXPORTS

globals().update({name: f for name, f in _OP_EXPORTS.items() if name.endswith("_reference")})
__all__ = sorted(name for name in _OP_EXPORTS if name.endswith("_reference"))
