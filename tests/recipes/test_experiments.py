"""The tinyshakespeare pruning experiment, at toy size on the CPU: every method runs and hands over a sparse model."""

import math

import pytest

from sparseblocks.recipes.experiments import METHODS, Experiment, grid, run
from sparseblocks.recipes.gpt import CharData

TOY = Experiment(layers=1, heads=2, width=32, context=16, batch_size=4, steps=12, eval_batches=2,
                 regrow_every=3, calibration_batches=1)  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 30)
    return CharData(path)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_reports(method, data):
    row = run(method, 0.5, 16, data, TOY)
    assert row["method"] == method and math.isfinite(row["val_loss"]) and row["steps"] == 12
    dense_weights = 2 * 32 * 128
    if method == "dense":
        assert row["mlp_weights"] == dense_weights
    else:  # iso-parameter dense or a sparse model: about half the MLP weights (whole tiles, or 2 of 4)
        assert row["mlp_weights"] == pytest.approx(dense_weights / 2, rel=0.05)


def test_grid_has_every_method_and_the_extra_blocks():
    runs = grid((0.5, 0.9), (32,), extra_blocks=(16, 64))
    assert runs[0] == ("dense", 0.0, None)
    assert len(runs) == 1 + 2 * (1 + 6) + 2 * 6 + 2
    assert ("fisher", 0.9, 64) in runs and ("fisher", 0.5, 64) not in runs
    assert ("magnitude_2_4", 0.5, None) in runs and ("magnitude_2_4", 0.9, None) not in runs
