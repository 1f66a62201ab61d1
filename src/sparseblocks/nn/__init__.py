"""Drop-in modules with block-sparse weights."""

from sparseblocks.nn.linear import BlockSparseLinear

__all__ = ["BlockSparseLinear"]
