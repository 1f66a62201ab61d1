"""Drop-in modules with block-sparse weights."""

from sparseblocks.nn.linear import BlockSparseLinear, QuantizedBlockSparseLinear
from sparseblocks.nn.mlp import SparseLinearActivation, SparseMLP
from sparseblocks.nn.semi_structured import SemiStructuredLinear
from sparseblocks.nn.supermask import SupermaskLinear

__all__ = [
    "BlockSparseLinear",
    "QuantizedBlockSparseLinear",
    "SemiStructuredLinear",
    "SparseLinearActivation",
    "SparseMLP",
    "SupermaskLinear",
]
