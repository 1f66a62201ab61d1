"""The block-sparse matrix format every op in sparseblocks uses.

A ``BlockSparseMatrix`` is a logical ``(N, K)`` matrix cut into ``(bn, bk)`` tiles, of which only the nonzero
tiles are stored, BSR style:

* ``values``         ``(nnz, bn, bk)``  the stored tiles, row-major order, contiguous
* ``crow_indices``   ``(N_blocks + 1,)`` int32, block row ``r`` holds tiles ``crow_indices[r] <= j < crow_indices[r+1]``
* ``col_indices``    ``(nnz,)``         int32, block column of each tile, strictly increasing within a row

Derived once at construction (never stored on disk; always recomputed from the two arrays above):

* ``row_indices_of_block`` ``(nnz,)`` int32, block row of each tile (SDDMM and decode spread work over tiles)
* the transposed (column-major, BSC) index sharing the same ``values``: ``ccol_indices`` ``(K_blocks + 1,)``,
  ``row_indices`` ``(nnz,)`` and ``transpose_perm`` ``(nnz,)``, where ``values[transpose_perm[j]]`` is the j-th tile
  in column-major order. ``dX = dY·W`` walks W by columns through it, without a copy of W.
* ``row_order`` ``(N_blocks,)`` and ``col_order`` ``(K_blocks,)`` int32, block rows / columns by descending tile
  count: kernels start the heaviest rows (columns, for ``dX``) first.

Shapes that are not a multiple of the block are stored padded: the last block row / column holds a partial tile
whose padding is zero, while ``shape`` keeps the logical size and every op respects it.

Quantized tiles (for inference; :meth:`BlockSparseMatrix.quantize`): ``values`` int8 (symmetric) or fp8 e4m3
(``torch.float8_e4m3fn``) with ``scales`` ``(nnz, bn)`` float32, one per row of each stored tile, so that the tile
is ``values[j].float() * scales[j][:, None]``; :meth:`~BlockSparseMatrix.to_dense` returns that (float32), the
reference every kernel is tested against. ``fp8_activations`` (fp8 tiles only): the products where the row kernel
runs them take activations quantized to fp8 per token (W8A8); everywhere else weight-only (W8A16).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch

from sparseblocks.masks import block_norms, top_blocks_mask

BLOCK_SIZES = (16, 32, 64, 128)
INDEX_DTYPE = torch.int32
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what the ops and kernels take
VALUE_DTYPES_BY_NAME = {str(dtype).removeprefix("torch."): dtype for dtype in VALUE_DTYPES}  # as files name them
_VALUE_DTYPE_NAMES = ", ".join(VALUE_DTYPES_BY_NAME)
# The index arrays a matrix holds, by attribute name: the two stored on disk, then those derived from them.
STORED_INDEX_NAMES = ("crow_indices", "col_indices")
DERIVED_INDEX_NAMES = (
    "row_indices_of_block",
    "ccol_indices",
    "row_indices",
    "transpose_perm",
    "row_order",
    "col_order",
)
INDEX_NAMES = STORED_INDEX_NAMES + DERIVED_INDEX_NAMES
# Quantized tiles: their dtype and the largest magnitude they hold, by the name `quantize` takes.
QUANTIZED_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QUANTIZED_LIMITS = {"int8": 127.0, "fp8": 448.0}
SCALE_DTYPE = torch.float32
# Scale granularity, measured (benchmarks/diagnose/quantize_granularity.py, all-MiniLM-L6-v2's 12 MLP linears at
# 70%/b16, 128 real sentences' activations, float64): relative output error, mean over the layers, int8 2.92e-3 with
# a scale per row of each stored tile against 4.94e-3 with one per output channel over its kept tiles; fp8 1.16e-2
# against 1.43e-2. So one scale per tile row, (nnz, bn) float32: at b16 that is 64 bytes per 256-byte int8 tile (25%),
# at b64 6%. The kernels apply it to each tile's fp32 product (exact; scaling the tile before the dot would round
# it to the activations' dtype).
# A tile row of zeros (pruned padding, a dead unit) gets scale 1, not 0 (scales must be positive: nothing divides
# by zero, and the row's values are 0 either way).
ZERO_ROW_SCALE = 1.0


def normalize_block_size(block_size: int | Sequence[int]) -> tuple[int, int]:
    """``64`` or ``(32, 64)`` -> ``(bn, bk)``; raises ``ValueError`` unless each side is 16, 32, 64 or 128."""
    message = f"block_size must be one of {BLOCK_SIZES} or a pair of them, got {block_size!r}"
    sides = block_size if isinstance(block_size, tuple | list | torch.Size) else (block_size, block_size)
    try:
        block = tuple(operator.index(side) for side in sides)  # integers only: 16.5 or None is an error
    except TypeError:
        raise ValueError(message) from None
    if len(block) != 2 or any(side not in BLOCK_SIZES for side in block):
        raise ValueError(message)
    return block  # type: ignore[return-value]


def _transposed_index(
    crow_indices: torch.Tensor, col_indices: torch.Tensor, n_block_cols: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block row of each tile, and the column-major (BSC) index of the same tiles: ccol, row, permutation."""
    device = col_indices.device
    n_block_rows = crow_indices.numel() - 1
    row_counts = (crow_indices[1:] - crow_indices[:-1]).long()
    row_of_block = torch.repeat_interleave(torch.arange(n_block_rows, device=device), row_counts)
    # Stable sort by column keeps tiles of one column in row order: rows are sorted within each column.
    transpose_perm = torch.sort(col_indices.long(), stable=True).indices
    col_counts = torch.bincount(col_indices.long(), minlength=n_block_cols)
    ccol_indices = torch.zeros(n_block_cols + 1, dtype=torch.long, device=device)
    ccol_indices[1:] = torch.cumsum(col_counts, 0)
    return (
        row_of_block.to(INDEX_DTYPE),
        ccol_indices.to(INDEX_DTYPE),
        row_of_block[transpose_perm].to(INDEX_DTYPE),
        transpose_perm.to(INDEX_DTYPE),
    )


def _compressed_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """crow and col indices (int32) of the tiles a bool block mask ``(N_blocks, K_blocks)`` keeps."""
    crow_indices = torch.zeros(mask.shape[0] + 1, dtype=torch.long, device=mask.device)
    crow_indices[1:] = torch.cumsum(mask.sum(1), 0)
    col_indices = mask.nonzero()[:, 1]  # nonzero() is row-major, so columns come sorted within a row
    return crow_indices.to(INDEX_DTYPE), col_indices.to(INDEX_DTYPE)


def _heaviest_first(pointers: torch.Tensor) -> torch.Tensor:
    """Rows (or columns) of a compressed index sorted by descending tile count, as int32."""
    counts = pointers[1:] - pointers[:-1]
    return torch.sort(counts, descending=True, stable=True).indices.to(INDEX_DTYPE)


class BlockSparseMatrix:
    """A logical ``(N, K)`` matrix stored as its nonzero ``(bn, bk)`` tiles (BSR) plus a transposed index.

    Build one with :meth:`from_dense`, :meth:`from_torch_bsr` or the constructor
    ``BlockSparseMatrix(values, crow_indices, col_indices, shape)``. Constructors validate their input
    (:meth:`validate`), so a matrix that exists is safe to hand to a kernel.
    """

    def __init__(
        self,
        values: torch.Tensor,
        crow_indices: torch.Tensor,
        col_indices: torch.Tensor,
        shape: Sequence[int],
        scales: torch.Tensor | None = None,
        fp8_activations: bool = False,
    ) -> None:
        self.values = values
        self.crow_indices = crow_indices
        self.col_indices = col_indices
        self.shape = tuple(int(s) for s in shape)
        self.scales = scales
        self.fp8_activations = fp8_activations
        self.validate()
        (
            self.row_indices_of_block,
            self.ccol_indices,
            self.row_indices,
            self.transpose_perm,
        ) = _transposed_index(crow_indices, col_indices, self.block_grid[1])
        self.row_order = _heaviest_first(self.crow_indices)
        self.col_order = _heaviest_first(self.ccol_indices)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dense(
        cls,
        dense: torch.Tensor,
        block_size: int | Sequence[int],
        mask: torch.Tensor | None = None,
        keep: float | None = None,
    ) -> BlockSparseMatrix:
        """Tile a dense ``(N, K)`` matrix and keep some tiles.

        Which tiles: ``mask``, a bool ``(ceil(N/bn), ceil(K/bk))`` block mask; or ``keep``, the fraction of tiles to
        keep, those of largest L2 norm (``round(keep * tiles)`` exactly); or, with neither, the tiles that are not
        all zero. Tiles on a ragged edge are zero-padded.
        """
        if mask is not None and keep is not None:
            raise ValueError("pass either mask or keep, not both")
        if dense.dim() != 2:
            raise ValueError(f"dense must be 2-D (N, K), got shape {tuple(dense.shape)}")
        if dense.dtype not in VALUE_DTYPES:
            raise ValueError(f"dense must be floating point ({_VALUE_DTYPE_NAMES}), got {dense.dtype}")
        if dense.shape[0] == 0 or dense.shape[1] == 0:
            raise ValueError(f"dense must have nonzero size, got shape {tuple(dense.shape)}")
        bn, bk = normalize_block_size(block_size)
        n, k = dense.shape
        grid = (math.ceil(n / bn), math.ceil(k / bk))
        padded = torch.nn.functional.pad(dense.detach(), (0, grid[1] * bk - k, 0, grid[0] * bn - n))
        tiles = padded.reshape(grid[0], bn, grid[1], bk).transpose(1, 2)  # (N_blocks, K_blocks, bn, bk)

        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != grid:
                raise ValueError(
                    f"mask must be a bool tensor of shape {grid} (blocks of {bn}x{bk} over {n}x{k}), "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
            mask = mask.to(dense.device)
        elif keep is not None:
            mask = top_blocks_mask(block_norms(dense, (bn, bk)), keep)
        else:
            mask = tiles.ne(0).flatten(2).any(-1)

        return cls(tiles[mask].contiguous(), *_compressed_index(mask), (n, k))

    @classmethod
    def from_torch_bsr(cls, bsr: torch.Tensor) -> BlockSparseMatrix:
        """From a PyTorch ``torch.sparse_bsr`` tensor (its blocks must be 16..128 on each side)."""
        if bsr.layout != torch.sparse_bsr:
            raise ValueError(f"expected a torch.sparse_bsr tensor, got layout {bsr.layout}")
        crow, col = bsr.crow_indices(), bsr.col_indices()
        for name, index in (("crow_indices", crow), ("col_indices", col)):
            if index.numel() and (int(index.min()) < 0 or int(index.max()) > torch.iinfo(INDEX_DTYPE).max):
                raise ValueError(f"{name} must lie in [0, 2^31), got [{int(index.min())}, {int(index.max())}]")
        return cls(bsr.values().contiguous(), crow.to(INDEX_DTYPE), col.to(INDEX_DTYPE), bsr.shape)

    # ------------------------------------------------------------------ properties

    @property
    def block_shape(self) -> tuple[int, int]:
        return tuple(self.values.shape[1:])  # type: ignore[return-value]

    @property
    def block_grid(self) -> tuple[int, int]:
        """Number of block rows and block columns, ``(ceil(N/bn), ceil(K/bk))``."""
        (n, k), (bn, bk) = self.shape, self.block_shape
        return math.ceil(n / bn), math.ceil(k / bk)

    @property
    def nnz(self) -> int:
        """Number of stored tiles."""
        return self.values.shape[0]

    @property
    def density(self) -> float:
        """Stored tiles over all tiles of the block grid."""
        rows, cols = self.block_grid
        return self.nnz / (rows * cols)

    @property
    def dtype(self) -> torch.dtype:
        """The stored tiles' dtype (int8 or fp8 for quantized tiles: see :attr:`quantization`)."""
        return self.values.dtype

    @property
    def quantization(self) -> str | None:
        """``"int8"``, ``"fp8"`` (weight-only), ``"fp8-w8a8"`` (fp8 activations too), or None: plain tiles."""
        for name, dtype in QUANTIZED_DTYPES.items():
            if self.values.dtype == dtype:
                return "fp8-w8a8" if self.fp8_activations else name
        return None

    @property
    def device(self) -> torch.device:
        return self.values.device

    def index_tensors(self) -> dict[str, torch.Tensor]:
        """Every index array the matrix holds, by name (the stored two and the derived ones)."""
        return {name: getattr(self, name) for name in INDEX_NAMES}

    @property
    def nbytes(self) -> int:
        """Bytes held: values, scales (quantized tiles) and every index array."""
        tensors = [self.values, *([self.scales] if self.scales is not None else []), *self.index_tensors().values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def __repr__(self) -> str:
        (n, k), (bn, bk) = self.shape, self.block_shape
        return (
            f"BlockSparseMatrix(shape=({n}, {k}), block=({bn}, {bk}), nnz={self.nnz}, "
            f"density={self.density:.3f}, dtype={self.dtype}, device={self.device}"
            + (f", quantization={self.quantization!r})" if self.scales is not None else ")")
        )

    # ------------------------------------------------------------------ conversion

    def block_mask(self) -> torch.Tensor:
        """Bool ``(N_blocks, K_blocks)``: which tiles are stored."""
        mask = torch.zeros(self.block_grid, dtype=torch.bool, device=self.device)
        mask[self.row_indices_of_block.long(), self.col_indices.long()] = True
        return mask

    def with_pattern(self, mask: torch.Tensor) -> tuple[BlockSparseMatrix, torch.Tensor]:
        """The same matrix on another tile pattern: tiles kept by both keep their values, new tiles are zero.

        mask: bool ``block_grid``. Returns the new matrix and ``source`` ``(new nnz,)`` int64, the index in this
        matrix's ``values`` that each new tile came from, or -1 for a new tile (to carry per-tile state along,
        such as an optimizer's moments, with :func:`gather_tiles`).
        """
        if self.scales is not None:
            raise ValueError("quantized tiles are for inference: change the pattern before quantizing")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != self.block_grid:
            got = getattr(mask, "shape", mask)
            raise ValueError(f"mask must be a bool tensor of shape {self.block_grid}, got {got}")
        mask = mask.to(self.device)
        cols = self.block_grid[1]
        position = torch.full((mask.numel(),), -1, dtype=torch.long, device=self.device)
        old_flat = self.row_indices_of_block.long() * cols + self.col_indices.long()
        position[old_flat] = torch.arange(self.nnz, device=self.device)
        source = position[mask.flatten().nonzero().squeeze(1)]  # row-major, the order of the new tiles
        matrix = BlockSparseMatrix(gather_tiles(self.values.detach(), source), *_compressed_index(mask), self.shape)
        return matrix, source

    def dequantized_values(self) -> torch.Tensor:
        """The stored tiles as floats: ``values`` itself, or for quantized tiles ``values · scales`` in float32."""
        if self.scales is None:
            return self.values
        return self.values.to(SCALE_DTYPE) * self.scales[:, :, None]

    def to_dense(self) -> torch.Tensor:
        """The logical ``(N, K)`` matrix, zeros where no tile is stored (differentiable w.r.t. ``values``);
        quantized tiles dequantized, in float32."""
        (rows, cols), (bn, bk) = self.block_grid, self.block_shape
        values = self.dequantized_values()
        tiles = values.new_zeros(rows * cols, bn, bk)
        flat_index = self.row_indices_of_block.long() * cols + self.col_indices.long()
        tiles = tiles.index_copy(0, flat_index, values)
        dense = tiles.reshape(rows, cols, bn, bk).transpose(1, 2).reshape(rows * bn, cols * bk)
        return dense[: self.shape[0], : self.shape[1]]

    def to_torch_bsr(self) -> torch.Tensor:
        """A PyTorch ``torch.sparse_bsr`` tensor with the same tiles (shape must be a multiple of the block)."""
        (n, k), (bn, bk) = self.shape, self.block_shape
        if self.scales is not None:
            raise ValueError("torch.sparse_bsr cannot hold quantized tiles and their scales")
        if n % bn or k % bk:
            raise ValueError(
                f"torch.sparse_bsr cannot hold a ragged shape: ({n}, {k}) is not a multiple of the block ({bn}, {bk})"
            )
        return torch.sparse_bsr_tensor(
            self.crow_indices, self.col_indices, self.values, size=self.shape, check_invariants=False
        )

    @classmethod
    def from_parts(
        cls,
        values: torch.Tensor,
        shape: Sequence[int],
        index_tensors: dict[str, torch.Tensor],
        scales: torch.Tensor | None = None,
        fp8_activations: bool = False,
    ) -> BlockSparseMatrix:
        """Reassemble from the arrays of :meth:`index_tensors` (and the scales of quantized tiles) without validating
        or recomputing anything.

        For code that keeps a validated matrix's arrays (``BlockSparseLinear`` holds them as buffers) and needs the
        matrix back on every call; it must not be fed arrays read from outside.
        """
        matrix = object.__new__(cls)
        matrix.values = values
        matrix.scales = scales
        matrix.fp8_activations = fp8_activations
        matrix.shape = tuple(int(s) for s in shape)
        for name, index in index_tensors.items():
            setattr(matrix, name, index)
        return matrix

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> BlockSparseMatrix:
        """Move to ``device`` and/or cast the values to ``dtype`` (indices stay int32; quantized tiles and their
        scales keep their dtypes: only ``dtype=None`` is accepted for them)."""
        if self.scales is not None and dtype is not None and dtype != self.values.dtype:
            raise ValueError(f"quantized ({self.quantization}) tiles keep their dtype; dequantize with to_dense()")
        if dtype is not None and self.scales is None and dtype not in VALUE_DTYPES:
            raise ValueError(f"values must stay floating point ({_VALUE_DTYPE_NAMES}), got dtype {dtype}")
        indices = {name: index.to(device=device) for name, index in self.index_tensors().items()}
        scales = None if self.scales is None else self.scales.to(device=device)
        values = self.values.to(device=device, dtype=dtype)
        return BlockSparseMatrix.from_parts(values, self.shape, indices, scales, self.fp8_activations)

    # ------------------------------------------------------------------ quantization

    def quantize(self, kind: str) -> BlockSparseMatrix:
        """The same tiles quantized for inference: ``kind`` ``"int8"`` (symmetric, ``round(w / s)`` in [-127, 127]),
        ``"fp8"`` (e4m3, ``w / s`` rounded to nearest, |·| ≤ 448), or ``"fp8-w8a8"`` (fp8 tiles, and activations
        quantized to fp8 per token where the row kernel runs: :attr:`fp8_activations`), with a float32 scale per
        row of each stored tile, ``s = absmax(row) / limit`` (:data:`ZERO_ROW_SCALE` for a row of zeros).

        Raises ``ValueError`` for tiles holding NaN or inf (naming how many), for a kind it does not know, and for
        tiles quantized already.
        """
        base = "fp8" if kind == "fp8-w8a8" else kind
        if base not in QUANTIZED_DTYPES:
            raise ValueError(f"quantize takes one of {(*QUANTIZED_DTYPES, 'fp8-w8a8')}, got {kind!r}")
        if self.scales is not None:
            raise ValueError(f"the tiles are quantized already ({self.quantization})")
        values = self.values.detach().to(torch.float64)
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise ValueError(f"cannot quantize tiles holding NaN or inf ({bad} of {values.numel()} values)")
        row_max = values.abs().amax(-1)  # (nnz, bn)
        scales = torch.where(row_max > 0, row_max / QUANTIZED_LIMITS[base], ZERO_ROW_SCALE).to(SCALE_DTYPE)
        scaled = values / scales.to(torch.float64)[:, :, None]  # by the float32 scale the kernels multiply by
        limit = QUANTIZED_LIMITS[base]
        if base == "int8":
            quantized = scaled.round().clamp(-limit, limit).to(torch.int8)
        else:
            quantized = scaled.clamp(-limit, limit).to(torch.float32).to(torch.float8_e4m3fn)
        return BlockSparseMatrix(quantized.contiguous(), self.crow_indices, self.col_indices, self.shape,
                                 scales.contiguous(), fp8_activations=kind == "fp8-w8a8")  # fmt: skip

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Check every invariant of the stored arrays; raise ``ValueError`` naming the first that fails.

        Reads the index arrays (a host sync on a GPU): run it when a matrix is built or loaded, not per call.
        """
        values, crow, col = self.values, self.crow_indices, self.col_indices
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(f"shape must be two positive sizes (N, K), got {self.shape}")
        if not isinstance(values, torch.Tensor) or values.dim() != 3:
            raise ValueError(f"values must be a 3-D tensor (nnz, bn, bk), got {getattr(values, 'shape', values)}")
        quantized = values.dtype in QUANTIZED_DTYPES.values()
        if values.dtype not in VALUE_DTYPES and not quantized:
            raise ValueError(f"values must be floating point ({_VALUE_DTYPE_NAMES}) or quantized "
                             f"(int8, float8_e4m3fn, with scales), got {values.dtype}")  # fmt: skip
        if not values.is_contiguous():
            raise ValueError("values must be contiguous")
        normalize_block_size(tuple(values.shape[1:]))
        self._validate_scales(quantized)
        for name, index in (("crow_indices", crow), ("col_indices", col)):
            if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype != INDEX_DTYPE:
                raise ValueError(f"{name} must be a 1-D {INDEX_DTYPE} tensor, got {getattr(index, 'dtype', index)}")
            if index.device != values.device:
                raise ValueError(f"{name} is on {index.device} but values are on {values.device}")
        rows, cols = self.block_grid
        if crow.numel() != rows + 1:
            raise ValueError(f"crow_indices must have {rows + 1} entries (block rows + 1), got {crow.numel()}")
        if col.numel() != values.shape[0]:
            raise ValueError(f"col_indices has {col.numel()} entries but values hold {values.shape[0]} tiles")
        crow_cpu, col_cpu = crow.cpu().long(), col.cpu().long()
        if crow_cpu[0] != 0:
            raise ValueError(f"crow_indices must start at 0, got {int(crow_cpu[0])}")
        if crow_cpu[-1] != col.numel():
            raise ValueError(f"crow_indices must end at nnz={col.numel()}, got {int(crow_cpu[-1])}")
        if bool((crow_cpu[1:] < crow_cpu[:-1]).any()):
            raise ValueError("crow_indices must be non-decreasing")
        if col.numel() and (int(col_cpu.min()) < 0 or int(col_cpu.max()) >= cols):
            raise ValueError(
                f"col_indices must lie in [0, {cols}), got range [{int(col_cpu.min())}, {int(col_cpu.max())}]"
            )
        # Within a row, columns must strictly increase: sorted and without duplicates.
        row_starts = torch.zeros(col.numel(), dtype=torch.bool)
        row_starts[crow_cpu[:-1][crow_cpu[:-1] < col.numel()]] = True
        steps = col_cpu[1:] - col_cpu[:-1]
        if bool(((steps <= 0) & ~row_starts[1:]).any()):
            raise ValueError("col_indices must be strictly increasing within each block row (sorted, no duplicates)")
        self._validate_padding(int(crow_cpu[-2]), col == cols - 1)

    def _validate_scales(self, quantized: bool) -> None:
        """Quantized tiles need float32 scales ``(nnz, bn)`` on their device, finite and positive (and fp8 tiles no
        NaN); plain tiles take none."""
        values, scales = self.values, self.scales
        if self.fp8_activations and values.dtype != torch.float8_e4m3fn:
            raise ValueError("fp8_activations needs fp8 (float8_e4m3fn) tiles")
        if not quantized:
            if scales is not None:
                raise ValueError(f"scales are for quantized (int8, fp8) tiles; these are {values.dtype}")
            return
        expected = (values.shape[0], values.shape[1])
        if not isinstance(scales, torch.Tensor) or scales.dtype != SCALE_DTYPE or tuple(scales.shape) != expected:
            got = (
                "none"
                if scales is None
                else f"{getattr(scales, 'dtype', scales)} {tuple(getattr(scales, 'shape', ()))}"
            )
            raise ValueError(f"{values.dtype} tiles need {SCALE_DTYPE} scales of shape {expected} (nnz, bn), got {got}")
        if scales.device != values.device:
            raise ValueError(f"scales are on {scales.device} but values are on {values.device}")
        if not scales.is_contiguous():
            raise ValueError("scales must be contiguous")
        if not bool(torch.isfinite(scales).all()) or not bool((scales > 0).all()):
            raise ValueError("scales must be finite and positive")
        if values.dtype == torch.float8_e4m3fn and bool(torch.isnan(values.to(torch.float32)).any()):
            raise ValueError("fp8 tiles must not hold NaN")

    def _validate_padding(self, last_row_start: int, in_last_column: torch.Tensor) -> None:
        """The kernels multiply a ragged edge's padding by zeros (x past K) or drop its products (rows past N): it
        must be zero, or an inf or NaN there would reach the outputs."""
        (n, k), (bn, bk) = self.shape, self.block_shape
        if n % bn and bool(self.values[last_row_start:, n % bn :].ne(0).any()):
            raise ValueError(f"the last block row's tiles must be zero past row N={n} (their padding)")
        if k % bk and bool(self.values[in_last_column][:, :, k % bk :].ne(0).any()):
            raise ValueError(f"the last block column's tiles must be zero past column K={k} (their padding)")


def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations ``(M, K)`` quantized to fp8 e4m3 per row (per token, dynamically): ``(xq, scales)`` with
    ``x ≈ xq.float() · scales[:, None]``, ``scales`` ``(M,)`` float32 = absmax(row) / 448 (:data:`ZERO_ROW_SCALE`
    for a row of zeros). The W8A8 products' input, on every path (reference and row kernel).

    Four passes over x and no fp32 copy of it (the absmax as an inf-norm in x's dtype, exact; the division
    promotes to fp32 as a copy would; the clamp in place): 1.4 GB moved for an 8192 × 8192 bf16 x against 2.6 GB
    for the plain formula (fp32 copy, abs, amax, divide, clamp, cast), bit for bit the same result."""
    x2, limit = x2.detach(), QUANTIZED_LIMITS["fp8"]
    if x2.shape[-1]:
        row_max = torch.linalg.vector_norm(x2, float("inf"), dim=-1).to(torch.float32)
    else:
        row_max = x2.new_zeros(x2.shape[:-1], dtype=torch.float32)
    scales = torch.where(row_max > 0, row_max / limit, ZERO_ROW_SCALE)
    return (x2 / scales[:, None]).clamp_(-limit, limit).to(torch.float8_e4m3fn), scales


class MLPWeights(NamedTuple):
    """An MLP's block-sparse weights and biases: ``up`` and ``gate`` logical ``(H, K)`` (no gate: a plain MLP),
    ``down`` ``(N, H)``; biases ``(H,)``, ``(N,)``, ``(H,)`` or None. The order is the ops' argument order."""

    up: BlockSparseMatrix
    down: BlockSparseMatrix
    gate: BlockSparseMatrix | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None

    @property
    def matrices(self) -> list[BlockSparseMatrix]:
        """up, down and (if any) gate."""
        return [self.up, self.down] + ([self.gate] if self.gate is not None else [])

    @property
    def biases(self) -> list[torch.Tensor | None]:
        """up's, down's and gate's bias."""
        return [self.up_bias, self.down_bias, self.gate_bias]


def gather_tiles(tiles: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``out[i] = tiles[source[i]]``, zeros where ``source[i] == -1``: per-tile data after a pattern change."""
    out = tiles.new_zeros((source.numel(), *tiles.shape[1:]))
    kept = source >= 0
    out[kept] = tiles[source[kept]]
    return out
