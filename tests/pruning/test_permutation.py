"""Hidden-unit permutation of MLPs (sparseblocks.pruning.permutation) and sensitivity allocation
(sparseblocks.pruning.allocation)."""

import sys
from pathlib import Path

import pytest
import torch

from sparseblocks.integrations.sparsify import SparsityConfig
from sparseblocks.pruning.allocation import per_layer_config, sensitivity_allocation
from sparseblocks.pruning.permutation import (
    kept_saliency,
    mlp_hidden_units,
    permute_mlps,
    permute_tensor,
    search_order,
    unit_profiles,
)

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))
import distill_models  # noqa: E402

from sparseblocks.recipes.distill import _convert_linear_like  # noqa: E402


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert_mlm"])
def test_permutation_leaves_the_outputs_unchanged_and_moves_units(family, tmp_path):
    model = transformers.AutoModel.from_pretrained(distill_models.build(family, tmp_path / family)).eval()
    _convert_linear_like(model, SparsityConfig(0.5, 16, "mlp"))  # GPT-2's Conv1D as nn.Linear
    ids = torch.randint(20, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
    units = mlp_hidden_units(model)
    assert len(units) == 2  # one MLP per layer
    generator = torch.Generator().manual_seed(0)
    saliency = {name: torch.rand(model.get_submodule(name).weight.shape, generator=generator)
                for u in units for name in [*u.inputs, u.output]}  # fmt: skip
    weights = {name: model.get_submodule(name).weight.detach().clone() for name in saliency}
    orders, report = permute_mlps(model, saliency, 16, 0.5)
    with torch.no_grad():
        after = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    moved = [order for _, order in orders.values() if not torch.equal(order, torch.arange(order.numel()))]
    assert moved, "random saliency should leave some order to improve"
    for name, (units_of, order) in ((n, orders[u.output]) for u in units for n in [*u.inputs, u.output]):
        assert torch.equal(model.get_submodule(name).weight, permute_tensor(name, units_of, order, weights[name]))
    for output in orders:
        assert report.kept_after[output][0.5] >= report.kept_before[output][0.5]


def test_search_finds_a_planted_grouping():
    """Units whose saliency sits in one input block each, shuffled: the search regroups them and keeps it all."""
    block, groups, blocks = 4, 8, 8
    hidden = block * groups
    profile = torch.zeros(hidden, blocks)
    profile[torch.arange(hidden), torch.arange(hidden) // block] = 1.0  # group g's units all in block g
    shuffled = profile[torch.randperm(hidden, generator=torch.Generator().manual_seed(0))]
    sparsity = 1 - 1 / blocks  # one tile per block row kept
    identity = torch.arange(hidden) // block
    assert kept_saliency({"up": shuffled}, identity, sparsity) < 0.5
    order = search_order({"up": shuffled}, block, sparsity)
    position = torch.empty_like(order)
    position[order] = torch.arange(hidden)
    assert kept_saliency({"up": shuffled}, position // block, sparsity) == pytest.approx(1.0)


def test_profiles_sum_the_tiles_each_unit_meets():
    from sparseblocks.pruning.permutation import HiddenUnits

    up, down = torch.arange(6 * 4.0).view(6, 4), torch.arange(4 * 6.0).view(4, 6)
    profiles = unit_profiles(HiddenUnits(["up"], "down"), {"up": up, "down": down}, 2)
    torch.testing.assert_close(profiles["up"], up.view(6, 2, 2).sum(-1))
    torch.testing.assert_close(profiles["down"], down.view(2, 2, 6).sum(1).t())


def test_sensitivity_allocation_meets_the_target_and_spares_sensitive_layers():
    generator = torch.Generator().manual_seed(0)
    low, high = torch.rand(4, 8, generator=generator), 10 + torch.rand(4, 8, generator=generator)
    scores = {"sensitive": 10 + torch.rand(8, 8, generator=generator), "robust": torch.rand(8, 8, generator=generator),
              "mixed": torch.cat([low, high])}  # fmt: skip
    allocated = sensitivity_allocation(scores, 0.5)
    total = sum(allocated[name] * scores[name].numel() for name in scores)
    assert total == pytest.approx(0.5 * 192)
    assert allocated["robust"] == pytest.approx(0.75)  # the cap: halfway between the target and 1
    assert allocated["sensitive"] < allocated["mixed"] < allocated["robust"]
    assert max(allocated.values()) < 1.0
    config = per_layer_config(SparsityConfig(0.5, 16, "all-linear"), allocated)
    assert config.sparsity_of("robust") == allocated["robust"]
    with pytest.raises(ValueError, match="no entry"):
        config.sparsity_of("robust2")


def test_sensitivity_allocation_refuses_an_unreachable_target():
    scores = {"a": torch.rand(4, 4), "b": torch.rand(4, 4)}
    with pytest.raises(ValueError, match="out of reach"):
        sensitivity_allocation(scores, 0.9, max_layer_sparsity=0.9)  # floor(0.9 * 16) = 14 < 14.4 per layer
    with pytest.raises(ValueError, match="sparsity must lie"):
        sensitivity_allocation(scores, 1.0)
