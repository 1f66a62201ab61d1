"""Layouts: a layout registered from outside works through sparsify, the Pruner, save_sparse, load_sparse and
densify; the checkpoint entries of the built-in layouts keep their format."""

import json

import pytest
import torch
from torch import nn

from sparseblocks import Pruner, SparsityConfig, densify, load_sparse, save_sparse, sparsify
from sparseblocks.integrations.checkpoint import CONFIG_FILE
from sparseblocks.integrations.layouts import LAYOUTS, Layout, register_layout
from sparseblocks.integrations.sparsify import sparse_layers
from sparseblocks.masks import top_blocks_mask


class KeptLinear(nn.Module):
    """A toy sparse layer: the dense weight ``values`` ``(N, K)`` with zeros where pruned."""

    def __init__(self, values: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = values.shape
        self.values = nn.Parameter(values.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x):
        return nn.functional.linear(x, self.values, self.bias)

    def to_linear(self):
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.values)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


class KeptLayout(Layout):
    """Per-weight masks at any density; the checkpoint records how many weights are kept and checks it."""

    name, module = "kept", KeptLinear
    integer_fields = ("kept",)

    def mask_block(self, block_size):
        return (1, 1)

    def select(self, scores, keep):
        return top_blocks_mask(scores, keep)

    def from_linear(self, linear, sparsity, block_size, mask):
        weight = linear.weight.detach()
        mask = top_blocks_mask(weight.abs(), 1.0 - sparsity) if mask is None else mask
        return KeptLinear(weight * mask, linear.bias)

    def describe(self, layer):
        return (1, 1), layer.values.count_nonzero().item() / layer.values.numel()

    def config_entry(self, layer):
        return {"kept": layer.values.count_nonzero().item()}

    def tensor_shapes(self, entry):
        return {"values": (entry["out_features"], entry["in_features"])}

    def load(self, entry, tensors, bias):
        if tensors["values"].count_nonzero().item() > entry["kept"]:
            raise ValueError(f"more than the {entry['kept']} kept weights are nonzero")
        return KeptLinear(tensors["values"], bias)


@pytest.fixture
def kept_layout():
    yield register_layout(KeptLayout())
    del LAYOUTS["kept"]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16))


def test_a_registered_layout_sparsifies_saves_loads_and_densifies(kept_layout, tmp_path):
    model, x = _mlp(), torch.randn(4, 32)
    report = sparsify(model, SparsityConfig(0.75, targets="all-linear", pattern="kept"))
    assert [type(m) for m in sparse_layers(model).values()] == [KeptLinear, KeptLinear]
    assert [r.density for r in report.layers] == [0.25, 0.25]
    with torch.no_grad():
        expected = model(x)
    save_sparse(model, tmp_path)
    entry = json.loads((tmp_path / CONFIG_FILE).read_text())["layers"]["0"]
    assert entry == {"out_features": 48, "in_features": 32, "pattern": "kept", "kept": 384, "dtype": "float32",
                     "bias": True}  # fmt: skip
    loaded = load_sparse(tmp_path, _mlp(seed=1))
    assert isinstance(loaded[2], KeptLinear)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
        assert torch.equal(densify(loaded)(x), expected)
    assert isinstance(loaded[0], nn.Linear)

    entry["kept"] = 10  # the file holds more nonzero weights than its entry says: the layout refuses it
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config["layers"]["0"] = entry
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layer '0': more than the 10 kept weights"):
        load_sparse(tmp_path, _mlp())
    config["layers"]["0"]["kept"] = -1
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"needs non-negative integers \('out_features', 'in_features', 'kept'\)"):
        load_sparse(tmp_path, _mlp())


def test_the_pruner_prunes_into_a_registered_layout(kept_layout):
    model = _mlp()
    pruner = Pruner(model, SparsityConfig(0.5, targets="all-linear", pattern="kept"), method="magnitude")
    assert pruner.block == (1, 1)
    pruner.step()
    mask = pruner.masks["0"].clone()
    assert mask.shape == (48, 32) and mask.sum() == 48 * 16
    pruner.finalize()
    assert isinstance(model[0], KeptLinear) and torch.equal(model[0].values != 0, mask)


def test_unknown_patterns_in_a_checkpoint_are_refused(tmp_path):
    model = _mlp()
    sparsify(model, SparsityConfig(0.5, 16, targets="all-linear"))
    save_sparse(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert "pattern" not in config["layers"]["0"]  # block entries name no pattern, as before 2:4 existed
    for pattern in ("kept", ["block"]):
        config["layers"]["0"]["pattern"] = pattern
        (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
        expected = r"layer '0' needs a mapping with a pattern of \('block', '2:4', 'block-quantized'\)"
        with pytest.raises(ValueError, match=expected):
            load_sparse(tmp_path, _mlp())
