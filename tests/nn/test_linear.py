import pytest
import torch
from torch import nn

from conftest import random_sparse
from sparseblocks import BlockSparseLinear, BlockSparseMatrix


def test_from_linear_matches_masked_dense():
    linear = nn.Linear(130, 100).double()
    layer = BlockSparseLinear.from_linear(linear, sparsity=0.75, block_size=32)
    mask = layer.matrix.block_mask()
    assert mask.sum() == round(0.25 * mask.numel())
    dense = linear.weight * mask.repeat_interleave(32, 0).repeat_interleave(32, 1)[:100, :130]
    x = torch.randn(7, 130, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ dense.t() + linear.bias)
    torch.testing.assert_close(layer.to_linear()(x), layer(x))
    assert "block=(32, 32), density=0.250" in repr(layer)


def test_direct_constructor_is_trainable():
    layer = BlockSparseLinear(96, 64, sparsity=0.5, block_size=(16, 32), bias=True)
    assert layer.matrix.nnz == 6 and layer.values.shape == (6, 16, 32)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    x, target = torch.randn(32, 96), torch.randn(32, 64)
    losses = []
    for _ in range(20):
        loss = (layer(x) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert [name for name, _ in layer.named_parameters()] == ["values", "bias"]


def test_gradcheck_through_module():
    layer = BlockSparseLinear(40, 24, sparsity=0.5, block_size=16).double()
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_state_dict_round_trip_is_exact_even_with_another_pattern():
    source = BlockSparseLinear.from_linear(nn.Linear(70, 100), sparsity=0.3, block_size=16)
    target = BlockSparseLinear(70, 100, sparsity=0.9, block_size=16)
    state = source.state_dict()
    assert sorted(state) == ["bias", "col_indices", "crow_indices", "values"]
    target.load_state_dict(state)
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor)
    x = torch.randn(5, 70)
    assert torch.equal(target(x), source(x))
    assert torch.equal(target.transpose_perm, source.transpose_perm)


def test_an_optimizer_built_before_loading_another_pattern_keeps_training_the_layer():
    """The usual resume order: model, optimizer, then ``load_state_dict`` with another tile count."""
    source = BlockSparseLinear(64, 48, sparsity=0.25, block_size=16)
    target = BlockSparseLinear(64, 48, sparsity=0.75, block_size=16)
    optimizer = torch.optim.SGD(target.parameters(), lr=0.1)
    target.load_state_dict(source.state_dict())
    assert target.values.shape == source.values.shape
    target(torch.randn(5, 64)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(target.values, source.values), "the step did not reach the loaded values"
    assert optimizer.param_groups[0]["params"][0] is target.values


def test_loading_a_corrupt_state_dict_fails_clearly():
    layer = BlockSparseLinear(64, 64, sparsity=0.5, block_size=32)
    state = layer.state_dict()
    state["col_indices"] = state["col_indices"] + 7
    with pytest.raises(ValueError, match="col_indices must lie in"):
        layer.load_state_dict(state)
    state = layer.state_dict()
    state["crow_indices"] = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="crow_indices must have 3"):
        layer.load_state_dict(state)


def test_a_partial_state_dict_is_validated_and_refused_whole():
    layer = BlockSparseLinear(64, 64, sparsity=0.5, block_size=16)
    before = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    with pytest.raises(ValueError, match="col_indices must lie in"):
        layer.load_state_dict({"col_indices": torch.full_like(layer.col_indices, 99)}, strict=False)
    assert all(torch.equal(layer.state_dict()[name], tensor) for name, tensor in before.items())


def test_a_partial_state_dict_recomputes_the_derived_indices():
    """Another pattern with the same row pointers, by its column indices alone: the transposed index follows."""
    diagonal, anti = torch.eye(2, dtype=torch.bool), torch.eye(2, dtype=torch.bool).flip(1)
    layer = BlockSparseLinear.from_linear(nn.Linear(32, 32), block_size=16, mask=diagonal)
    target = BlockSparseMatrix.from_dense(torch.randn(32, 32), 16, mask=anti)
    layer.load_state_dict({"col_indices": target.col_indices}, strict=False)
    for name, index in target.index_tensors().items():
        assert torch.equal(getattr(layer, name), index), name


def test_assigned_state_dict_keeps_values_contiguous_and_indices_together():
    source = BlockSparseLinear(64, 48, sparsity=0.5, block_size=16)
    state = source.state_dict()
    state["values"] = state["values"].transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    target = BlockSparseLinear(64, 48, sparsity=0.5, block_size=16).to("meta")
    target.load_state_dict(state, assign=True)
    assert target.values.is_contiguous()
    assert all(index.device == target.values.device for index in target.matrix.index_tensors().values())
    x = torch.randn(3, 64)
    assert torch.equal(target(x), source(x))


def test_layers_made_from_one_matrix_do_not_share_buffers():
    matrix, _ = random_sparse(48, 32, 16, 0.5)
    first, second = BlockSparseLinear.from_matrix(matrix), BlockSparseLinear.from_matrix(matrix)
    assert first.crow_indices.data_ptr() != second.crow_indices.data_ptr()


def test_from_matrix_and_bad_input():
    matrix, _ = random_sparse(48, 32, 16, 0.5)
    layer = BlockSparseLinear.from_matrix(matrix, torch.zeros(48))
    assert layer.in_features == 32 and layer.out_features == 48
    with pytest.raises(ValueError, match=r"\(48,\)"):
        BlockSparseLinear.from_matrix(matrix, torch.zeros(47))
    with pytest.raises(TypeError, match="nn.Linear"):
        BlockSparseLinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="block_size"):
        BlockSparseLinear(32, 32, block_size=8)
    with pytest.raises(ValueError, match="K=32"):
        layer(torch.randn(2, 33))


def test_module_moves_and_casts_like_linear():
    layer = BlockSparseLinear(64, 32, sparsity=0.5, block_size=16).to(torch.bfloat16)
    assert layer.values.dtype == torch.bfloat16 and layer.crow_indices.dtype == torch.int32
    assert isinstance(layer.matrix, BlockSparseMatrix)
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_module_compiles_fullgraph():
    layer = BlockSparseLinear(64, 48, sparsity=0.5, block_size=16)
    x = torch.randn(4, 64)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
