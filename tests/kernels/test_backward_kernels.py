"""The Triton backward kernels (input gradient, SDDMM weight gradient) against the float64 reference.

Like test_spmm_kernel.py: through the interpreter on the CPU, compiled on a GPU (plus the ``gpu``-marked cases).
"""

import pytest
import torch

from conftest import (
    KERNEL_DEVICE,
    KERNEL_TEST_MARKS,
    TOLERANCE,
    assert_close_to_reference,
    random_sparse,
    relative_error,
)
from sparseblocks import BlockSparseMatrix, reference

DEVICE = KERNEL_DEVICE
pytestmark = KERNEL_TEST_MARKS
BLOCKS = [16, 32, 64, 128, (16, 128), (64, 32)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def input_grad(grad_out, w):
    """dY · W by the row kernel through W's transposed index: pointer loads, and descriptors where they fit."""
    from sparseblocks import dispatch
    from sparseblocks.kernels.spmm import input_grad_rows

    out = input_grad_rows(grad_out, w)
    if dispatch.descriptors_fit(grad_out.reshape(-1, w.shape[0]), w, "input_grad"):
        assert_close(input_grad_rows(grad_out, w, descriptors=True), out.double(), out.dtype)
    return out


def mlp_hidden_grad(grad_out, x, up, bias, down):
    """An MLP's hidden gradient (gelu) and its column sums, on the plan the dispatch picks: on chip where it can
    (the test asserts which), else the input gradient and the activation-gradient launch."""
    from sparseblocks import dispatch
    from sparseblocks.ops.spmm import _hidden_grad

    x2, grad2 = x.reshape(-1, up.shape[1]), grad_out.reshape(-1, down.shape[0])
    on_chip = dispatch.hidden_grad_on_chip_fits(x2, grad2, up, down)
    assert on_chip == (down.block_shape[1] == up.block_shape[0])
    return _hidden_grad(grad_out, x, up, bias, down, "gelu", True)


def sddmm(grad_out, x, w, split=None):
    from sparseblocks.kernels.sddmm import sddmm_triton

    return sddmm_triton(grad_out, x, w, split=split)


def assert_close(out, ref, dtype):
    assert out.dtype == dtype
    assert_close_to_reference(out.cpu(), ref.cpu())


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_input_grad_every_block_and_dtype_with_ragged_edges(block, dtype):
    w, dense = random_sparse(150, 140, block, 0.5, dtype=dtype, seed=4)
    grad_out = torch.randn(37, 150).to(dtype)
    out = input_grad(grad_out.to(DEVICE), w.to(DEVICE))
    assert_close(out, grad_out.double() @ dense, dtype)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sddmm_every_block_and_dtype_with_ragged_edges(block, dtype):
    w, _ = random_sparse(150, 140, block, 0.5, dtype=dtype, seed=5)
    grad_out, x = torch.randn(300, 150).to(dtype), torch.randn(300, 140).to(dtype)
    out = sddmm(grad_out.to(DEVICE), x.to(DEVICE), w.to(DEVICE))
    ref = reference.sddmm(grad_out.double(), x.double(), w.to(dtype=torch.float64))
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_grad_recomputes_the_pre_activation(activation, dtype):
    from sparseblocks.kernels.spmm import activation_grad_rows

    w, _ = random_sparse(100, 96, (32, 64), 0.5, dtype=dtype, seed=8)
    w = w.to(DEVICE)
    x, bias = torch.randn(41, 96, device=DEVICE).to(dtype), torch.randn(100, device=DEVICE).to(dtype)
    grad_out = torch.randn(41, 100, device=DEVICE).to(dtype)
    out, column_sums = activation_grad_rows(grad_out, x, w, bias, activation, bias_grad=True)
    ref = reference.spmm_activation_grad(
        grad_out.double(), x.double(), w.to(dtype=torch.float64), bias.double(), activation
    )
    assert_close(out, ref, dtype)
    assert column_sums.dtype == torch.float32 and relative_error(column_sums.cpu(), ref.sum(0)) < 1e-5


@pytest.mark.parametrize(
    ("up_block", "down_block"),
    [(16, 16), (32, (16, 32)), ((64, 32), (32, 64)), (32, 64)],  # the last does not chain: two products
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mlp_hidden_gradient_from_the_next_layer(up_block, down_block, dtype):
    """dZ = (dY · W_down) ⊙ act'(x · W_upᵀ + b) with the hidden gradient kept on chip where down's blocks chain
    with up's (else the two products), ragged M, H and N."""

    up, _ = random_sparse(152, 136, up_block, 0.5, dtype=dtype, seed=11)
    down, down_dense = random_sparse(120, 152, down_block, 0.5, dtype=dtype, seed=12)
    x, bias = torch.randn(37, 136).to(dtype), torch.randn(152).to(dtype)
    grad_out = torch.randn(37, 120).to(dtype)
    dz, column_sums = mlp_hidden_grad(
        grad_out.to(DEVICE), x.to(DEVICE), up.to(DEVICE), bias.to(DEVICE), down.to(DEVICE)
    )
    hidden_grad = grad_out.double() @ down_dense
    ref = reference.spmm_activation_grad(hidden_grad, x.double(), up.to(dtype=torch.float64), bias.double(), "gelu")
    assert_close(dz, ref, dtype)
    # the two-product path rounds the hidden gradient to dtype on the way: the sums are as exact as dZ itself
    assert relative_error(column_sums.cpu(), ref.sum(0)) < TOLERANCE[dtype]


@pytest.mark.parametrize("split", [1, 2, 3])
def test_sddmm_split_reduction_and_three_d_non_contiguous_inputs(split):
    w, _ = random_sparse(64, 96, 32, 0.5, seed=6)
    w = w.to(DEVICE)
    grad_out = torch.randn(3, 96, 200, device=DEVICE).transpose(1, 2)[..., :64]  # (3, 200, 64), strided
    x = torch.randn(3, 200, 96, device=DEVICE)
    out = sddmm(grad_out, x, w, split=split)
    ref = reference.sddmm(grad_out.double(), x.double(), w.to(dtype=torch.float64))
    assert_close(out, ref, torch.float32)
    assert torch.equal(out, sddmm(grad_out, x, w, split=split)), "not reproducible run to run"


@pytest.mark.parametrize("case", ["empty_rows_and_columns", "one_tile", "full", "no_tiles"])
def test_backward_patterns(case):
    dense = torch.randn(128, 96)
    mask = torch.zeros(4, 3, dtype=torch.bool)
    if case == "empty_rows_and_columns":
        mask[0, 0] = mask[0, 2] = mask[3, 2] = True  # rows 1, 2 and column 1 empty
    elif case == "one_tile":
        mask[2, 1] = True
    elif case == "full":
        mask[:] = True
    w = BlockSparseMatrix.from_dense(dense, 32, mask=mask).to(DEVICE)
    grad_out, x = torch.randn(33, 128, device=DEVICE), torch.randn(33, 96, device=DEVICE)
    reference_w = w.to(dtype=torch.float64)
    assert_close(input_grad(grad_out, w), reference.spmm_input_grad(grad_out.double(), reference_w), torch.float32)
    assert_close(sddmm(grad_out, x, w), reference.sddmm(grad_out.double(), x.double(), reference_w), torch.float32)


def test_single_row_and_empty_batch():
    w, dense = random_sparse(96, 64, 32, 0.5)
    w = w.to(DEVICE)
    grad_out, x = torch.randn(1, 96, device=DEVICE), torch.randn(1, 64, device=DEVICE)
    assert_close(input_grad(grad_out, w), grad_out.double() @ dense.to(DEVICE), torch.float32)
    ref = reference.sddmm(grad_out.double(), x.double(), w.to(dtype=torch.float64))
    assert_close(sddmm(grad_out, x, w), ref, torch.float32)
    assert input_grad(grad_out[:0], w).shape == (0, 64)
    assert torch.equal(sddmm(grad_out[:0], x[:0], w), torch.zeros_like(w.values))


def column_sums(g, split=None):
    from sparseblocks.kernels.column_sums import column_sums_triton

    return column_sums_triton(g, split)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "split"), [(1, 96, None), (700, 200, None), (700, 200, 3), (129, 128, 5)])
def test_column_sums_ragged_and_split(m, n, split, dtype):
    """The bias gradient of a layer without activation: fp32 sums over rows, any chunking of M gives the same."""
    g = torch.randn(m, n).to(dtype)
    out = column_sums(g.to(DEVICE), split)
    assert_close(out, g.double().sum(0), torch.float32)


def test_column_sums_strided_and_empty():
    g = torch.randn(80, 300, device=DEVICE)
    assert_close(column_sums(g.t()), g.t().double().sum(0), torch.float32)  # (300, 80), row stride 1
    assert torch.equal(column_sums(g[:0]), torch.zeros(300, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("m", "n", "k", "block"), [(8192, 8192, 2048, 64), (50432, 768, 3072, 32), (1, 3072, 768, 128)]
)
def test_backward_real_sizes_on_gpu(m, n, k, block):
    w, _ = random_sparse(n, k, block, 0.1, dtype=torch.bfloat16, seed=7)
    w = w.to("cuda")
    grad_out = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    reference_w = w.to(dtype=torch.float64)
    ref = reference.spmm_input_grad(grad_out.double(), reference_w)
    assert_close(input_grad(grad_out, w), ref, torch.bfloat16)
    assert_close(sddmm(grad_out, x, w), reference.sddmm(grad_out.double(), x.double(), reference_w), torch.bfloat16)
    assert_close(column_sums(grad_out), grad_out.double().sum(0), torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("m", "k", "hidden", "block"), [(50432, 768, 3072, 64), (4099, 2048, 8192, 128)])
def test_mlp_hidden_gradient_real_sizes_on_gpu(m, k, hidden, block):
    up, _ = random_sparse(hidden, k, block, 0.1, dtype=torch.bfloat16, seed=13)
    down, down_dense = random_sparse(k, hidden, block, 0.1, dtype=torch.bfloat16, seed=14)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    grad_out = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    dz, column_sums = mlp_hidden_grad(grad_out, x, up.to("cuda"), bias, down.to("cuda"))
    hidden_grad = grad_out.double() @ down_dense.cuda()
    up64 = up.to("cuda", dtype=torch.float64)
    ref = reference.spmm_activation_grad(hidden_grad, x.double(), up64, bias.double(), "gelu")
    assert_close(dz, ref, torch.bfloat16)
    assert relative_error(column_sums, ref.sum(0)) < 1e-2
