"""The dense fp8 baseline on the CPU (PyTorch's CPU build has the row-wise scaled ``_scaled_mm`` too)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseblocks.bench.baselines import DenseFP8Linear, FP8Weight, fp8_linear, quantize_dense_fp8
from sparseblocks.format import quantize_rows
from sparseblocks.integrations.sparsify import SparsityConfig, sparsify


def _expected(x: torch.Tensor, weight: FP8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """float64 of x quantized per token (its own path: ``format.quantize_rows``) times the dequantized weight."""
    xq, x_scales = quantize_rows(x.reshape(-1, x.shape[-1]))
    x64 = xq.double() * x_scales.double()[:, None]
    w64 = weight.values.double() * weight.scales.double()[:, None]
    y = x64 @ w64.T + (0.0 if bias is None else bias.double())
    return y.reshape(*x.shape[:-1], -1)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> bool:
    """Each element within ``rtol`` of itself and of its token's largest output (the output's rounding)."""
    return bool(((actual - expected).abs() <= rtol * (expected.abs() + expected.abs().amax(-1, keepdim=True))).all())


def test_weights_are_quantized_per_output_channel():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 32)[:, None]
    w[5] = 0.0
    q = FP8Weight.quantize(w)
    assert (q.values.dtype, q.scales.dtype, q.shape, q.scales.shape) == (torch.float8_e4m3fn, torch.float32, w.shape,
                                                                        (32,))  # fmt: skip
    expected_scales = w.abs().amax(1) / 448
    expected_scales[5] = 1.0  # a row of zeros: scale 1, values 0
    torch.testing.assert_close(q.scales, expected_scales, rtol=1e-6, atol=0.0)
    dequantized = q.values.double() * q.scales.double()[:, None]
    # e4m3 keeps 3 mantissa bits: at most 2^-4 relative error per element where it is normal; per row in norm, less
    row_error = (dequantized - w.double()).norm(dim=1) / w.double().norm(dim=1).clamp_min(1e-300)
    assert row_error.max() < 2**-4 and not dequantized[5].any()
    assert q.nbytes == 32 * 64 + 4 * 32
    with pytest.raises(ValueError, match="multiples of 16"):
        FP8Weight.quantize(torch.randn(40, 64))


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-5), (torch.bfloat16, 2**-8)])
def test_fp8_linear_is_the_product_of_the_quantized_operands(dtype, rtol):
    """The same arithmetic as the float64 reference: only the output's rounding differs (fp32 or bf16)."""
    generator = torch.Generator().manual_seed(1)
    weight = FP8Weight.quantize(torch.randn(48, 96, generator=generator))
    x = torch.randn(2, 3, 96, generator=generator) * torch.logspace(-2, 2, 3)[:, None]  # tokens 10^4 apart
    x[1, 2] = 0.0  # a token of zeros: its output is the bias
    x, bias = x.to(dtype), torch.randn(48, generator=generator).to(dtype)
    y = fp8_linear(x, weight, bias)
    assert y.shape == (2, 3, 48) and y.dtype == dtype
    expected = _expected(x, weight, bias)
    assert _close(y.double(), expected, rtol)
    torch.testing.assert_close(y[1, 2], bias, rtol=0.0, atol=0.0)
    # quantizing the whole x with one scale instead of each token would miss by far more than the tolerance
    scale = x.abs().max().double() / 448
    x_per_tensor = (x.double() / scale).to(torch.float8_e4m3fn).double() * scale
    w64 = weight.values.double() * weight.scales.double()[:, None]
    assert not _close(x_per_tensor @ w64.T + bias, expected, rtol)
    torch.testing.assert_close(fp8_linear(x, weight, bias, "silu"), F.silu(y), rtol=0.0, atol=0.0)


def test_dense_fp8_linear_from_linear():
    linear = nn.Linear(64, 32)
    layer = DenseFP8Linear.from_linear(linear)
    assert (layer.in_features, layer.out_features, layer.weight.dtype) == (64, 32, torch.float8_e4m3fn)
    assert {name for name, _ in layer.named_buffers()} == {"weight", "weight_scale", "bias"}
    x = torch.randn(5, 7, 64)
    with torch.no_grad():
        expected = _expected(x, FP8Weight.quantize(linear.weight), linear.bias)
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-6)
        # and what it stands in for, up to fp8's rounding of x and W
        assert (layer(x) - linear(x)).norm() / linear(x).norm() < 0.1
    assert DenseFP8Linear.from_linear(nn.Linear(64, 32, bias=False)).bias is None


@pytest.mark.parametrize("targets", ["mlp", "mlp+attention", "all-linear"])
def test_e2e_quantizes_exactly_the_linears_its_sparse_models_replace(targets):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparseblocks.bench import e2e

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=100)  # fmt: skip
    dense = LlamaForCausalLM(config).eval()
    report = sparsify(copy.deepcopy(dense), SparsityConfig(0.75, 16, targets=targets.split("+")))  # as sparse_models
    replaced = {layer.name for layer in report.layers}
    fp8 = e2e.dense_fp8_model(dense, targets)
    swapped = {name for name, module in fp8.named_modules() if isinstance(module, DenseFP8Linear)}
    assert swapped == replaced and len(swapped) == {"mlp": 6, "mlp+attention": 14, "all-linear": 14}[targets]
    assert isinstance(fp8.lm_head, nn.Linear)  # the head stays as pruning leaves it: dense
    assert e2e.nbytes(fp8) < e2e.nbytes(dense)
    ids = torch.randint(100, (2, 9))
    with torch.no_grad():
        logits, reference = fp8(ids).logits, dense(ids).logits
    assert (logits - reference).norm() / reference.norm() < 0.1


def test_the_swap_honours_exclusions_and_returns_what_it_replaced():
    model = nn.Sequential()
    model.add_module("mlp", nn.Sequential())
    model.mlp.add_module("fc1", nn.Linear(32, 64))
    model.mlp.add_module("fc2", nn.Linear(64, 32))
    names = quantize_dense_fp8(model, SparsityConfig(targets="mlp", exclude="*.fc2"))
    assert names == ["mlp.fc1"]
    assert isinstance(model.mlp.fc1, DenseFP8Linear) and type(model.mlp.fc2) is nn.Linear
