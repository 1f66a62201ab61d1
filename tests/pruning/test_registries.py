"""The registries of scores, pruning strategies and layouts: what the CLI offers, clear errors for unknown names, and
a score registered from outside working through the Pruner without touching the library."""

import pytest
import torch
from torch import nn

from sparseblocks import BlockSparseLinear, SparsityConfig
from sparseblocks.cli import build_parser
from sparseblocks.integrations.layouts import LAYOUTS, sparsify_patterns
from sparseblocks.pruning.pruner import CubicSchedule, Pruner
from sparseblocks.pruning.scores import SCORES, register_score
from sparseblocks.pruning.strategies import STRATEGIES, methods, register_strategy
from sparseblocks.recipes.experiments import METHODS as EXPERIMENT_METHODS
from sparseblocks.recipes.experiments import PLANS


def _choices(*path: str, dest: str) -> tuple:
    parser = build_parser()
    for command in path:
        parser = next(a for a in parser._actions if a.dest in ("command", "recipe")).choices[command]
    return tuple(next(a for a in parser._actions if a.dest == dest).choices)


def test_the_cli_offers_exactly_the_registered_methods_and_layouts():
    assert _choices("prune", dest="method") == tuple(SCORES) == ("magnitude", "activation_magnitude", "fisher")
    assert _choices("sparsify", dest="pattern") == _choices("prune", dest="pattern") == sparsify_patterns()
    assert sparsify_patterns() == ("block", "2:4")
    assert tuple(LAYOUTS) == ("block", "2:4", "block-quantized")  # made from sparse layers: no --pattern
    assert methods() == ("magnitude", "activation_magnitude", "fisher", "prune_grow", "supermask")
    from sparseblocks.integrations.sparsify import PATTERNS
    from sparseblocks.pruning.pruner import METHODS

    assert methods() == METHODS and tuple(LAYOUTS) == PATTERNS  # the old names, following the registries
    # train gpt's methods are the experiment's: dense baselines, then plans of a registered method and layout each
    assert _choices("train", "gpt", dest="method") == EXPERIMENT_METHODS == ("dense", "dense_iso_params", *PLANS)
    assert {plan[0] for plan in PLANS.values()} == set(methods())
    assert {plan[2] for plan in PLANS.values()} == set(sparsify_patterns())


def test_unknown_names_are_refused_naming_the_known_ones():
    model = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(ValueError, match=r"method must be one of \('magnitude', .*'supermask'\), got 'rigl'"):
        Pruner(model, SparsityConfig(0.5, 16, targets="all-linear"), method="rigl")
    with pytest.raises(ValueError, match=r"pattern must be one of \('block', '2:4'\), got 'int8'"):
        SparsityConfig(0.5, pattern="int8")
    with pytest.raises(ValueError, match="registered already"):
        register_score("magnitude")(lambda name, weight, block, stats: weight)
    with pytest.raises(ValueError, match="registered already"):
        register_strategy("fisher", STRATEGIES["supermask"])
    with pytest.raises(ValueError, match="some of"):
        register_score("toy", needs=("labels",))


def test_sparsity_config_method_is_deprecated():
    with pytest.warns(DeprecationWarning, match="Pruner"):
        assert SparsityConfig(0.5, method="magnitude").method == "magnitude"
    with pytest.raises(ValueError, match="magnitude"):
        SparsityConfig(0.5, method="fisher")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SparsityConfig(0.5)


@pytest.fixture
def last_columns_score():
    """A toy score that keeps the tiles of the largest column index (unlike any magnitude ranking), and needs
    input statistics; unregistered afterwards."""
    seen = []

    @register_score("last_columns", needs=("inputs",))
    def last_columns(name, weight, block, stats):
        seen.append((name, tuple(weight.shape), block, tuple(stats.input_sq[name].shape)))
        blocks_k = -(-weight.shape[1] // block[1])
        return torch.arange(blocks_k, dtype=weight.dtype).expand(-(-weight.shape[0] // block[0]), blocks_k)

    yield seen
    del SCORES["last_columns"]


def test_a_registered_score_runs_through_the_pruner_to_a_sparse_model(last_columns_score):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    assert "last_columns" in methods()
    pruner = Pruner(model, SparsityConfig(0.5, 16, targets="all-linear"), "last_columns", CubicSchedule(1, 1))
    assert pruner.strategy.needs == ("inputs",)
    with pruner.observe_inputs():
        model(torch.randn(8, 64))
    pruner.step()  # before the schedule: nothing pruned
    assert all(mask.all() for mask in pruner.masks.values())
    pruner.step()
    assert last_columns_score == [("0", (32, 64), (16, 16), (64,)), ("2", (16, 32), (16, 16), (32,))]
    expected = torch.tensor([[False, False, True, True]] * 2)
    assert torch.equal(pruner.masks["0"], expected)
    pruner.finalize()
    assert isinstance(model[0], BlockSparseLinear) and torch.equal(model[0].matrix.block_mask(), expected)
    assert torch.equal(model[2].matrix.block_mask(), torch.tensor([[False, True]]))


def test_a_registered_score_takes_the_2_4_pattern_and_global_allocation(last_columns_score):
    model = nn.Sequential(nn.Linear(16, 8))
    pruner = Pruner(model, SparsityConfig(0.5, targets="all-linear", pattern="2:4"), "last_columns")
    with pruner.observe_inputs():
        model(torch.randn(4, 16))
    pruner.step()  # per weight: the last two of every four columns
    assert torch.equal(pruner.masks["0"], torch.tensor([False, False, True, True]).repeat(8, 4))
    global_pruner = Pruner(nn.Sequential(nn.Linear(64, 32)), SparsityConfig(0.5, 16, targets="all-linear"),
                           "last_columns", allocation="global")  # fmt: skip
    global_pruner.input_sq["0"] = torch.ones(64)
    global_pruner.step()
    assert torch.equal(global_pruner.masks["0"], torch.tensor([[False, False, True, True]] * 2))
