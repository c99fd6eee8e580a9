"""The plain-PyTorch references of every op, differentiated by PyTorch's autograd.

They are the oracle of the tests and the "eager" baseline of the benchmarks; calling
one is the same as calling the public function with ``backend="eager"``.
"""

from .ops.compact_bilinear import compact_bilinear_reference, tensor_sketch_reference
from .ops.count_sketch import count_sketch_reference
from .ops.factorized_bilinear import factorized_bilinear_reference
from .ops.low_rank_fusion import low_rank_fusion_reference
from .ops.signed_sqrt_l2 import signed_sqrt_l2_reference
from .ops.tensor_fusion import tensor_fusion_reference

__all__ = [
    "compact_bilinear_reference",
    "count_sketch_reference",
    "factorized_bilinear_reference",
    "low_rank_fusion_reference",
    "signed_sqrt_l2_reference",
    "tensor_fusion_reference",
    "tensor_sketch_reference",
]
