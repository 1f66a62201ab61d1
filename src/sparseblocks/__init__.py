"""sparseblocks: block-sparse transformers in PyTorch and Triton.

Public API: :class:`BlockSparseMatrix` (the format), :func:`spmm` (the op), :class:`BlockSparseLinear` (the
module), :class:`SemiStructuredLinear` (2:4 weights), :class:`SparseMLP` and :func:`fuse_mlps` (whole MLPs),
:func:`sparsify` / :func:`densify` with :class:`SparsityConfig` (whole models), :func:`save_sparse` /
:func:`load_sparse` (checkpoints), :class:`Pruner` with :class:`CubicSchedule` (choosing the tiles),
:func:`reconstruct` (refitting the kept weights to calibration data), :func:`fp32_precision` (how the kernels
multiply fp32 tiles), :func:`prepared_launches` (eager inference calls replayed without their Python, opt-in).
"""

__version__ = "0.1.0"

from sparseblocks.backend import fp32_precision, prepared_launches
from sparseblocks.format import BlockSparseMatrix
from sparseblocks.integrations.checkpoint import load_sparse, save_sparse
from sparseblocks.integrations.sparsify import SparsityConfig, densify, fuse_mlps, sparsify
from sparseblocks.nn import BlockSparseLinear, SemiStructuredLinear, SparseMLP
from sparseblocks.ops import spmm
from sparseblocks.pruning.pruner import CubicSchedule, Pruner
from sparseblocks.pruning.reconstruct import reconstruct

__all__ = [
    "BlockSparseLinear",
    "BlockSparseMatrix",
    "CubicSchedule",
    "Pruner",
    "SemiStructuredLinear",
    "SparseMLP",
    "SparsityConfig",
    "__version__",
    "densify",
    "fp32_precision",
    "fuse_mlps",
    "load_sparse",
    "prepared_launches",
    "reconstruct",
    "save_sparse",
    "sparsify",
    "spmm",
]
