"""Quantized layers: BlockSparseLinear.quantize, SparsityConfig(quantize=...), the block-quantized layout in
checkpoints (scales validated, dtypes checked), the quantization-error report and the CLI's --quantize."""

import json

import pytest
import torch
from torch import nn

from conftest import zero_tensor_bytes
from sparseblocks import BlockSparseLinear, SparsityConfig, load_sparse, save_sparse, sparsify
from sparseblocks.cli import main
from sparseblocks.integrations.quantized import quantization_errors, quantize_model
from sparseblocks.nn import QuantizedBlockSparseLinear


def _layer(kind="int8"):
    dense = BlockSparseLinear(48, 40, sparsity=0.5, block_size=16)
    return dense, dense.quantize(kind, label="encoder.fc")


@pytest.mark.parametrize("kind", ["int8", "fp8", "fp8-w8a8"])
def test_quantized_layer_computes_the_dequantized_product(kind):
    dense, layer = _layer(kind)
    assert isinstance(layer, QuantizedBlockSparseLinear) and layer.quantization == kind
    assert not layer.values.requires_grad and layer.values.dtype in (torch.int8, torch.float8_e4m3fn)
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        expected = dense(x)
        out = layer(x)
    bound = 0.01 if kind == "int8" else 0.06
    assert ((out - expected).norm() / expected.norm()).item() < bound
    if kind != "fp8-w8a8":  # (the dense linear does not quantize its activations)
        assert torch.allclose(layer.to_linear()(x), out, atol=1e-5)
    assert "quantization" in repr(layer)


def test_a_backward_through_a_quantized_layer_names_it():
    _, layer = _layer()
    x = torch.randn(3, 48, requires_grad=True)
    with pytest.raises(RuntimeError, match="encoder.fc holds quantized tiles"):
        layer(x).sum().backward()
    with pytest.raises(ValueError, match="inference"):
        layer.set_pattern(layer.matrix.block_mask())
    with pytest.raises(ValueError, match="already"):
        layer.quantize("fp8")


def test_module_to_dtype_keeps_tiles_and_scales():
    _, layer = _layer("fp8")
    values, scales = layer.values.clone(), layer.scales.clone()
    layer = layer.to(torch.bfloat16)
    assert layer.values.dtype == torch.float8_e4m3fn and layer.scales.dtype == torch.float32
    assert torch.equal(layer.values.view(torch.uint8), values.view(torch.uint8)) and torch.equal(layer.scales, scales)
    assert layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(2, 48, dtype=torch.bfloat16)).dtype == torch.bfloat16


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential()
        self.mlp.fc = nn.Linear(64, 96)
        self.mlp.act = nn.GELU()
        self.mlp.proj = nn.Linear(96, 64)

    def forward(self, x):
        return self.mlp.proj(self.mlp.act(self.mlp.fc(x)))


@pytest.mark.parametrize("kind", ["int8", "fp8-w8a8"])
def test_sparsify_quantizes_and_checkpoints_reload_bitwise(tmp_path, kind):
    model = _Model()
    report = sparsify(model, SparsityConfig(0.5, 16, "mlp", quantize=kind))
    assert len(report.layers) == 2 and isinstance(model.mlp.fc, QuantizedBlockSparseLinear)
    assert model.mlp.fc.label == "mlp.fc"
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = model(x)
    save_sparse(model, tmp_path / "q")
    entry = json.loads((tmp_path / "q" / "sparseblocks.json").read_text())["layers"]["mlp.fc"]
    assert entry["pattern"] == "block-quantized" and entry["quantization"] == kind
    loaded = load_sparse(tmp_path / "q", _Model())
    assert isinstance(loaded.mlp.proj, QuantizedBlockSparseLinear) and loaded.mlp.proj.quantization == kind
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_checkpoints_with_bad_scales_or_dtypes_are_refused(tmp_path):
    model = _Model()
    sparsify(model, SparsityConfig(0.5, 16, "mlp", quantize="int8"))
    save_sparse(model, tmp_path / "q")
    zero_tensor_bytes(tmp_path / "q" / "sparseblocks.safetensors", "mlp.fc.scales")
    with pytest.raises(ValueError, match="finite and positive"):
        load_sparse(tmp_path / "q", _Model(), verify=False)
    config = tmp_path / "q" / "sparseblocks.json"
    record = json.loads(config.read_text())
    record["layers"]["mlp.fc"]["quantization"] = "fp8"  # the file holds int8 tiles: refused before any content
    config.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="fp8 tiles need torch.float8_e4m3fn values"):
        load_sparse(tmp_path / "q", _Model(), verify=False)


def test_quantize_option_checks():
    with pytest.raises(ValueError, match="quantize must be"):
        SparsityConfig(quantize="int4")
    with pytest.raises(ValueError, match="block pattern only"):
        SparsityConfig(0.5, pattern="2:4", quantize="int8")


def test_quantization_errors_report_and_quantize_model():
    model = _Model()
    sparsify(model, SparsityConfig(0.5, 16, "mlp"))
    batch = torch.randn(32, 64)
    int8 = quantization_errors(model, batch, "int8")
    fp8 = quantization_errors(model, batch, "fp8")
    assert set(int8) == {"mlp.fc", "mlp.proj"}
    assert all(0 < int8[name] < fp8[name] < 0.1 for name in int8)
    with torch.no_grad():
        before = model(batch)
    assert quantize_model(model, "int8") == ["mlp.fc", "mlp.proj"]
    with torch.no_grad():
        after = model(batch)
    assert 0 < ((after - before).norm() / before.norm()).item() < 0.02


def test_cli_sparsify_quantize_round_trips_a_hugging_face_folder(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from sparseblocks.integrations.huggingface import load_hf_sparse

    config = transformers.BertConfig(vocab_size=64, hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=80)  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "dense")
    out = tmp_path / "sparse"
    argv = ["sparsify", str(tmp_path / "dense"), "--sparsity", "0.5", "--block", "16", "--quantize", "int8"]
    assert main([*argv, "--out", str(out)]) == 0
    model = load_hf_sparse(out)
    layer = model.encoder.layer[0].intermediate.dense
    assert isinstance(layer, QuantizedBlockSparseLinear) and layer.values.dtype == torch.int8
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(64, (2, 8))).last_hidden_state).all()
