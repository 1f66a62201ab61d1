"""The reference ops against float64 masked dense math (they are the oracle for every kernel)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import random_sparse, relative_error
from sparseblocks import BlockSparseMatrix, reference, spmm

SHAPES = [(6, 42, 123), (1, 64, 64), (431, 130, 70), (33, 256, 128)]


@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
@pytest.mark.parametrize("block", [16, 32, (64, 16), (16, 128)])
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_reference_ops_match_masked_dense(m, n, k, block, density):
    w, dense = random_sparse(n, k, block, density, dtype=torch.float64)
    x = torch.randn(m, k, dtype=torch.float64)
    grad_out = torch.randn(m, n, dtype=torch.float64)
    bias = torch.randn(n, dtype=torch.float64)
    torch.testing.assert_close(reference.spmm(x, w, bias), x @ dense.t() + bias)
    torch.testing.assert_close(reference.spmm_input_grad(grad_out, w), grad_out @ dense)
    # SDDMM, checked tile by tile against the dense weight gradient.
    grad_dense = grad_out.t() @ x
    bn, bk = w.block_shape
    tiles = reference.sddmm(grad_out, x, w)
    assert tiles.shape == w.values.shape
    for j, (r, c) in enumerate(zip(w.row_indices_of_block.tolist(), w.col_indices.tolist(), strict=False)):
        expected = torch.zeros(bn, bk, dtype=torch.float64)
        part = grad_dense[r * bn : (r + 1) * bn, c * bk : (c + 1) * bk]
        expected[: part.shape[0], : part.shape[1]] = part
        torch.testing.assert_close(tiles[j], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_spmm_low_precision_error_bounds(dtype):
    w, dense = random_sparse(96, 200, 32, 0.5, dtype=dtype)
    x = torch.randn(3, 5, 200).to(dtype)
    out = spmm(x, w)
    assert out.dtype == dtype and out.shape == (3, 5, 96)
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert relative_error(out, x.double() @ dense.t()) < bound


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh", "silu"])
def test_spmm_gradcheck(activation):
    w, _ = random_sparse(40, 70, 16, 0.5, dtype=torch.float64)
    x = torch.randn(2, 3, 70, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, dtype=torch.float64, requires_grad=True)
    values = w.values.clone().requires_grad_()

    def f(x, values, bias):
        return spmm(x, BlockSparseMatrix.from_parts(values, w.shape, w.index_tensors()), bias, activation)

    assert torch.autograd.gradcheck(f, (x, values, bias))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
def test_activation_gradient_is_as_accurate_as_torchs_own_backward(dtype, activation):
    """The oracle's dZ = dY ⊙ act'(Z) in a low-precision dtype: its error against float64 (on the same rounded Z)
    is no worse than PyTorch's autograd of the activation in that dtype."""
    w, _ = random_sparse(256, 192, 32, 0.5, dtype=dtype)
    x, bias, grad_out = torch.randn(512, 192, dtype=dtype), torch.randn(256, dtype=dtype), torch.randn(512, 256)
    grad_out = grad_out.to(dtype)
    z = F.linear(x, w.to_dense(), bias).requires_grad_()  # what the reference computes, rounded to dtype
    reference.ACTIVATIONS[activation](z).backward(grad_out)
    z64 = z.detach().double().requires_grad_()
    reference.ACTIVATIONS[activation](z64).backward(grad_out.double())
    ours = reference.spmm_activation_grad(grad_out, x, w, bias, activation)
    assert ours.dtype == dtype
    assert relative_error(ours, z64.grad) <= relative_error(z.grad, z64.grad) * 1.01


def test_spmm_activation_matches_torch():
    w, dense = random_sparse(64, 48, 16, 0.6, dtype=torch.float64)
    x = torch.randn(10, 48, dtype=torch.float64)
    for name, fn in [("relu", F.relu), ("gelu", F.gelu), ("silu", F.silu)]:
        torch.testing.assert_close(spmm(x, w, activation=name), fn(x @ dense.t()))


def test_spmm_non_contiguous_input():
    w, dense = random_sparse(64, 48, 16, 0.6, dtype=torch.float64)
    x = torch.randn(48, 10, dtype=torch.float64).t()
    torch.testing.assert_close(spmm(x, w), x @ dense.t())


def test_spmm_compiles_fullgraph():
    w, dense = random_sparse(64, 48, 16, 0.6)
    x = torch.randn(10, 48)
    compiled = torch.compile(lambda x: spmm(x, w, activation="gelu") * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), F.gelu(x @ dense.float().t()) * 2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("make_args", "error", "message"),
    [
        (lambda w: (torch.randn(4, 47), w), ValueError, "K=48"),
        (lambda w: (torch.randn(()), w), ValueError, "K=48"),
        (lambda w: (torch.randn(4, 48, dtype=torch.float64), w), ValueError, "cast"),
        (lambda w: (torch.randn(4, 48, device="meta"), w), ValueError, "meta"),
        (lambda w: (torch.randn(4, 48), w.to_dense()), TypeError, "BlockSparseMatrix"),
        (lambda w: ([[1.0] * 48], w), TypeError, "tensor"),
        (lambda w: (torch.randn(4, 48), w, torch.randn(63)), ValueError, r"\(64,\)"),
        (lambda w: (torch.randn(4, 48), w, torch.randn(64).double()), ValueError, "bias must be"),
        (lambda w: (torch.randn(4, 48), w, None, "tanh"), ValueError, "activation"),
        (lambda w: (torch.randn(4, 48), w, [0.0] * 64), TypeError, "bias must be a tensor"),
        (lambda w: (torch.randn(4, 48), w, None, ["relu"]), ValueError, "activation"),
    ],
)
def test_spmm_rejects_bad_input(make_args, error, message):
    w, _ = random_sparse(64, 48, 16, 0.6)
    with pytest.raises(error, match=message):
        spmm(*make_args(w))
