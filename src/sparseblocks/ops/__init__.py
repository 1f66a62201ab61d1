"""Block-sparse operations: custom ops that run Triton kernels on CUDA and the reference elsewhere."""

from sparseblocks.ops.mlp import sparse_mlp
from sparseblocks.ops.spmm import spmm

__all__ = ["sparse_mlp", "spmm"]
