"""Drop-in modules with block-sparse weights."""

from sparseblocks.nn.linear import BlockSparseLinear
from sparseblocks.nn.mlp import SparseLinearActivation, SparseMLP
from sparseblocks.nn.semi_structured import SemiStructuredLinear
from sparseblocks.nn.supermask import SupermaskLinear

__all__ = ["BlockSparseLinear", "SemiStructuredLinear", "SparseLinearActivation", "SparseMLP", "SupermaskLinear"]
