"""The small ViT and the digits data behind the Supermask experiment."""

import pytest
import torch

from sparseblocks import BlockSparseLinear, CubicSchedule, Pruner, SparsityConfig
from sparseblocks.recipes.vit import ViT, ViTConfig, accuracy, digits, train_classifier


def test_vit_classifies_images_and_its_mlps_are_the_mlp_preset():
    model = ViT(ViTConfig(layers=2, width=32, heads=2))
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    pruner = Pruner(model, SparsityConfig(0.5, 16, targets="mlp"))
    assert len(pruner.layers) == 4


def test_digits_split_is_stratified_and_a_supermask_vit_learns_it():
    pytest.importorskip("sklearn")
    train_x, train_y, test_x, test_y = digits(seed=0)
    assert train_x.shape[1:] == (1, 8, 8) and len(train_y) + len(test_y) == 1797
    assert train_x.min() >= 0.0 and train_x.max() <= 1.0
    assert torch.bincount(test_y).min() >= 40  # every class in the test split
    torch.manual_seed(0)
    model = ViT(ViTConfig(layers=1, width=32, heads=2))
    pruner = Pruner(model, SparsityConfig(0.5, 16, targets="mlp"), method="supermask", schedule=CubicSchedule(0, 20))
    train_classifier(model, train_x, train_y, epochs=6, lr=1e-2, pruner=pruner)
    pruner.finalize()
    assert all(isinstance(m, BlockSparseLinear) for m in (model.blocks[0].mlp.fc, model.blocks[0].mlp.proj))
    assert accuracy(model, test_x, test_y) > 0.5  # far above chance (0.1) after a few epochs
