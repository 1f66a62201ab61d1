"""Layer-wise reconstruction of the kept weights (``sparseblocks.pruning.reconstruct``) against hand-built cases."""

import pytest
import torch
from torch import nn

from sparseblocks.masks import expand_block_mask, random_block_mask
from sparseblocks.pruning.reconstruct import fit_block_rows, reconstruct


def _output_error(x, fitted, dense):
    return ((x @ fitted.T - x @ dense.T).norm() / (x @ dense.T).norm()).item()


def test_a_full_mask_gives_back_the_dense_weight():
    x, w = torch.randn(200, 12, dtype=torch.float64), torch.randn(6, 12, dtype=torch.float64)
    fitted = fit_block_rows(x.T @ x, w, torch.ones(2, 3, dtype=torch.bool), (3, 4), damping=1e-10)
    torch.testing.assert_close(fitted, w)


def test_pruned_columns_that_the_kept_ones_span_are_absorbed_exactly():
    """Inputs 4..7 are linear combinations of inputs 0..3: with those kept, the outputs can be matched exactly."""
    z, mix = torch.randn(300, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    x = torch.cat([z, z @ mix], dim=1)
    w = torch.randn(6, 8, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, False]] * 3)  # blocks of (2, 2): columns 0..3 kept in every row
    fitted = fit_block_rows(x.T @ x, w, mask, (2, 2), damping=1e-12)
    assert _output_error(x, fitted, w) < 1e-6
    assert fitted[:, 4:].abs().max() == 0
    assert _output_error(x, w * expand_block_mask(mask, (2, 2), w.shape), w) > 0.3  # plain masking is far off


def test_refit_beats_masking_and_keeps_the_pattern_on_ragged_shapes():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 10, generator=generator, dtype=torch.float64) @ torch.randn(10, 10, generator=generator,
                                                                                       dtype=torch.float64)  # fmt: skip
    w = torch.randn(7, 10, generator=generator, dtype=torch.float64)
    mask = random_block_mask((3, 4), 0.5, generator)  # blocks of 3 over 7 x 10: ragged last row and column
    kept = expand_block_mask(mask, (3, 3), w.shape)
    fitted = fit_block_rows(x.T @ x, w, mask, (3, 3), damping=1e-8)
    assert torch.all(fitted[~kept] == 0)
    assert _output_error(x, fitted, w) < _output_error(x, w * kept, w)


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_model_layers_are_refit_in_order_on_their_sparse_inputs():
    torch.manual_seed(0)
    model = TwoLinears()
    dense = TwoLinears()
    dense.load_state_dict(model.state_dict())
    data = torch.randn(256, 4) @ torch.randn(4, 16)  # low-rank inputs: room for the refit to help
    masks = {"first": random_block_mask((4, 4), 0.5), "second": random_block_mask((2, 8), 0.5)}
    masked = TwoLinears()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, mask in masks.items():
            layer = masked.get_submodule(name)
            layer.weight.mul_(expand_block_mask(mask, (8, 4), layer.weight.shape))
    errors = reconstruct(model, masks, (8, 4), lambda: model(data))
    assert list(errors) == ["first", "second"] and all(0 <= e < 1 for e in errors.values())
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert torch.all(weight[~expand_block_mask(mask, (8, 4), weight.shape)] == 0)
    with torch.no_grad():
        target = dense(data)
        assert (model(data) - target).norm() < 0.5 * (masked(data) - target).norm()


def test_unknown_layer_names_are_refused():
    with pytest.raises(ValueError, match="no linear named"):
        reconstruct(TwoLinears(), {"third": torch.ones(1, 1, dtype=torch.bool)}, (8, 4), lambda: None)
