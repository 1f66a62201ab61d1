"""Quantized tiles (int8, fp8 e4m3; weight-only, and fp8 × fp8) through every inference kernel, against float64 of
the dequantized weight (``to_dense``): the row kernel by pointer and by descriptor, the one-token and few-token
decode kernels, the gated launch and the fused MLP, through the plans ``sparseblocks.dispatch`` names.

Through the interpreter on the CPU (``TRITON_INTERPRET=1``), compiled on a GPU. Small shapes, ragged edges.
"""

import pytest
import torch

from conftest import KERNEL_DEVICE, KERNEL_TEST_MARKS, assert_close_to_reference, kernel_ir, random_sparse
from sparseblocks import BlockSparseMatrix, dispatch, reference
from sparseblocks.dispatch import Plan, force_plan
from sparseblocks.format import MLPWeights, quantize_rows
from sparseblocks.ops import sparse_mlp, spmm
from sparseblocks.ops.spmm import forward_with_kernels

DEVICE = KERNEL_DEVICE
pytestmark = KERNEL_TEST_MARKS


def _float64(x, w, bias, activation):
    """act(x · Wᵀ + b) in float64 with W dequantized; x as its per-token fp8 quantization for W8A8 tiles."""
    x64 = x.double()
    if w.fp8_activations and w.block_shape[1] >= dispatch.FP8_MIN_DOT_K:  # narrower tiles: weight-only
        xq, scales = quantize_rows(x.reshape(-1, w.shape[1]))
        x64 = (xq.double() * scales.double()[:, None]).reshape(x.shape)
    y = x64 @ w.to_dense().double().t() + (0 if bias is None else bias.double())
    return reference.ACTIVATIONS[activation](y)


def _quantized(n, k, block, kind, density=0.6, seed=0):
    w, _ = random_sparse(n, k, block, density, seed=seed)
    return w.quantize(kind).to(DEVICE)


def _plans(m, fp8_activations):
    plans = [Plan.ROWS, Plan.ROWS_DESCRIPTORS]
    if fp8_activations:  # the decode kernels multiply W8A8 tiles weight-only: checked in the test below
        return plans
    return plans + ([Plan.FEW_TOKENS] if m <= dispatch.MAX_TOKENS else []) + ([Plan.ONE_TOKEN] if m == 1 else [])


# Each block size (and a rectangular one) with one of the activation dtypes, so every size and dtype is covered
# without their product; shapes ragged on both sides (N and K not multiples of the block, K a multiple of 8 so
# that descriptors can address 16-bit rows).
CASES = [(16, torch.bfloat16), (32, torch.float16), (64, torch.float32), (128, torch.bfloat16),
         ((32, 64), torch.float16), ((64, 16), torch.bfloat16)]  # fmt: skip


@pytest.mark.parametrize("kind", ["int8", "fp8", "fp8-w8a8"])
@pytest.mark.parametrize("block, dtype", CASES)
@pytest.mark.parametrize("m", [1, 5, 40])
def test_forward_every_plan_every_block(block, dtype, kind, m):
    bn, bk = (block, block) if isinstance(block, int) else block
    n, k = 2 * bn + 8, 2 * bk + (24 if bk == 16 else 16)  # ragged; W8A8 descriptors need K % 16 == 0
    w = _quantized(n, k, block, kind)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    ref = _float64(x, w, bias, "gelu")
    for plan in _plans(m, w.fp8_activations):
        if plan is Plan.ROWS_DESCRIPTORS and not dispatch.descriptors_fit(x, w, "forward"):
            # IEEE fp32 by descriptor is not allowed (dispatch.descriptors_allowed); W8A8 needs 16-byte fp8 rows
            assert dtype == torch.float32 or (w.fp8_activations and k % 16)
            continue
        with force_plan(forward=plan):
            out = forward_with_kernels(x, w, bias, "gelu")
        assert out.dtype == dtype
        assert_close_to_reference(out, ref)


def test_w8a8_products_are_fp8_on_the_row_kernel_only(caplog):
    """The row kernel quantizes x per token (its output matches the W8A8 reference, not the weight-only one); the
    decode kernels multiply weight-only and say so once."""
    w = _quantized(72, 96, 32, "fp8-w8a8")
    x = torch.randn(3, 96, device=DEVICE, dtype=torch.bfloat16)
    weight_only = BlockSparseMatrix.from_parts(w.values, w.shape, w.index_tensors(), w.scales)
    with force_plan(forward="rows"):
        rows = forward_with_kernels(x, w, None, None)
    assert_close_to_reference(rows, _float64(x, w, None, None))
    dispatch.notice_weight_only.cache_clear()
    with force_plan(forward="few_tokens"), caplog.at_level("WARNING", logger="sparseblocks"):
        few = forward_with_kernels(x, w, None, None)
    assert "weight-only" in caplog.text
    assert_close_to_reference(few, _float64(x, weight_only, None, None))
    assert not torch.equal(rows, few)  # the two modes differ: the test would see a mode silently swapped


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_empty_rows_3d_and_strided_inputs(kind):
    mask = torch.rand(5, 4, generator=torch.Generator().manual_seed(1)) < 0.6
    mask[[0, 3]] = False  # empty block rows: bias through the activation
    dense = torch.randn(70, 60, dtype=torch.float64)
    w = BlockSparseMatrix.from_dense(dense.float(), 16, mask=mask).quantize(kind).to(DEVICE)
    bias = torch.randn(70, device=DEVICE, dtype=torch.bfloat16)
    for shape in [(1, 1), (2, 3), (4, 9)]:
        big = torch.randn(*shape, 130, device=DEVICE, dtype=torch.bfloat16)
        x = big[..., 3:123:2]  # (..., 60), a strided view
        ref = _float64(x, w, bias, "relu")
        for plan in _plans(x.numel() // 60, False):
            if plan is Plan.ROWS_DESCRIPTORS:
                continue  # a strided x is no descriptor's (dispatch.addressable)
            with force_plan(forward=plan):
                out = forward_with_kernels(x, w, bias, "relu")
            assert out.shape == (*shape, 70)
            assert_close_to_reference(out, ref)


def _mlp(kind, gated, block=16, k=48, h=64, n=40):
    up = _quantized(h, k, block, kind, seed=1)
    down = _quantized(n, h, block, kind, 0.7, seed=2)
    gate = _quantized(h, k, block, kind, seed=3) if gated else None
    biases = [torch.randn(size, device=DEVICE, dtype=torch.bfloat16) for size in (h, n, h)]
    return MLPWeights(up, down, gate, biases[0], biases[1], biases[2] if gated else None)


def _mlp_float64(x, weights, activation):
    up, down, gate, up_bias, down_bias, gate_bias = weights
    if gate is None:
        hidden = _float64(x, up, up_bias, activation)
    else:  # the kernels round act(gate) and up to x's dtype before their product, as the unfused path does
        hidden = _float64(x, gate, gate_bias, activation).to(x.dtype).double()
        hidden = hidden * _float64(x, up, up_bias, None).to(x.dtype).double()
    return _float64(hidden.to(x.dtype), down, down_bias, None)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("m, plan", [(1, "one_token"), (1, "unfused"), (6, "fused_mlp"), (33, "fused_mlp"),
                                     (33, "gated_rows"), (33, "unfused")])  # fmt: skip
def test_mlps_every_plan(kind, gated, m, plan):
    if plan == "gated_rows" and not gated:
        pytest.skip("the gated launch is for gated MLPs")
    weights = _mlp(kind, gated)
    activation = "silu" if gated else "gelu"
    x = torch.randn(m, 48, device=DEVICE, dtype=torch.bfloat16)
    with force_plan(mlp=plan):
        out = sparse_mlp(x, *weights[:3], *weights[3:], activation=activation)
    assert out.dtype == torch.bfloat16
    assert_close_to_reference(out, _mlp_float64(x, weights, activation), chained=True)


def test_gated_descriptor_launch():
    from sparseblocks.kernels.spmm import gated_rows

    weights = _mlp("int8", True)
    x = torch.randn(20, 48, device=DEVICE, dtype=torch.float16)
    up, _, gate, up_bias, _, gate_bias = weights
    up_bias, gate_bias = up_bias.half(), gate_bias.half()
    expected = _float64(x, gate, gate_bias, "silu").half().double() * _float64(x, up, up_bias, None).half().double()
    for descriptors in (False, True):
        assert_close_to_reference(gated_rows(x, up, gate, up_bias, gate_bias, "silu", descriptors), expected)
    with pytest.raises(ValueError, match="both be quantized"):
        gated_rows(x, up, BlockSparseMatrix.from_dense(gate.to_dense().half(), 16), up_bias, gate_bias, "silu")


def test_a_backward_through_quantized_tiles_raises():
    w = _quantized(40, 32, 16, "int8")
    x = torch.randn(3, 32, device=DEVICE, requires_grad=True)
    y = spmm(x, w)  # the forward runs
    with pytest.raises(RuntimeError, match="quantized tiles, which are for inference"):
        y.sum().backward()
    with pytest.raises(ValueError, match="inference"):
        from sparseblocks.kernels.spmm import input_grad_rows

        input_grad_rows(torch.randn(3, 40, device=DEVICE), w)


def test_fp8_tiles_on_a_gpu_without_fp8_conversions_are_refused():
    w = _quantized(40, 32, 16, "fp8")
    with pytest.raises(ValueError, match="compute capability >= 8.9"):
        dispatch.check_quantized_tiles(w, dispatch.Device((8, 0), 108))
    dispatch.check_quantized_tiles(w, dispatch.Device((8, 9), 128))
    dispatch.check_quantized_tiles(_quantized(40, 32, 16, "int8"), dispatch.Device((8, 0), 108))


def test_w8a8_mlps_take_one_product_per_matrix():
    tiles = dispatch.Tiles((256, 128), (16, 16), 40)
    down = dispatch.Tiles((128, 256), (16, 16), 10)
    device = dispatch.Device((9, 0), 132)
    assert dispatch.mlp_plan(4096, tiles, down, None, device) is Plan.FUSED_MLP
    assert dispatch.mlp_plan(4096, tiles, down, None, device, fp8_activations=True) is Plan.UNFUSED
    tiles, narrow = dispatch.Tiles((64, 64), (32, 32), 4), dispatch.Tiles((64, 64), (32, 16), 8)
    assert dispatch.fp8_products(Plan.ROWS, tiles, device) and not dispatch.fp8_products(Plan.FEW_TOKENS, tiles, device)
    assert not dispatch.fp8_products(Plan.ROWS, tiles, dispatch.Device((8, 0), 108))
    assert not dispatch.fp8_products(Plan.ROWS, narrow, device)  # Triton's fp8 dot needs K >= 32


@pytest.mark.parametrize("quantize", ["int8", "fp8", "fp8-w8a8"])
@pytest.mark.parametrize(("kernel", "mode"), [("rows", "forward"), ("rows", "gated"), ("rows_tma", "forward"),
                                              ("rows_tma", "gated"), ("decode", "forward")])  # fmt: skip
def test_quantized_kernels_compile_for_hopper(kernel, mode, quantize):
    """Each kernel compiles for sm_90 with int8 / fp8 tiles (``tools/kernel_ir.py`` on the CPU, no GPU): the
    interpreter runs plain Python, so a branch that only the compiler visits (code after a return inside a
    constexpr ``if``, say) would fail on the GPU alone."""
    if mode == "gated" and quantize == "fp8-w8a8":
        pytest.skip("W8A8 gated launches multiply weight-only: no fp8 x in the gated mode")
    printed = kernel_ir(kernel, "--mode", mode, "--quantize", quantize, "--block", "32", "--block-m", "64")
    assert "shared memory" in printed
