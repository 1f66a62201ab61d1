"""Quantized tiles: the format (quantize, scales, validation, bytes) and the reference ops."""

import pytest
import torch

from conftest import random_sparse
from sparseblocks import BlockSparseMatrix, reference
from sparseblocks.format import QUANTIZED_LIMITS, ZERO_ROW_SCALE, quantize_rows

KINDS = ["int8", "fp8", "fp8-w8a8"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block", [16, (32, 64), 128])
def test_quantize_round_trip_within_half_a_step(kind, block):
    matrix, dense = random_sparse(200, 150, block, 0.4)  # ragged: padding rows stay zero, scale 1
    q = matrix.quantize(kind)
    assert q.quantization == kind and q.scales.shape == (matrix.nnz, q.block_shape[0])
    assert q.values.dtype == (torch.int8 if kind == "int8" else torch.float8_e4m3fn)
    restored = q.to_dense().double()
    assert restored.dtype == torch.float64 and restored.shape == dense.shape
    assert torch.equal(restored.ne(0), dense.ne(0) & restored.ne(0))  # nothing appears outside the tiles
    row_max = q.values.to(torch.float32).abs().amax(-1)
    if kind == "int8":  # symmetric, absmax -> 127: error at most half a step of each tile row
        assert row_max.max() == 127
        step = q.scales.double()[:, :, None]
        error = (q.dequantized_values().double() - matrix.values.double()).abs()
        assert bool((error <= 0.5 * step + 1e-12).all())
    else:  # e4m3: 3 mantissa bits, relative error at most 2^-4 above the subnormals
        assert row_max.max() == 448
        error = (q.dequantized_values().double() - matrix.values.double()).abs()
        bound = matrix.values.double().abs() * 2**-4 + q.scales.double()[:, :, None] * 2**-9
        assert bool((error <= bound).all())


def test_zero_tile_rows_get_scale_one_and_dequantize_to_zero():
    dense = torch.randn(64, 64)
    dense[5] = 0.0  # a dead unit
    q = BlockSparseMatrix.from_dense(dense, 16).quantize("int8")
    assert bool((q.scales[q.row_indices_of_block == 0][:, 5] == ZERO_ROW_SCALE).all())
    assert bool((q.to_dense()[5] == 0).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_quantize_refuses_nan_and_inf(bad):
    matrix, _ = random_sparse(32, 32, 16, 0.5)
    matrix.values[0, 3, 4] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        matrix.quantize("int8")


def test_quantize_refuses_unknown_kind_and_requantizing():
    matrix, _ = random_sparse(32, 32, 16, 0.5)
    with pytest.raises(ValueError, match="int8"):
        matrix.quantize("int4")
    with pytest.raises(ValueError, match="already"):
        matrix.quantize("int8").quantize("fp8")


def _rebuilt(q, **changes):
    parts = {"values": q.values, "scales": q.scales, "fp8_activations": q.fp8_activations, **changes}
    return BlockSparseMatrix(parts["values"], q.crow_indices, q.col_indices, q.shape, parts["scales"],
                             parts["fp8_activations"])  # fmt: skip


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"scales": None}, "scales of shape"),
        ({"scales": "half"}, "scales of shape"),
        ({"scales": "short"}, "scales of shape"),
        ({"scales": "nan"}, "finite and positive"),
        ({"scales": "inf"}, "finite and positive"),
        ({"scales": "zero"}, "finite and positive"),
        ({"scales": "negative"}, "finite and positive"),
        ({"fp8_activations": True}, "fp8_activations needs fp8"),
    ],
)
def test_validate_checks_scales_as_it_checks_indices(changes, message):
    q = random_sparse(48, 40, 16, 0.5)[0].quantize("int8")
    scales = q.scales.clone()
    edits = {
        "half": lambda: scales.half(),
        "short": lambda: scales[:, :-1].contiguous(),
        "nan": lambda: scales.index_fill(0, torch.tensor([0]), float("nan")),
        "inf": lambda: scales.index_fill(0, torch.tensor([0]), float("inf")),
        "zero": lambda: scales.index_fill(0, torch.tensor([1]), 0.0),
        "negative": lambda: -scales,
    }
    if isinstance(changes.get("scales"), str):
        changes = {"scales": edits[changes["scales"]]()}
    with pytest.raises(ValueError, match=message):
        _rebuilt(q, **changes)


def test_validate_refuses_scales_on_plain_tiles_and_nan_in_fp8_tiles():
    matrix, _ = random_sparse(32, 32, 16, 0.5)
    with pytest.raises(ValueError, match="scales are for quantized"):
        BlockSparseMatrix(matrix.values, matrix.crow_indices, matrix.col_indices, matrix.shape,
                          torch.ones(matrix.nnz, 16))  # fmt: skip
    q = matrix.quantize("fp8")
    values = q.values.clone()
    values.view(torch.uint8)[0, 0, 0] = 0x7F  # e4m3fn's NaN
    with pytest.raises(ValueError, match="NaN"):
        _rebuilt(q, values=values)


def test_nbytes_counts_scales_and_quantized_matrices_keep_their_dtype():
    matrix, _ = random_sparse(256, 128, 32, 0.25)
    q = matrix.quantize("int8")
    index_bytes = sum(t.numel() * t.element_size() for t in matrix.index_tensors().values())
    assert q.nbytes == matrix.nnz * 32 * 32 + matrix.nnz * 32 * 4 + index_bytes
    assert "int8" in repr(q)
    with pytest.raises(ValueError, match="keep their dtype"):
        q.to(dtype=torch.float16)
    assert q.to("cpu").scales is not None
    with pytest.raises(ValueError, match="inference"):
        q.with_pattern(q.block_mask())
    with pytest.raises(ValueError, match="quantized"):
        q.to_torch_bsr()


def test_quantize_rows_per_token():
    x = torch.randn(5, 70) * torch.tensor([1e-3, 1.0, 1e3, 0.0, 7.0])[:, None]
    x[3] = 0.0
    xq, scales = quantize_rows(x)
    assert xq.dtype == torch.float8_e4m3fn and scales.shape == (5,)
    assert scales[3] == ZERO_ROW_SCALE and bool((xq[3].float() == 0).all())
    assert torch.allclose(xq.float().abs().amax(-1)[[0, 1, 2, 4]], torch.tensor(QUANTIZED_LIMITS["fp8"]))
    restored = xq.float() * scales[:, None]
    assert bool(((restored - x).abs() <= x.abs() * 2**-4 + scales[:, None] * 2**-9).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_rows_is_the_plain_formula_bit_for_bit(dtype):
    """The four-pass version equals the plain formula (an fp32 copy, abs, amax, divide, clamp, cast), zero, NaN and
    infinite rows and empty shapes included."""
    limit = QUANTIZED_LIMITS["fp8"]

    def plain(x2):
        x = x2.float()
        row_max = x.abs().amax(-1) if x.shape[-1] else x.new_zeros(x.shape[:-1])
        scales = torch.where(row_max > 0, row_max / limit, ZERO_ROW_SCALE)
        return (x / scales[:, None]).clamp(-limit, limit).to(torch.float8_e4m3fn), scales

    x = (torch.randn(9, 300) * torch.logspace(-3, 3, 9)[:, None]).to(dtype)
    x[2], x[4, 7], x[6, 1] = 0.0, float("nan"), float("inf")
    for case in (x, x[:, ::3], x[:0], x[:, :0]):
        (xq, scales), (expected, expected_scales) = quantize_rows(case), plain(case)
        assert torch.equal(xq.view(torch.uint8), expected.view(torch.uint8))
        assert torch.equal(scales.nan_to_num(-1.0), expected_scales.nan_to_num(-1.0))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_spmm_is_the_dequantized_product(kind, dtype):
    matrix, _ = random_sparse(96, 80, 16, 0.5)
    q = matrix.quantize(kind)
    x = torch.randn(3, 7, 80).to(dtype)
    bias = torch.randn(96).to(dtype)
    y = reference.spmm(x, q, bias, "gelu")
    assert y.dtype == dtype and y.shape == (3, 7, 96)
    xs = x.double()
    if kind == "fp8-w8a8":
        xq, scales = quantize_rows(x.reshape(-1, 80))
        xs = (xq.double() * scales.double()[:, None]).reshape(x.shape)
    expected = torch.nn.functional.gelu(xs @ q.to_dense().double().t() + bias.double())
    error = ((y.double() - expected).norm() / expected.norm()).item()
    assert error < {torch.float32: 1e-6, torch.bfloat16: 5e-3, torch.float16: 1e-3}[dtype]
    # and it is close to the unquantized product: int8 within 1%, fp8 within 6% (random weights)
    plain = torch.nn.functional.gelu(x.double() @ matrix.to_dense().double().t() + bias.double())
    assert ((y.double() - plain).norm() / plain.norm()).item() < (0.01 if kind == "int8" else 0.06)
