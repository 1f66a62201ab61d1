import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_sparse
from sparseblocks import BlockSparseMatrix
from sparseblocks.format import BLOCK_SIZES, normalize_block_size
from sparseblocks.masks import block_norms


def _expand(mask: torch.Tensor, block, shape) -> torch.Tensor:
    bn, bk = block
    return mask.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[: shape[0], : shape[1]]


@st.composite
def dense_and_mask(draw):
    bn, bk = draw(st.sampled_from(BLOCK_SIZES)), draw(st.sampled_from(BLOCK_SIZES))
    n, k = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    grid = (math.ceil(n / bn), math.ceil(k / bk))
    kind = draw(st.sampled_from(["empty", "one", "all", "random"]))
    mask = torch.zeros(grid, dtype=torch.bool)
    if kind == "one":
        mask[draw(st.integers(0, grid[0] - 1)), draw(st.integers(0, grid[1] - 1))] = True
    elif kind == "all":
        mask[:] = True
    elif kind == "random":
        seed = draw(st.integers(0, 2**31 - 1))
        mask = torch.rand(grid, generator=torch.Generator().manual_seed(seed)) < 0.4
    dense = torch.randn(n, k, dtype=torch.float64)
    return dense, mask, (bn, bk)


@settings(max_examples=60, deadline=None)
@given(dense_and_mask())
def test_from_dense_round_trip(case):
    dense, mask, block = case
    matrix = BlockSparseMatrix.from_dense(dense, block, mask=mask)
    expected = dense * _expand(mask, block, dense.shape)
    assert torch.equal(matrix.to_dense(), expected)
    assert matrix.nnz == int(mask.sum())
    assert matrix.density == pytest.approx(mask.float().mean().item())
    assert torch.equal(matrix.block_mask(), mask)
    # Padding of ragged tiles is zero.
    assert torch.equal(BlockSparseMatrix.from_dense(matrix.to_dense(), block).to_dense(), expected)


@settings(max_examples=40, deadline=None)
@given(dense_and_mask())
def test_transposed_index_lists_the_same_tiles_by_column(case):
    dense, mask, block = case
    matrix = BlockSparseMatrix.from_dense(dense, block, mask=mask)
    rows, cols = matrix.block_grid
    assert matrix.ccol_indices.dtype == torch.int32 and matrix.ccol_indices.numel() == cols + 1
    perm = matrix.transpose_perm.long()
    assert torch.equal(perm.sort().values, torch.arange(matrix.nnz))
    # Column-major walk: columns non-decreasing, rows increasing within a column, same tiles.
    col_of = torch.repeat_interleave(torch.arange(cols), matrix.ccol_indices.diff().long())
    assert torch.equal(matrix.col_indices.long()[perm], col_of)
    assert torch.equal(matrix.row_indices_of_block.long()[perm], matrix.row_indices.long())
    order = col_of * rows + matrix.row_indices.long()
    assert bool((order.diff() > 0).all())
    # Heavy rows first, heavy columns first.
    counts = matrix.crow_indices.diff()[matrix.row_order.long()]
    assert bool((counts.diff() <= 0).all())
    counts = matrix.ccol_indices.diff()[matrix.col_order.long()]
    assert bool((counts.diff() <= 0).all())


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.93, 1.0])
def test_keep_takes_exact_count_of_largest_blocks(keep):
    dense = torch.randn(200, 130)
    matrix = BlockSparseMatrix.from_dense(dense, (32, 16), keep=keep)
    norms = block_norms(dense, (32, 16))
    assert matrix.nnz == round(keep * norms.numel())
    kept, dropped = norms[matrix.block_mask()], norms[~matrix.block_mask()]
    if kept.numel() and dropped.numel():
        assert kept.min() >= dropped.max()


def test_without_mask_keeps_nonzero_blocks():
    dense = torch.zeros(64, 64)
    dense[3, 40] = 1.0
    matrix = BlockSparseMatrix.from_dense(dense, 32)
    assert matrix.nnz == 1 and matrix.col_indices.tolist() == [1]
    assert torch.equal(matrix.to_dense(), dense)


def test_torch_bsr_round_trip():
    matrix, dense = random_sparse(128, 96, (32, 16), 0.4, dtype=torch.float64)
    bsr = matrix.to_torch_bsr()
    assert torch.equal(bsr.to_dense(), dense)
    back = BlockSparseMatrix.from_torch_bsr(bsr)
    assert torch.equal(back.to_dense(), dense) and back.crow_indices.dtype == torch.int32
    ragged, _ = random_sparse(100, 96, 32, 0.5)
    with pytest.raises(ValueError, match="ragged"):
        ragged.to_torch_bsr()
    with pytest.raises(ValueError, match="sparse_bsr"):
        BlockSparseMatrix.from_torch_bsr(dense)


def test_to_dtype_and_bytes():
    matrix, dense = random_sparse(96, 64, 16, 0.5)
    half = matrix.to(dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.crow_indices.dtype == torch.int32
    assert torch.equal(half.to_dense(), dense.to(torch.bfloat16))
    index_bytes = sum(t.numel() * 4 for t in matrix.index_tensors().values())
    assert matrix.nbytes == matrix.nnz * 16 * 16 * 4 + index_bytes
    assert half.nbytes == matrix.nnz * 16 * 16 * 2 + index_bytes
    assert "density=0.500" in repr(matrix)
    with pytest.raises(ValueError, match="floating"):
        matrix.to(dtype=torch.int64)


def _valid_parts():
    matrix, _ = random_sparse(64, 96, 32, 0.5)
    return matrix.values, matrix.crow_indices, matrix.col_indices


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda v, c, i: (v, c, i, (0, 96)), "positive"),
        (lambda v, c, i: (v[0], c, i, (64, 96)), "3-D"),
        (lambda v, c, i: (v.long(), c, i, (64, 96)), "floating"),
        (lambda v, c, i: (v.transpose(1, 2), c, i, (64, 96)), "contiguous"),
        (lambda v, c, i: (v[:, :, :8].contiguous(), c, i, (64, 96)), "block_size"),
        (lambda v, c, i: (v, c.long(), i, (64, 96)), "int32"),
        (lambda v, c, i: (v, c[:-1], i, (64, 96)), "block rows"),
        (lambda v, c, i: (v[:-1], c, i, (64, 96)), "tiles"),
        (lambda v, c, i: (v, c - c[0] + 1, i, (64, 96)), "start at 0"),
        (lambda v, c, i: (v, torch.tensor([0, 2, 4], dtype=torch.int32), i, (64, 96)), "end at nnz"),
        (
            lambda v, c, i: (v, torch.tensor([0, 3, 2], dtype=torch.int32).add(c[-1] - 2), i, (64, 96)),
            "start",
        ),
        (lambda v, c, i: (v, torch.tensor([0, 2, 1, 3], dtype=torch.int32), i, (96, 96)), "non-decreasing"),
        (lambda v, c, i: (v, c, i + 3, (64, 96)), r"\[0, 3\)"),
        (lambda v, c, i: (v, c, i - 5, (64, 96)), r"\[0, 3\)"),
        (lambda v, c, i: (v, c, i.flip(0), (64, 96)), "strictly increasing"),
        (lambda v, c, i: (v, c, torch.zeros_like(i), (64, 96)), "strictly increasing"),
    ],
)
def test_validate_names_the_broken_invariant(mutate, message):
    values, crow, col = _valid_parts()
    assert crow.tolist() == [0, 1, 3] or crow[-1] == 3  # 3 of 6 tiles kept
    with pytest.raises(ValueError, match=message):
        BlockSparseMatrix(*mutate(values, crow, col))


def test_validate_takes_the_last_block_column_and_refuses_the_grid_width():
    mask = torch.tensor([[True, False, True], [False, True, True]])  # the last tile in the last block column
    matrix = BlockSparseMatrix.from_dense(torch.randn(64, 96), 32, mask=mask)
    assert int(matrix.col_indices[-1]) == 2
    col = matrix.col_indices.clone()
    col[-1] = 3  # one past the last column, and still increasing within its row
    with pytest.raises(ValueError, match=r"col_indices must lie in \[0, 3\), got range \[0, 3\]"):
        BlockSparseMatrix(matrix.values, matrix.crow_indices, col, (64, 96))


def test_validate_requires_zero_padding_on_ragged_edges():
    """The kernels multiply a ragged edge's padding by zeros: an inf there would turn outputs into NaN."""
    matrix = BlockSparseMatrix.from_dense(torch.randn(20, 20), 16)
    for padding in (lambda v: v[-1, 4:, :], lambda v: v[1, :, 4:]):  # past row N=20, past column K=20
        values = matrix.values.clone()
        padding(values).fill_(float("inf"))
        with pytest.raises(ValueError, match="padding"):
            BlockSparseMatrix(values, matrix.crow_indices, matrix.col_indices, matrix.shape)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int32])
def test_only_the_value_dtypes_the_ops_take(dtype):
    matrix, _ = random_sparse(32, 32, 16, 0.5)
    # fp8 tiles are quantized tiles: without scales they are refused (tests/core/test_quantized.py)
    with pytest.raises(ValueError, match="floating point" if dtype == torch.int32 else "scales"):
        BlockSparseMatrix(matrix.values.to(dtype), matrix.crow_indices, matrix.col_indices, matrix.shape)
    with pytest.raises(ValueError, match="floating point"):
        BlockSparseMatrix.from_dense(torch.randn(32, 32).to(dtype), 16)


def test_torch_bsr_indices_past_int32_are_refused_not_wrapped():
    bsr = torch.sparse_bsr_tensor(
        torch.tensor([0, 1]), torch.tensor([2**32]), torch.randn(1, 16, 16), (16, 32), check_invariants=False
    )
    with pytest.raises(ValueError, match="col_indices must lie in"):
        BlockSparseMatrix.from_torch_bsr(bsr)


@pytest.mark.parametrize("block_size", [None, 16.0, (16.5, 32), True, "16"])
def test_block_sizes_must_be_integers(block_size):
    with pytest.raises(ValueError, match="block_size"):
        normalize_block_size(block_size)


def test_validate_catches_mixed_devices():
    values, crow, col = _valid_parts()
    with pytest.raises(ValueError, match="on meta"):
        BlockSparseMatrix(values, crow.to("meta"), col, (64, 96))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"dense": torch.randn(4, 4, 4), "block_size": 16}, "2-D"),
        ({"dense": torch.ones(4, 4, dtype=torch.int64), "block_size": 16}, "floating"),
        ({"dense": torch.randn(0, 4), "block_size": 16}, "nonzero size"),
        ({"dense": torch.randn(32, 32), "block_size": 24}, "block_size"),
        ({"dense": torch.randn(32, 32), "block_size": (16, 16, 16)}, "block_size"),
        ({"dense": torch.randn(32, 32), "block_size": 16, "keep": 1.5}, "fraction"),
        (
            {"dense": torch.randn(32, 32), "block_size": 16, "mask": torch.ones(3, 2, dtype=torch.bool)},
            "mask",
        ),
        ({"dense": torch.randn(32, 32), "block_size": 16, "mask": torch.ones(2, 2)}, "mask"),
        (
            {
                "dense": torch.randn(32, 32),
                "block_size": 16,
                "keep": 0.5,
                "mask": torch.ones(2, 2, dtype=torch.bool),
            },
            "either",
        ),
    ],
)
def test_from_dense_rejects_bad_input(kwargs, error):
    with pytest.raises(ValueError, match=error):
        BlockSparseMatrix.from_dense(**kwargs)


def test_with_pattern_keeps_the_tiles_both_patterns_hold_and_zeroes_new_ones():
    matrix, dense = random_sparse(48, 64, 16, 0.5, seed=3)  # a 3 x 4 grid
    old = torch.zeros(3, 4, dtype=torch.bool)
    old[matrix.row_indices_of_block.long(), matrix.col_indices.long()] = True
    new = old.clone()
    new[0] = ~new[0]  # row 0: old tiles dropped, empty positions grown
    new[2, 3] = True
    changed, source = matrix.with_pattern(new)
    changed.validate()
    kept = _expand(new & old, (16, 16), (48, 64))
    assert torch.equal(changed.to_dense().double()[kept], dense[kept])
    assert not changed.to_dense()[_expand(new & ~old, (16, 16), (48, 64))].any()
    rows, cols = changed.row_indices_of_block.long(), changed.col_indices.long()
    flat_old = matrix.row_indices_of_block.long() * 4 + matrix.col_indices.long()
    for tile, (row, col) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
        expected = (flat_old == row * 4 + col).nonzero()
        assert source[tile] == (expected.item() if len(expected) else -1)
    with pytest.raises(ValueError, match=r"shape \(3, 4\)"):
        matrix.with_pattern(new[:2])
