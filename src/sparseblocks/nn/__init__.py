"""Drop-in modules with block-sparse weights."""

from sparseblocks.nn.linear import BlockSparseLinear
from sparseblocks.nn.mlp import SparseMLP
from sparseblocks.nn.supermask import SupermaskLinear

__all__ = ["BlockSparseLinear", "SparseMLP", "SupermaskLinear"]
