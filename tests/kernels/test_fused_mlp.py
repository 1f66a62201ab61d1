"""The fused MLP kernel against the float64 reference (``reference.mlp``), through Triton's interpreter on the CPU."""

import pytest
import torch

from conftest import (
    KERNEL_DEVICE,
    KERNEL_TEST_MARKS,
    assert_close_to_reference,
    random_sparse,
)
from sparseblocks import reference
from sparseblocks.format import MLPWeights

DEVICE = KERNEL_DEVICE
pytestmark = KERNEL_TEST_MARKS


def _mlp(k, hidden, n, up_block, down_block, density=0.5, gated=False, dtype=torch.float32, seed=0):
    up, _ = random_sparse(hidden, k, up_block, density, dtype, seed)
    down, _ = random_sparse(n, hidden, down_block, density, dtype, seed + 1)
    gate = random_sparse(hidden, k, up_block, density, dtype, seed + 2)[0] if gated else None
    return up.to(DEVICE), down.to(DEVICE), None if gate is None else gate.to(DEVICE)


def _float64(weights: MLPWeights) -> MLPWeights:
    """The weights and biases in float64 (the reference's)."""
    return MLPWeights(*(None if t is None else t.to(dtype=torch.float64) for t in weights))


def _check(x, up, down, gate=None, biases=(None, None, None), activation="gelu"):
    from sparseblocks.kernels.fused_mlp import fused_mlp_triton

    out = fused_mlp_triton(x, MLPWeights(up, down, gate, *biases), activation)
    ref = reference.mlp(x.double(), _float64(MLPWeights(up, down, gate, *biases)), activation)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert_close_to_reference(out, ref, chained=True)


@pytest.mark.parametrize(("up_block", "down_block"), [(16, 16), (32, 32), (64, 64), ((32, 16), (16, 32))])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_block_both_forms_ragged_sizes(up_block, down_block, gated, dtype):
    up, down, gate = _mlp(70, 100, 50, up_block, down_block, gated=gated, dtype=dtype)
    x = torch.randn(37, 70, device=DEVICE).to(dtype)
    biases = [torch.randn(size, device=DEVICE).to(dtype) for size in (100, 50, 100)]
    _check(x, up, down, gate, biases if gated else (biases[0], biases[1], None), "silu" if gated else "gelu")


def test_strided_biases():
    up, down, gate = _mlp(70, 100, 50, 32, 32, gated=True)
    columns = torch.randn(100, 4, device=DEVICE)
    _check(torch.randn(9, 70, device=DEVICE), up, down, gate, (columns[:, 0], columns[:50, 1], columns[:, 3]), "silu")


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("m", [1, 5, 40])
def test_activations_and_row_counts_without_bias(activation, m):
    up, down, _ = _mlp(48, 64, 32, 16, 16, seed=3)
    _check(torch.randn(m, 48, device=DEVICE), up, down, activation=activation)


@pytest.mark.parametrize("density", [0.0, 0.1, 1.0])
def test_empty_and_full_patterns(density):
    up, down, gate = _mlp(32, 64, 48, 16, 16, density=density, gated=True, seed=4)
    _check(torch.randn(9, 32, device=DEVICE), up, down, gate, activation="silu")


def test_padding_of_a_ragged_hidden_size_never_leaks():
    """Nonzero values in the padded rows of up and padded columns of down must not reach the output."""
    up, down, _ = _mlp(32, 40, 16, 16, 16, density=1.0, seed=5)
    up.values[up.crow_indices[-2] :, 8:, :] = 5.0  # hidden units 40..47 of the last block row are padding
    down_last = (down.col_indices == 2).nonzero().flatten()
    down.values[down_last, :, 8:] = 7.0
    _check(torch.randn(3, 32, device=DEVICE), up, down, activation="relu")


def test_hidden_tiles_that_do_not_chain_run_unfused():
    """down's block columns narrower than up's block rows: the fused kernel cannot take it, three products can."""
    from sparseblocks.dispatch import Tiles, force_plan, tiles_chain
    from sparseblocks.ops import sparse_mlp

    up, down, _ = _mlp(32, 64, 32, 16, (16, 32))
    assert not tiles_chain(Tiles.of(up), Tiles.of(down), None)
    x = torch.randn(80, 32, device=DEVICE)
    expected = reference.mlp(x.double(), MLPWeights(up.to(dtype=torch.float64), down.to(dtype=torch.float64)))
    assert_close_to_reference(sparse_mlp(x, up, down), expected, chained=True)
    with force_plan(mlp="fused_mlp"), pytest.raises(ValueError, match="block rows"):
        sparse_mlp(x, up, down)


def test_weights_that_do_not_chain_are_refused():
    from sparseblocks.ops import sparse_mlp

    up, down, _ = _mlp(32, 64, 32, 16, 16)
    x = torch.randn(2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="must take up's 48 hidden units"):
        sparse_mlp(x, random_sparse(48, 32, 16, 0.5)[0].to(DEVICE), down)
    with pytest.raises(ValueError, match="must match up"):
        sparse_mlp(x, up, down, random_sparse(48, 32, 16, 0.5)[0].to(DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("m", "k", "hidden", "block", "gated"),
    [
        (512, 768, 3072, 64, False),
        (256, 2048, 8192, 64, True),
        (4, 4096, 14336, 128, True),
        (1000, 768, 3072, 32, False),
    ],
)
def test_real_sizes_on_gpu(m, k, hidden, block, gated):
    up, down, gate = _mlp(k, hidden, k, block, block, density=0.1, gated=gated, dtype=torch.bfloat16, seed=7)
    x = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
    _check(x, up, down, gate, activation="silu" if gated else "gelu")


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("with_biases", [False, True])
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16)])
def test_one_token_mlp_both_forms(gated, with_biases, blocks):
    """One token through the whole MLP in two launches of the one-token kernel (ragged hidden and output sizes)."""
    from sparseblocks.kernels.one_token import one_token_mlp

    up, down, gate = _mlp(70, 100, 50, *blocks, gated=gated)
    x = torch.randn(1, 70, device=DEVICE)
    biases = [torch.randn(size, device=DEVICE) if with_biases else None for size in (100, 50, 100)]
    activation = "silu" if gated else "gelu"
    weights = MLPWeights(up, down, gate if gated else None, *biases[:2], biases[2] if gated else None)
    out = one_token_mlp(x, weights, activation)
    ref = reference.mlp(x.double(), _float64(weights), activation)
    assert_close_to_reference(out, ref, chained=True)
