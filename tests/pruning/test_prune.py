"""Pruner: block scores, the cubic schedule, allocation, and the hand-over to BlockSparseLinear."""

import copy

import pytest
import torch
from torch import nn

from conftest import relative_error
from sparseblocks import BlockSparseLinear, SparsityConfig, densify
from sparseblocks.masks import block_norms, top_blocks_mask
from sparseblocks.pruning.pruner import CubicSchedule, Pruner


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))


CONFIG = SparsityConfig(0.75, 16, targets="all-linear")


def test_cubic_schedule():
    schedule = CubicSchedule(start=10, end=30, every=5, initial=0.0)
    assert schedule.sparsity(0, 0.9) == 0.0 and schedule.sparsity(10, 0.9) == 0.0
    assert schedule.sparsity(20, 0.9) == pytest.approx(0.9 - 0.9 * 0.5**3)
    assert schedule.sparsity(30, 0.9) == schedule.sparsity(99, 0.9) == 0.9
    assert [s for s in range(40) if schedule.updates_at(s)] == [10, 15, 20, 25, 30]


def test_one_shot_magnitude_keeps_the_largest_tiles_and_hands_over_exactly():
    model = _mlp()
    expected_mask = top_blocks_mask(block_norms(model[0].weight, (16, 16)), 0.25)
    pruner = Pruner(model, CONFIG)
    pruner.step()  # no schedule: prune to the target at once
    assert torch.equal(pruner.masks["0"], expected_mask)
    assert all(s == pytest.approx(0.75) for s in pruner.sparsity().values())
    x = torch.randn(8, 64)
    with torch.no_grad():
        masked_dense = model(x)
    report = pruner.finalize()
    assert len(report.layers) == 2 and isinstance(model[0], BlockSparseLinear)
    assert torch.equal(model[0].matrix.block_mask(), expected_mask)
    with torch.no_grad():
        assert relative_error(model(x), masked_dense) < 1e-6


def test_gradual_pruning_in_a_training_loop_keeps_pruned_tiles_at_zero():
    model = _mlp()
    schedule = CubicSchedule(start=0, end=20, every=4)
    pruner = Pruner(model, CONFIG, schedule=schedule)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 64), torch.randn(32, 64)
    seen = []
    for _ in range(25):
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
        seen.append(pruner.sparsity()["0"])
        weight, mask = model[0].weight, pruner.masks["0"]
        dense_mask = mask.repeat_interleave(16, 0).repeat_interleave(16, 1)
        assert torch.count_nonzero(weight[~dense_mask]) == 0
    assert seen == sorted(seen) and seen[0] < 0.75 and seen[-1] == pytest.approx(0.75)


def test_activation_aware_scores_follow_the_input_norms():
    model = nn.Sequential(nn.Linear(64, 32))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].weight[:, :16] = 0.1  # small weights on the first input block...
    pruner = Pruner(model, SparsityConfig(0.5, 16, targets="all-linear"), method="activation_magnitude")
    with pytest.raises(RuntimeError, match="observe_inputs"):
        pruner.step()
    x = torch.randn(128, 64) * 0.01
    x[:, :16] *= 1000  # ...that see very large inputs
    with pruner.observe_inputs():
        model(x)
    pruner.update_masks()
    assert pruner.masks["0"][:, 0].all() and not pruner.masks["0"][:, 3].any()
    assert not Pruner(model, SparsityConfig(0.5, 16, targets="all-linear")).scores()["0"][:, 0].gt(10).any()


def test_fisher_scores_weigh_by_squared_gradients():
    model = nn.Sequential(nn.Linear(32, 32, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    pruner = Pruner(model, SparsityConfig(0.5, 16, targets="all-linear"), method="fisher")
    x = torch.zeros(16, 32)
    x[:, 16:] = torch.randn(16, 16)  # only the second input block gets gradient
    model(x).square().sum().backward()
    pruner.observe_gradients()
    pruner.update_masks()
    assert pruner.masks["0"][:, 1].all() and not pruner.masks["0"][:, 0].any()


def test_fisher_squares_each_batchs_gradient_before_summing():
    """Gradients g and then -g: a sum of squares, never a square of the cancelled sum."""
    model = nn.Sequential(nn.Linear(32, 32, bias=False))
    pruner = Pruner(model, SparsityConfig(0.5, 16, targets="all-linear"), method="fisher", damping=0.0)
    gradient = torch.randn(32, 32)
    for sign in (1, -1):
        model[0].weight.grad = sign * gradient
        pruner.observe_gradients()
    weight = model[0].weight.detach()
    expected = (weight.square() * gradient.square() / 2).reshape(2, 16, 2, 16).sum((1, 3))
    torch.testing.assert_close(pruner.scores()["0"], expected)


def test_balanced_allocation_keeps_each_rows_largest_tiles():
    model = _mlp()
    scores = {name: block_norms(model.get_submodule(name).weight, (16, 16)) for name in ("0", "2")}
    pruner = Pruner(model, CONFIG, balanced=True)
    pruner.step()  # zeroes the pruned tiles: the scores are taken before
    for name, score in scores.items():
        mask = pruner.masks[name]
        per_row = int(mask[0].sum())
        expected = torch.zeros_like(mask).scatter_(1, score.topk(per_row, dim=1).indices, True)
        assert torch.equal(mask, expected), name


def test_balanced_and_global_allocation():
    model = _mlp()
    pruner = Pruner(model, CONFIG, balanced=True)
    pruner.step()
    assert pruner.masks["0"].sum(1).unique().numel() == 1  # the same count in every block row
    model = _mlp()
    with torch.no_grad():
        model[2].weight.mul_(100)  # another scale: global ranking normalises it away
    pruner = Pruner(model, CONFIG, allocation="global")
    pruner.step()
    kept = sum(m.sum().item() for m in pruner.masks.values())
    total = sum(m.numel() for m in pruner.masks.values())
    assert kept == round(0.25 * total)
    assert 0 < pruner.masks["2"].sum() < pruner.masks["2"].numel()
    assert pruner.masks["0"].any(), "the layer of smaller scale lost every tile"
    with pytest.raises(ValueError, match="balanced"):
        Pruner(_mlp(), CONFIG, allocation="global", balanced=True)


def test_pruned_model_equals_densified_finalized_model():
    model = _mlp(3)
    pruner = Pruner(model, CONFIG)
    pruner.step()
    pruner.finalize()
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert relative_error(model(x), densify(copy.deepcopy(model))(x)) < 1e-6


def test_prune_and_grow_swaps_tiles_toward_the_gradient_and_resets_their_state():
    model = nn.Sequential(nn.Linear(64, 32, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.rand(32, 64) + 0.5)
        model[0].weight[:, 48:] *= 0.01  # the last input block is pruned first...
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = CubicSchedule(start=0, end=10, every=2, initial=0.5)
    config = SparsityConfig(0.5, 16, targets="all-linear")
    pruner = Pruner(model, config, method="prune_grow", schedule=schedule, regrow_fraction=0.5, optimizer=optimizer)
    pruner.step()
    assert not pruner.masks["0"][:, 3].any()
    x = torch.zeros(8, 64)
    x[:, 48:] = torch.randn(8, 16)  # ...but the loss only flows through it
    for _ in range(2):  # the second step() is the first regrowth (every=2)
        (model(x) - 1.0).square().sum().backward()
        pruner.observe_gradients()
        optimizer.step()  # moves pruned weights too (masked dense training); step() zeroes them again
        optimizer.zero_grad()
        pruner.step()
    mask = pruner.masks["0"]
    assert mask[:, 3].any(), "no tile grew where the gradient is"
    assert pruner.sparsity()["0"] == pytest.approx(0.5)
    grown = mask[:, 3].repeat_interleave(16)
    assert torch.count_nonzero(optimizer.state[model[0].weight]["exp_avg"][grown][:, 48:]) == 0
    assert torch.count_nonzero(model[0].weight[grown][:, 48:]) == 0  # grown at zero
    with pytest.raises(ValueError, match="prune_grow"):
        Pruner(model, config, method="prune_grow", allocation="global")


def test_supermask_learns_scores_ramps_sparsity_and_folds():
    from sparseblocks.nn.supermask import SupermaskLinear

    model = _mlp()
    schedule = CubicSchedule(start=0, end=10, every=1)
    pruner = Pruner(model, CONFIG, method="supermask", schedule=schedule)
    assert isinstance(model[0], SupermaskLinear)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # after the pruner: it trains the scores too
    scores_before = model[0].scores.detach().clone()
    x, y = torch.randn(32, 64), torch.randn(32, 64)
    for _ in range(12):
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
    assert not torch.equal(model[0].scores, scores_before), "no gradient reached the scores"
    assert model[0].sparsity == pytest.approx(0.75)
    with torch.no_grad():
        gated = model(x)
    mask = model[0].block_mask()
    pruner.finalize()
    assert isinstance(model[0], BlockSparseLinear) and torch.equal(model[0].matrix.block_mask(), mask)
    with torch.no_grad():
        assert relative_error(model(x), gated) < 1e-6


def test_trainer_callback_steps_the_pruner():
    pytest.importorskip("transformers")
    from sparseblocks.pruning.pruner import trainer_callback

    pruner = Pruner(_mlp(), CONFIG)
    callback = trainer_callback(pruner)
    callback.on_step_end(args=None, state=None, control=None)
    assert pruner.step_count == 1 and pruner.sparsity()["0"] == pytest.approx(0.75)


def test_state_dict_round_trip_continues_the_same_pruning():
    """A pruner restored from its state dict updates its masks exactly as the original does."""

    def setup():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        return model, Pruner(model, SparsityConfig(0.75, 16, targets="all-linear"), "fisher", CubicSchedule(0, 4, 1))

    def train(model, pruner, steps):
        for _ in range(steps):
            model(torch.randn(8, 32)).square().sum().backward()
            pruner.observe_gradients()
            model.zero_grad()
            pruner.step()

    torch.manual_seed(1)
    model, pruner = setup()
    train(model, pruner, 2)
    model2, pruner2 = setup()
    model2.load_state_dict(model.state_dict())
    pruner2.load_state_dict(pruner.state_dict())
    state = torch.get_rng_state()
    train(model, pruner, 3)
    torch.set_rng_state(state)
    train(model2, pruner2, 3)
    assert pruner2.step_count == pruner.step_count == 5
    for name in pruner.masks:
        assert torch.equal(pruner.masks[name], pruner2.masks[name])
    with pytest.raises(ValueError, match="the state prunes"):
        Pruner(nn.Sequential(nn.Linear(32, 64)), SparsityConfig(0.5, 16, targets="all-linear")).load_state_dict(
            pruner.state_dict()
        )


def test_a_layer_of_few_tiles_keeps_at_least_one():
    """Python rounds 0.5 down to 0: one tile at 50% would have been pruned whole."""
    assert top_blocks_mask(torch.randn(1, 1), 0.5).sum() == 1
    model = nn.Sequential(nn.Linear(96, 32))
    pruner = Pruner(model, SparsityConfig(0.9, 32, targets="all-linear"), balanced=True)
    pruner.step()
    assert pruner.masks["0"].sum(1).tolist() == [1]


@pytest.mark.parametrize("settings", [{"every": 0}, {"initial": 1.5}, {"start": 5, "end": 2}])
def test_a_schedule_refuses_impossible_settings(settings):
    with pytest.raises(ValueError, match="schedule|initial"):
        CubicSchedule(**settings)


def test_a_pruner_state_with_masks_of_another_shape_is_refused():
    pruner = Pruner(nn.Sequential(nn.Linear(32, 64)), SparsityConfig(0.5, 16, targets="all-linear"))
    state = pruner.state_dict()
    state["masks"] = {"0": torch.ones(2, 2, dtype=torch.bool)}
    with pytest.raises(ValueError, match="mask of 0"):
        pruner.load_state_dict(state)


def test_a_target_regex_that_does_not_compile_is_refused():
    with pytest.raises(ValueError, match="regular expression"):
        SparsityConfig(0.5, 16, targets="re:(")
