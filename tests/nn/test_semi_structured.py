"""2:4 semi-structured sparsity: masks, SemiStructuredLinear, the pruner's 2:4 pattern, save/load, PyTorch's kernel."""

import copy
import logging

import pytest
import torch
from torch import nn

from conftest import relative_error
from sparseblocks import Pruner, SemiStructuredLinear, SparsityConfig, densify, load_sparse, save_sparse, sparsify
from sparseblocks.integrations.checkpoint import WEIGHTS_FILE
from sparseblocks.masks import n_of_m_mask
from sparseblocks.nn.semi_structured import pack_groups, unpack_groups
from sparseblocks.recipes.gpt import GPT, GPTConfig

logging.getLogger("sparseblocks").setLevel(logging.ERROR)


def _gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, context=16, layers=2, heads=2, width=48)).eval()


def _tokens(seed=1):
    return torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(seed))


def test_n_of_m_mask_keeps_the_largest_of_each_group():
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0, -1.0, -5.0, 0.0, 7.0]])
    assert n_of_m_mask(scores, 2, 4).tolist() == [[False, True, True, False, False, False, True, True]]
    big = n_of_m_mask(torch.randn(64, 128), 2, 4)
    assert (big.reshape(64, 32, 4).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="multiple of 4"):
        n_of_m_mask(torch.randn(4, 6), 2, 4)


def test_group_masks_pack_and_unpack():
    mask = n_of_m_mask(torch.randn(8, 32), 2, 4)
    groups = pack_groups(mask)
    assert groups.dtype == torch.uint8 and groups.shape == (8, 8)
    assert torch.equal(unpack_groups(groups), mask)


@pytest.mark.parametrize("bias", [True, False])
def test_layer_equals_the_masked_dense_linear_and_trains_only_kept_weights(bias):
    linear = nn.Linear(32, 24, bias=bias).double()
    layer = SemiStructuredLinear.from_linear(linear)
    mask = layer.mask()
    assert (mask.reshape(24, 8, 4).sum(-1) == 2).all()
    # the kept weights are the two largest |w| of each group
    assert torch.equal(mask, n_of_m_mask(linear.weight.abs(), 2, 4))
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    expected = nn.functional.linear(x, linear.weight * mask, linear.bias)
    out = layer(x)
    assert relative_error(out, expected) < 1e-12
    out.square().sum().backward()
    assert layer.values.grad.shape == (24, 16)
    assert relative_error(layer.to_linear()(x), expected) < 1e-12
    assert layer.values.numel() == linear.weight.numel() // 2


def test_layer_refuses_bad_shapes_and_masks():
    with pytest.raises(ValueError, match="divisible by 4"):
        SemiStructuredLinear.from_linear(nn.Linear(30, 8))
    with pytest.raises(ValueError, match="mask must have"):
        SemiStructuredLinear.from_linear(nn.Linear(32, 8), mask=torch.ones(8, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not keep 2 of 4"):
        SemiStructuredLinear.from_linear(nn.Linear(32, 8), mask=torch.ones(8, 32, dtype=torch.bool))


def test_sparsify_2_4_then_save_load_and_densify(tmp_path):
    model = _gpt()
    with pytest.raises(ValueError, match="sparsity must be 0.5"):
        SparsityConfig(0.9, pattern="2:4")
    report = sparsify(model, SparsityConfig(0.5, targets="mlp", pattern="2:4"))
    assert len(report.layers) == 4 and {r.density for r in report.layers} == {0.5}
    assert all(isinstance(model.get_submodule(r.name), SemiStructuredLinear) for r in report.layers)
    with torch.no_grad():
        out = model(_tokens())[0]
        assert relative_error(out, densify(copy.deepcopy(model))(_tokens())[0]) < 1e-6
    save_sparse(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(out, load_sparse(tmp_path, _gpt())(_tokens())[0])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t["blocks.0.mlp.fc.groups"].fill_(0b0111), "does not keep 2 of 4"),
        (lambda t: t.update({"blocks.0.mlp.fc.groups": t["blocks.0.mlp.fc.groups"][:, :-1].contiguous()}), "shape"),
        (lambda t: t.update({"blocks.0.mlp.fc.groups": t["blocks.0.mlp.fc.groups"].int()}), "uint8"),
        (lambda t: t.update({"blocks.0.mlp.fc.values": t["blocks.0.mlp.fc.values"].int()}), "floating"),
    ],
)  # fmt: skip
def test_corrupted_2_4_files_are_rejected(tmp_path, change, message):
    from safetensors.torch import load_file, save_file

    model = _gpt()
    sparsify(model, SparsityConfig(0.5, targets="mlp", pattern="2:4"))
    save_sparse(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_FILE)
    change(tensors)
    save_file(tensors, tmp_path / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=message):
        load_sparse(tmp_path, _gpt(), verify=False)  # the contents are validated without digests too


@pytest.mark.parametrize("method", ["magnitude", "activation_magnitude", "fisher"])
def test_pruner_reaches_2_4_in_a_training_loop_and_finalizes(method):
    model = _gpt().train()
    pruner = Pruner(model, SparsityConfig(0.5, targets="mlp", pattern="2:4"), method=method)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        tokens = _tokens(step)
        with pruner.observe_inputs():
            _, loss = model(tokens, tokens)
        loss.backward()
        pruner.observe_gradients()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
        for name, layer in pruner.layers.items():  # pruned weights stay at zero while training
            assert (layer.weight[~pruner.masks[name]] == 0).all()
            assert (pruner.masks[name].reshape(layer.out_features, -1, 4).sum(-1) == 2).all()
    masks = {name: mask.clone() for name, mask in pruner.masks.items()}
    model.eval()
    with torch.no_grad():
        before = model(_tokens())[0]
    pruner.finalize()
    for name, mask in masks.items():
        assert torch.equal(model.get_submodule(name).mask(), mask)
    with torch.no_grad():
        assert relative_error(model(_tokens())[0], before) < 1e-6


def test_pruner_refuses_2_4_with_tile_methods():
    for kwargs in ({"method": "supermask"}, {"method": "prune_grow"}, {"allocation": "global"}):
        with pytest.raises(ValueError, match="2:4"):
            Pruner(_gpt(), SparsityConfig(0.5, pattern="2:4"), **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch's 2:4 kernels need a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 7, 256])
def test_sparse_tensor_core_path_matches_the_reference(tokens):
    linear = nn.Linear(256, 128).cuda().bfloat16()
    layer = SemiStructuredLinear.from_linear(linear)
    x = torch.randn(2, tokens, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert layer._fast_path(x)
        fast = layer(x)
        reference = nn.functional.linear(x.double(), layer.weight().double(), layer.bias.double())
        assert relative_error(fast, reference) < 1e-2
        compiled = torch.compile(layer, fullgraph=True)  # the masked dense product: traceable
        assert relative_error(compiled(x), reference) < 1e-2
