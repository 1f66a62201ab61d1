"""sparseblocks: block-sparse transformers in PyTorch and Triton.

Public API: :class:`BlockSparseMatrix` (the format), :func:`sparseblocks.ops.spmm` (the op),
:class:`BlockSparseLinear` (the module).
"""

from sparseblocks.format import BlockSparseMatrix
from sparseblocks.nn import BlockSparseLinear
from sparseblocks.ops import spmm

__version__ = "0.1.0"

__all__ = ["BlockSparseLinear", "BlockSparseMatrix", "__version__", "spmm"]
