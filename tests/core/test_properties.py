"""Property-based tests (hypothesis, the derandomized profile of tests/conftest.py): the format's construction,
validation and transposed index, and ``spmm`` / ``sparse_mlp`` with their gradients against a float64 dense
computation, on the reference path and through the row kernels under Triton's interpreter (CPU tensors inside
``force_plan``), on ragged, strided, 3-D, empty and skewed cases."""

from itertools import pairwise

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import KERNEL_TEST_MARKS, relative_error
from sparseblocks import BlockSparseMatrix
from sparseblocks.dispatch import force_plan
from sparseblocks.ops import sparse_mlp, spmm

BLOCKS = (16, 32)


@st.composite
def patterns(draw, n_max: int = 80, k_max: int = 80, blocks=BLOCKS):
    """(dense float64 (N, K) masked to its tiles, block, mask): ragged sizes; empty, full, skewed or random tiles."""
    bn, bk = draw(st.sampled_from(blocks)), draw(st.sampled_from(blocks))
    n, k = draw(st.integers(1, n_max)), draw(st.integers(1, k_max))
    grid = (-(-n // bn), -(-k // bk))
    kind = draw(st.sampled_from(["empty", "full", "skewed", "random"]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if kind == "empty":
        mask = torch.zeros(grid, dtype=torch.bool)
    elif kind == "full":
        mask = torch.ones(grid, dtype=torch.bool)
    elif kind == "skewed":  # one block row holds every tile
        mask = torch.zeros(grid, dtype=torch.bool)
        mask[draw(st.integers(0, grid[0] - 1))] = True
    else:
        mask = torch.rand(grid, generator=generator) < 0.5
    dense = torch.randn(n, k, generator=generator, dtype=torch.float64)
    return dense, (bn, bk), mask


def _masked(dense: torch.Tensor, block, mask: torch.Tensor) -> torch.Tensor:
    (n, k), (bn, bk) = dense.shape, block
    return dense * mask.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]


@settings(max_examples=40)
@given(patterns())
def test_construction_round_trips_and_the_transposed_index_lists_the_same_tiles(case):
    dense, block, mask = case
    matrix = BlockSparseMatrix.from_dense(dense, block, mask=mask)
    assert torch.equal(matrix.to_dense(), _masked(dense, block, mask))
    assert torch.equal(matrix.block_mask(), mask) and matrix.nnz == int(mask.sum())
    rebuilt = BlockSparseMatrix(matrix.values, matrix.crow_indices, matrix.col_indices, matrix.shape)
    assert torch.equal(rebuilt.to_dense(), matrix.to_dense())
    # the transpose from the column index alone: tile j of column c is values[transpose_perm[j]] at row_indices[j]
    (n, k), (bn, bk) = matrix.shape, matrix.block_shape
    transposed = torch.zeros(matrix.block_grid[1] * bk, matrix.block_grid[0] * bn, dtype=dense.dtype)
    for c in range(matrix.block_grid[1]):
        for j in range(int(matrix.ccol_indices[c]), int(matrix.ccol_indices[c + 1])):
            r = int(matrix.row_indices[j])
            tile = matrix.values[int(matrix.transpose_perm[j])]
            transposed[c * bk : (c + 1) * bk, r * bn : (r + 1) * bn] = tile.T
    assert torch.equal(transposed[:k, :n], matrix.to_dense().T)


def _invariants_hold(crow: torch.Tensor, col: torch.Tensor, grid: tuple[int, int]) -> bool:
    """The index invariants, checked here independently of ``validate``."""
    crow, col = crow.long().tolist(), col.long().tolist()
    if len(crow) != grid[0] + 1 or crow[0] != 0 or crow[-1] != len(col):
        return False
    if any(b < a for a, b in pairwise(crow)):
        return False
    rows = [col[crow[r] : crow[r + 1]] for r in range(grid[0])]
    return all(0 <= c < grid[1] for c in col) and all(all(a < b for a, b in pairwise(r)) for r in rows)


@settings(max_examples=60)
@given(patterns(), st.sampled_from(["crow_indices", "col_indices"]), st.integers(0, 10**6), st.integers(-3, 8))
def test_a_corrupted_index_is_refused_or_still_a_valid_matrix(case, name, position, value):
    dense, block, mask = case
    matrix = BlockSparseMatrix.from_dense(dense.float(), block, mask=mask)
    index = {"crow_indices": matrix.crow_indices.clone(), "col_indices": matrix.col_indices.clone()}
    if index[name].numel() == 0:
        return
    index[name][position % index[name].numel()] = value
    try:
        changed = BlockSparseMatrix(matrix.values, index["crow_indices"], index["col_indices"], matrix.shape)
    except ValueError:
        assert not _invariants_hold(index["crow_indices"], index["col_indices"], matrix.block_grid) or (
            dense.shape[0] % block[0] or dense.shape[1] % block[1]  # a tile moved onto a ragged edge: its padding
        )
        return
    assert _invariants_hold(changed.crow_indices, changed.col_indices, changed.block_grid)


@st.composite
def spmm_cases(draw, kernel: bool):
    """(x, w, bias, activation): x 2-D or 3-D, contiguous or strided, w of a random pattern, float32 on the kernel
    path (small), float64 on the reference path."""
    dense, block, mask = draw(patterns(48, 48) if kernel else patterns())
    dtype = torch.float32 if kernel else torch.float64
    w = BlockSparseMatrix.from_dense(dense.to(dtype), block, mask=mask)
    leading = draw(st.sampled_from([(5,), (2, 3), (1,), (17,)]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    layout = draw(st.sampled_from(["contiguous", "strided", "transposed"]))
    k = dense.shape[1]
    if layout == "strided":
        x = torch.randn(*leading, 2 * k, generator=generator, dtype=dtype)[..., ::2]
    elif layout == "transposed":
        x = torch.randn(k, *leading, generator=generator, dtype=dtype).movedim(0, -1)
    else:
        x = torch.randn(*leading, k, generator=generator, dtype=dtype)
    bias = torch.randn(dense.shape[0], generator=generator, dtype=dtype) if draw(st.booleans()) else None
    return x, w, bias, draw(st.sampled_from([None, "relu", "gelu"]))


def _check_spmm(x, w, bias, activation, tolerance):
    x = x.detach().requires_grad_()
    values = w.values.detach().requires_grad_()
    w = BlockSparseMatrix(values, w.crow_indices, w.col_indices, w.shape)
    bias = None if bias is None else bias.detach().requires_grad_()
    out = spmm(x, w, bias, activation)
    grad = torch.randn_like(out)
    out.backward(grad)
    # float64 dense reference, gradients by autograd through the masked dense weight
    x64, dense64 = x.detach().double().requires_grad_(), w.to_dense().detach().double().requires_grad_()
    bias64 = None if bias is None else bias.detach().double().requires_grad_()
    act = {None: lambda t: t, "relu": torch.relu, "gelu": torch.nn.functional.gelu}[activation]
    ref = act(torch.nn.functional.linear(x64, dense64, bias64))
    ref.backward(grad.double())
    assert relative_error(out, ref) < tolerance
    assert relative_error(x.grad, x64.grad) < tolerance
    values_ref = BlockSparseMatrix.from_dense(dense64.grad, w.block_shape, mask=w.block_mask()).values
    assert relative_error(values.grad, values_ref) < tolerance
    if bias is not None:
        assert relative_error(bias.grad, bias64.grad) < tolerance


@settings(max_examples=40)
@given(spmm_cases(kernel=False))
def test_spmm_and_its_gradients_match_float64_on_the_reference_path(case):
    _check_spmm(*case, tolerance=1e-12)


@KERNEL_TEST_MARKS[0]
@KERNEL_TEST_MARKS[1]
@settings(max_examples=8, suppress_health_check=[HealthCheck.function_scoped_fixture])  # no_tf32 holds for all
@given(spmm_cases(kernel=True))
def test_spmm_and_its_gradients_match_float64_through_the_row_kernels(case):
    with force_plan(forward="rows", input_grad="rows", activation_grad="rows", bias_grad="column_sums_kernel"):
        _check_spmm(*case, tolerance=1e-5)


@st.composite
def mlp_cases(draw, kernel: bool):
    """(x, up, down, activation): up (H, K) and down (N, H) with down's block columns as wide as up's block rows."""
    block = draw(st.sampled_from([16] if kernel else BLOCKS))
    up_dense, _, up_mask = draw(patterns(48, 48, blocks=(block,)))
    h = up_dense.shape[0]
    n = draw(st.integers(1, 48))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    down_mask = torch.rand(-(-n // block), -(-h // block), generator=generator) < 0.6
    dtype = torch.float32 if kernel else torch.float64
    up = BlockSparseMatrix.from_dense(up_dense.to(dtype), block, mask=up_mask)
    down = BlockSparseMatrix.from_dense(torch.randn(n, h, generator=generator, dtype=dtype), block, mask=down_mask)
    x = torch.randn(*draw(st.sampled_from([(3,), (2, 5)])), up_dense.shape[1], generator=generator, dtype=dtype)
    return x, up, down, draw(st.sampled_from(["relu", "gelu"]))


def _check_mlp(x, up, down, activation, tolerance):
    x = x.detach().requires_grad_()
    up_values, down_values = up.values.detach().requires_grad_(), down.values.detach().requires_grad_()
    up_w = BlockSparseMatrix(up_values, up.crow_indices, up.col_indices, up.shape)
    down_w = BlockSparseMatrix(down_values, down.crow_indices, down.col_indices, down.shape)
    out = sparse_mlp(x, up_w, down_w, activation=activation)
    grad = torch.randn_like(out)
    out.backward(grad)
    x64 = x.detach().double().requires_grad_()
    act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu}[activation]
    ref = act(x64 @ up.to_dense().double().T) @ down.to_dense().double().T
    ref.backward(grad.double())
    assert relative_error(out, ref) < tolerance
    assert relative_error(x.grad, x64.grad) < tolerance
    with torch.no_grad():  # inference takes the fused path where it applies
        assert relative_error(sparse_mlp(x, up, down, activation=activation), ref) < tolerance


@settings(max_examples=25)
@given(mlp_cases(kernel=False))
def test_sparse_mlp_and_its_gradients_match_float64_on_the_reference_path(case):
    _check_mlp(*case, tolerance=1e-12)


@KERNEL_TEST_MARKS[0]
@KERNEL_TEST_MARKS[1]
@settings(max_examples=5, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mlp_cases(kernel=True))
def test_sparse_mlp_and_its_gradients_match_float64_through_the_kernels(case):
    with force_plan(forward="rows", input_grad="rows", activation_grad="rows"):
        _check_mlp(*case, tolerance=1e-5)
