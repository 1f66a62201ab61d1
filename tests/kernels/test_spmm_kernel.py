"""The Triton forward kernel against the float64 reference.

On the CPU it runs through Triton's interpreter (``TRITON_INTERPRET=1``, as ``make test`` sets) on small shapes;
on a GPU the same cases run compiled, plus the ``gpu``-marked real sizes.
"""

import pytest
import torch

from conftest import (
    KERNEL_DEVICE,
    KERNEL_TEST_MARKS,
    TOLERANCE,
    assert_close_to_reference,
    random_sparse,
    relative_error,
)
from sparseblocks import BlockSparseMatrix, dispatch, reference
from sparseblocks.backend import triton_interpreting
from sparseblocks.dispatch import MAX_TOKENS, Plan, force_plan
from sparseblocks.kernels.row_launch import RowLaunch, RowMode
from sparseblocks.masks import skewed_block_mask
from sparseblocks.ops.spmm import forward_with_kernels

DEVICE = KERNEL_DEVICE
pytestmark = KERNEL_TEST_MARKS


ROW_KERNEL_CONFIG = {"BLOCK_M": 16, "num_warps": 4, "num_stages": 2}


def run_kernel(x, w, bias=None, activation=None, config=None, descriptors=False):
    """The row kernel (pointer loads unless ``descriptors``)."""
    from sparseblocks.kernels.spmm import spmm_rows

    return spmm_rows(x, w, bias, activation, descriptors, config)


def forward_plans(x, w):
    """Every plan of the forward that can take x: the row kernel always (by descriptor where the inputs allow it),
    the few-token kernel up to MAX_TOKENS rows, the one-token kernel for one."""
    x2 = x.reshape(-1, w.shape[1])
    m = x2.shape[0]
    plans = [Plan.ROWS] + ([Plan.ROWS_DESCRIPTORS] if dispatch.descriptors_fit(x2, w, "forward") else [])
    return plans + ([Plan.FEW_TOKENS] if 1 <= m <= MAX_TOKENS else []) + ([Plan.ONE_TOKEN] if m == 1 else [])


def check(x, w, bias=None, activation=None):
    """Every kernel that can take x matches float64, and the row kernel in a fixed config too."""
    ref = reference.spmm(x.double(), w.to(dtype=torch.float64), None if bias is None else bias.double(), activation)
    for plan in forward_plans(x, w):
        with force_plan(forward=plan):
            check_output(forward_with_kernels(x, w, bias, activation), ref, x.dtype)
    check_output(run_kernel(x, w, bias, activation, ROW_KERNEL_CONFIG), ref, x.dtype)


def check_output(out, ref, dtype):
    assert out.dtype == dtype
    assert_close_to_reference(out, ref)


@pytest.mark.parametrize("block", [16, 32, 64, 128, (16, 128), (64, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_block_and_dtype_with_ragged_edges(block, dtype):
    w, _ = random_sparse(150, 140, block, 0.5, dtype=dtype, seed=1)
    w = w.to(DEVICE)
    x = torch.randn(37, 140, device=DEVICE).to(dtype)
    bias = torch.randn(150, device=DEVICE).to(dtype)
    check(x, w, bias)


@pytest.mark.parametrize("descriptors", [True, False])
@pytest.mark.parametrize("block", [16, 64, 128, (16, 128), (64, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_row_kernel_with_and_without_descriptors(block, dtype, descriptors):
    """Widths of whole 16-byte rows (TMA's rule) that still end in part-tiles, 152 × 136: the forward, the
    activation gradient and the input gradient, through tensor descriptors and through pointer loads (fp32
    always takes the pointers)."""
    from sparseblocks.kernels.spmm import launch_rows

    w, dense = random_sparse(152, 136, block, 0.5, dtype=dtype, seed=3)
    w = w.to(DEVICE)
    x, bias = torch.randn(37, 136, device=DEVICE).to(dtype), torch.randn(152, device=DEVICE).to(dtype)
    grad_out = torch.randn(37, 152, device=DEVICE).to(dtype)
    assert dispatch.descriptors_fit(x, w, "activation_grad", grad_out)
    assert dispatch.descriptors_fit(grad_out, w, "input_grad")
    assert not dispatch.descriptors_fit(x.float(), w, "forward")
    run = lambda x2, spec: launch_rows(x2, w, spec, descriptors, ROW_KERNEL_CONFIG)
    w64, bias64 = w.to(dtype=torch.float64), bias.double()
    out, no_sums = run(x, RowLaunch(RowMode.FORWARD, bias, "gelu"))
    check_output(out, reference.spmm(x.double(), w64, bias64, "gelu"), dtype)
    activation_grad = reference.spmm_activation_grad(grad_out.double(), x.double(), w64, bias64, "silu")
    dz, column_sums = run(x, RowLaunch(RowMode.ACTIVATION_GRAD, bias, "silu", grad_out, bias_grad=True))
    check_output(dz, activation_grad, dtype)
    check_output(column_sums, activation_grad.sum(0), torch.float32)  # from the fp32 tiles, before rounding
    check_output(run(grad_out, RowLaunch(RowMode.INPUT_GRAD))[0], grad_out.double() @ dense.to(DEVICE), dtype)
    assert no_sums is None
    with pytest.raises(ValueError, match="activation- or hidden-gradient mode"):
        RowLaunch(RowMode.FORWARD, bias, "gelu", bias_grad=True).check()


def test_inputs_the_copy_engine_cannot_address_take_the_pointer_kernel():
    """Misaligned bases and odd widths fall back to pointer loads (a descriptor would refuse them)."""
    w, _ = random_sparse(64, 96, 32, 0.5, dtype=torch.float16, seed=5)
    w = w.to(DEVICE)
    storage = torch.empty(w.values.numel() + 1, device=DEVICE, dtype=torch.float16)[1:]  # 2 bytes off
    shifted = BlockSparseMatrix.from_parts(storage.view_as(w.values).copy_(w.values), w.shape, w.index_tensors())
    x = torch.randn(21, 97, device=DEVICE, dtype=torch.float16)
    fits = lambda x2, w: dispatch.descriptors_fit(x2, w, "forward")
    assert not fits(x[:, 1:], w) and not fits(x[:, :96], shifted)
    assert fits(x[:, :96].contiguous(), w)
    with force_plan(forward="rows_descriptors"), pytest.raises(ValueError, match="alignment"):
        forward_with_kernels(x[:, 1:], w, None, None)
    check(x[:, 1:], shifted)
    check(x[:, :96], w)


@pytest.mark.skipif(not triton_interpreting(), reason="drives the autotuner with made-up timings")
@pytest.mark.parametrize("winner", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])  # the descriptor kernel, the pointer kernel
def test_tuned_launch_whichever_m_tile_wins(monkeypatch, winner, dtype):
    """The autotuned path (no fixed config): each candidate's descriptor boxes follow its BLOCK_M (the pre-hook),
    the output is right whichever M tile the timings pick, and later calls run the remembered config without
    tuning again (their boxes set by the same pre-hook)."""
    from sparseblocks.kernels import spmm as kernels
    from sparseblocks.kernels import spmm_tma

    descriptors = dtype == torch.float16
    tuned = spmm_tma.spmm_tma_tuned if descriptors else kernels.spmm_tuned
    candidates = [next(c for c in tuned.configs if c.kwargs["BLOCK_M"] == block_m) for block_m in (64, 128)]
    timings = iter([1.0 if c.kwargs["BLOCK_M"] == winner else 2.0 for c in candidates] * 2)  # forward, then dZ
    monkeypatch.setattr(tuned.autotuner, "configs", candidates)
    monkeypatch.setattr(tuned.autotuner, "cache", {})
    monkeypatch.setattr(tuned.autotuner, "cache_results", False)  # no tuning results from disk
    monkeypatch.setattr(tuned, "_chosen", {})
    # do_bench is a cached property: replace the cached value itself (reading it would look for a GPU)
    monkeypatch.setitem(tuned.autotuner.__dict__, "do_bench", lambda call, quantiles: (call(), [next(timings)] * 3)[1])
    monkeypatch.setattr(kernels, "launch_config", lambda config: config)
    w, _ = random_sparse(96, 64, 32, 0.6, dtype=dtype, seed=9)
    x, bias, grad_out = torch.randn(70, 64).to(dtype), torch.randn(96).to(dtype), torch.randn(70, 96).to(dtype)
    expected = reference.spmm(x.double(), w.to(dtype=torch.float64), bias.double(), "relu")
    dz = reference.spmm_activation_grad(grad_out.double(), x.double(), w.to(dtype=torch.float64), bias.double(), "silu")
    for _ in range(2):  # tuned, then remembered (the timings would run out if it tuned again)
        check_output(kernels.spmm_rows(x, w, bias, "relu", descriptors), expected, dtype)
        # the bias gradient's parts: one row per winning M tile, summed (the buffer is sized for the smallest)
        _, column_sums = kernels.activation_grad_rows(grad_out, x, w, bias, "silu", True, descriptors)
        check_output(column_sums, dz.sum(0), torch.float32)
    assert {config.kwargs["BLOCK_M"] for config, _ in tuned._chosen.values()} == {winner}
    assert len(tuned._chosen) == 2  # the forward and the activation gradient


@pytest.mark.skipif(not triton_interpreting(), reason="pretends a CUDA-graph capture around the tuned launch")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])  # the descriptor kernel, the pointer kernel
def test_a_first_launch_inside_a_graph_capture_runs_the_first_config_untuned(monkeypatch, dtype):
    """Tuning would time the configs and synchronize inside the capture: the first config runs instead, nothing is
    remembered, and the first launch outside a capture tunes."""
    from sparseblocks.kernels import spmm as kernels
    from sparseblocks.kernels import spmm_tma, tuning

    descriptors = dtype == torch.float16
    tuned = spmm_tma.spmm_tma_tuned if descriptors else kernels.spmm_tuned
    monkeypatch.setattr(tuned, "_chosen", {})
    monkeypatch.setattr(tuned.autotuner, "cache", {})
    monkeypatch.setattr(tuned.autotuner, "cache_results", False)
    monkeypatch.setattr(kernels, "launch_config", lambda config: config)
    monkeypatch.setattr(tuning, "stream_capturing", lambda: True)
    monkeypatch.setitem(tuned.autotuner.__dict__, "do_bench", lambda call, quantiles: pytest.fail("tuned"))
    w, _ = random_sparse(96, 64, 32, 0.6, dtype=dtype, seed=9)
    x = torch.randn(70, 64).to(dtype)
    expected = reference.spmm(x.double(), w.to(dtype=torch.float64), None, "relu")
    check_output(kernels.spmm_rows(x, w, None, "relu", descriptors), expected, dtype)
    assert tuned._chosen == {}
    monkeypatch.setattr(tuning, "stream_capturing", lambda: False)
    monkeypatch.setitem(tuned.autotuner.__dict__, "do_bench", lambda call, quantiles: (call(), [1.0] * 3)[1])
    check_output(kernels.spmm_rows(x, w, None, "relu", descriptors), expected, dtype)
    assert len(tuned._chosen) == 1


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
def test_fused_activations(activation):
    w, _ = random_sparse(64, 96, 32, 0.5, seed=2)
    x = torch.randn(20, 96)
    check(x.to(DEVICE), w.to(DEVICE), torch.randn(64, device=DEVICE), activation)


@pytest.mark.parametrize("density", [0.0, 1.0, "one", "skewed"])
def test_patterns_empty_full_one_block_skewed(density):
    dense = torch.randn(128, 96)
    if density == "one":
        mask = torch.zeros(4, 3, dtype=torch.bool)
        mask[2, 1] = True
        w = BlockSparseMatrix.from_dense(dense, 32, mask=mask)
    elif density == "skewed":
        w = BlockSparseMatrix.from_dense(dense, 32, mask=skewed_block_mask((4, 3), 0.4))
    else:
        w, _ = random_sparse(128, 96, 32, density)
    x = torch.randn(33, 96)
    check(x.to(DEVICE), w.to(DEVICE), torch.randn(128, device=DEVICE))
    check(x.to(DEVICE), w.to(DEVICE))


def test_three_d_and_non_contiguous_inputs():
    w, _ = random_sparse(64, 80, 16, 0.5)
    w = w.to(DEVICE)
    check(torch.randn(2, 9, 80, device=DEVICE), w)
    check(torch.randn(80, 19, device=DEVICE).t(), w)  # column-major x
    check(torch.randn(7, 160, device=DEVICE)[:, ::2], w)  # strided columns
    assert run_kernel(torch.randn(0, 80, device=DEVICE), w).shape == (0, 64)


def test_strided_bias():
    """A bias view with a stride (a column of a matrix, say) is read element by element, not as its storage."""
    w, _ = random_sparse(64, 96, 32, 0.5, seed=7)
    biases = torch.randn(64, 3, device=DEVICE)
    check(torch.randn(40, 96, device=DEVICE), w.to(DEVICE), biases[:, 1], "gelu")
    check(torch.randn(3, 96, device=DEVICE), w.to(DEVICE), biases[:, 2])


def test_single_row_input():
    w, _ = random_sparse(96, 64, 32, 0.5)
    check(torch.randn(1, 64, device=DEVICE), w.to(DEVICE))


def test_output_written_everywhere():
    """A poisoned output buffer would show through: the kernel allocates, so check no NaN/garbage leaks."""
    w, _ = random_sparse(64, 64, 16, 0.0)
    out = run_kernel(torch.randn(40, 64, device=DEVICE), w.to(DEVICE), torch.full((64,), 3.0, device=DEVICE))
    assert torch.equal(out, torch.full_like(out, 3.0))


def run_decode(x, w, bias=None, activation=None, tiles_per_program=2):
    """The few-token kernel, ``tiles_per_program`` tiles per program."""
    from sparseblocks.kernels.few_tokens import spmm_few_tokens

    return spmm_few_tokens(x, w, bias, activation, tiles_per_program)


def decode_outputs(x, w, bias=None, activation=None, tiles_per_program=2):
    """The few-token kernel's output and, for one token, the one-token kernel's."""
    from sparseblocks.kernels.one_token import spmm_one_token

    one_token = [spmm_one_token(x, w, bias, activation)] if x.shape[0] == 1 else []
    return [run_decode(x, w, bias, activation, tiles_per_program), *one_token]


def reference_float64(x, w, bias=None, activation=None):
    return reference.spmm(x.double(), w.to(dtype=torch.float64), None if bias is None else bias.double(), activation)


@pytest.mark.parametrize("tiles_per_program", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize("m", [1, 5, 16, 64])
def test_decode_rows_cut_into_pieces(tiles_per_program, m):
    """Rows split across 1..many programs (their pieces reduced by the last to arrive), or all in one program."""
    w, _ = random_sparse(200, 300, 32, 0.6, seed=4)
    w, x, bias = w.to(DEVICE), torch.randn(m, 300, device=DEVICE), torch.randn(200, device=DEVICE)
    for out in decode_outputs(x, w, bias, "gelu", tiles_per_program):
        check_output(out, reference_float64(x, w, bias, "gelu"), torch.float32)


@pytest.mark.parametrize("m", [1, 2])
def test_decode_row_of_many_pieces(m):
    """60 one-tile pieces per row: the last piece sums all of them (one token: in chunks of 16), in order."""
    w, _ = random_sparse(32, 2048, 16, 0.47, seed=6)
    w, x = w.to(DEVICE), torch.randn(m, 2048, device=DEVICE)
    for out in decode_outputs(x, w, tiles_per_program=1):
        check_output(out, reference_float64(x, w), torch.float32)


def test_one_token_over_rows_of_many_small_tiles_takes_the_few_token_kernel(monkeypatch):
    from sparseblocks.kernels import one_token

    tiles = lambda w: dispatch.Tiles.of(w)
    many_small, _ = random_sparse(32, 2048, 16, 0.5, seed=6)  # 64 tiles of 16 x 16 per row
    assert dispatch.one_token_kernel_pays(tiles(random_sparse(32, 2048, 16, 0.47, seed=6)[0]))  # 60 per row
    assert dispatch.one_token_kernel_pays(tiles(random_sparse(32, 4096, 64, 1.0)[0]))  # 64 per row, larger tiles
    assert not dispatch.one_token_kernel_pays(tiles(many_small))
    monkeypatch.setattr(one_token, "spmm_one_token", lambda *args: pytest.fail("took the one-token kernel"))
    w, x, bias = many_small.to(DEVICE), torch.randn(1, 2048, device=DEVICE), torch.randn(32, device=DEVICE)
    check_output(forward_with_kernels(x, w, bias, "silu"), reference_float64(x, w, bias, "silu"), torch.float32)


@pytest.mark.parametrize("empty_rows", [[0], [3], [5], [0, 1, 4, 5], [1, 2, 3]])
@pytest.mark.parametrize("tiles_per_program", [1, 2, 5])
@pytest.mark.parametrize("m", [1, 3])
def test_decode_empty_block_rows_anywhere(empty_rows, tiles_per_program, m):
    """Empty block rows first, inside, last: each written once (bias through the activation), none skipped."""
    mask = torch.rand(6, 4) < 0.7
    mask[:, 0] = True
    mask[empty_rows] = False
    w = BlockSparseMatrix.from_dense(torch.randn(6 * 16 - 5, 4 * 16), 16, mask=mask).to(DEVICE)
    x, bias = torch.randn(m, 64, device=DEVICE), torch.randn(91, device=DEVICE)
    for out in decode_outputs(x, w, bias, "silu", tiles_per_program):
        check_output(out, reference_float64(x, w, bias, "silu"), torch.float32)


def test_decode_no_tiles_at_all():
    w, _ = random_sparse(64, 48, 16, 0.0)
    w, bias = w.to(DEVICE), torch.randn(64, device=DEVICE)
    for m in (1, 2):
        for out in decode_outputs(torch.randn(m, 48, device=DEVICE), w, bias, "relu"):
            assert torch.equal(out, torch.relu(bias).expand(m, 64))


def test_decode_is_deterministic_and_takes_strided_rows():
    w, _ = random_sparse(256, 512, 32, 0.3, dtype=torch.bfloat16, seed=5)
    w = w.to(DEVICE)
    tokens = torch.randn(4, 9, 512, device=DEVICE).to(torch.bfloat16)[:, -1]  # last token of each sequence
    one = tokens[:1]
    for first, second in zip(
        decode_outputs(one, w, tiles_per_program=1), decode_outputs(one, w, tiles_per_program=1), strict=True
    ):
        assert torch.equal(first, second)
        check_output(first, reference_float64(one, w), torch.bfloat16)
    first, second = run_decode(tokens, w, tiles_per_program=3), run_decode(tokens, w, tiles_per_program=3)
    assert torch.equal(first, second)
    check_output(first, reference_float64(tokens, w), torch.bfloat16)


def run_gated(x, up, gate, up_bias=None, gate_bias=None, activation="silu"):
    from sparseblocks.kernels.one_token import gated_one_token

    return gated_one_token(x, up, gate, up_bias, gate_bias, activation)


def reference_gated(x, up, gate, up_bias=None, gate_bias=None, activation="silu"):
    return reference_float64(x, gate, gate_bias, activation) * reference_float64(x, up, up_bias)


@pytest.mark.parametrize("block", [16, 32, 64, (32, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("biases", [False, True])
def test_gated_one_token_every_block_and_ragged_edges(block, dtype, biases):
    """act(x·gateᵀ + b_g) ⊙ (x·upᵀ + b_u) in one launch; gate and up keep different tiles of the same grid."""
    up, _ = random_sparse(150, 140, block, 0.5, dtype=dtype, seed=1)
    gate, _ = random_sparse(150, 140, block, 0.4, dtype=dtype, seed=2)
    up, gate, x = up.to(DEVICE), gate.to(DEVICE), torch.randn(1, 140, device=DEVICE).to(dtype)
    up_bias, gate_bias = (torch.randn(150, device=DEVICE).to(dtype) for _ in range(2)) if biases else (None, None)
    out = run_gated(x, up, gate, up_bias, gate_bias, "gelu")
    check_output(out, reference_gated(x, up, gate, up_bias, gate_bias, "gelu"), dtype)


@pytest.mark.parametrize("with_bias", [False, True])
def test_gated_one_token_rows_empty_in_one_matrix_or_both(with_bias):
    """Rows with tiles in up only, gate only, neither, one of each, many of each: every row written once."""
    up_mask, gate_mask = torch.rand(6, 8) < 0.6, torch.rand(6, 8) < 0.6
    up_mask[0], gate_mask[0] = False, False  # empty in both
    up_mask[1], gate_mask[1] = True, False  # gate empty
    up_mask[2], gate_mask[2] = False, True  # up empty
    up_mask[3], gate_mask[3] = torch.arange(8) == 2, torch.arange(8) == 5  # one tile each
    up_mask[4], gate_mask[4] = True, True  # 16 tiles: two chunks of the reduction
    up_mask[5], gate_mask[5] = False, torch.arange(8) == 0  # a single tile, in gate
    up = BlockSparseMatrix.from_dense(torch.randn(6 * 16 - 3, 8 * 16), 16, mask=up_mask).to(DEVICE)
    gate = BlockSparseMatrix.from_dense(torch.randn(6 * 16 - 3, 8 * 16), 16, mask=gate_mask).to(DEVICE)
    x = torch.randn(1, 128, device=DEVICE)
    biases = [torch.randn(93, device=DEVICE) if with_bias else None for _ in range(2)]
    check_output(run_gated(x, up, gate, *biases), reference_gated(x, up, gate, *biases), torch.float32)
    empty = BlockSparseMatrix.from_dense(torch.randn(93, 128), 16, mask=torch.zeros(6, 8, dtype=torch.bool))
    empty = empty.to(DEVICE)
    check_output(run_gated(x, empty, empty, *biases), reference_gated(x, empty, empty, *biases), torch.float32)


def test_gated_one_token_refuses_what_it_cannot_take():
    up, _ = random_sparse(64, 64, 16, 0.5)
    gate, _ = random_sparse(64, 64, 32, 0.5)
    with pytest.raises(ValueError, match="tiled like up"):
        run_gated(torch.randn(1, 64, device=DEVICE), up.to(DEVICE), gate.to(DEVICE))
    with pytest.raises(ValueError, match="one row"):
        run_gated(torch.randn(2, 64, device=DEVICE), up.to(DEVICE), up.to(DEVICE))


def test_decode_rejects_too_many_rows():
    w, _ = random_sparse(32, 32, 16, 0.5)
    with pytest.raises(ValueError, match="1..64 rows"):
        run_decode(torch.randn(65, 32, device=DEVICE), w.to(DEVICE))
    with force_plan(forward="few_tokens"), pytest.raises(ValueError, match="1..64 rows"):
        forward_with_kernels(torch.randn(65, 32, device=DEVICE), w.to(DEVICE), None, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("m", "n", "k", "block", "dtype"),
    [
        (1, 3072, 768, 64, torch.bfloat16),
        (1, 14336, 4096, 64, torch.bfloat16),
        (16, 2048, 8192, 32, torch.bfloat16),
        (64, 4096, 14336, 128, torch.float16),
        (4099, 768, 3072, 16, torch.float16),
        (8192, 2048, 8192, 128, torch.bfloat16),
        (50432, 1000, 768, 64, torch.float32),
    ],
)
def test_real_sizes_on_gpu(dtype, m, n, k, block):
    w, _ = random_sparse(n, k, block, 0.1, dtype=dtype, seed=3)
    x = torch.randn(m, k, device="cuda").to(dtype)
    check(x, w.to("cuda"), torch.randn(n, device="cuda").to(dtype), "gelu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
@pytest.mark.parametrize("block", [64, 128])
def test_fp32_on_tensor_cores_on_gpu(precision, block):
    """fp32 tiles multiplied on the tensor cores are staged in shared memory at 4 bytes an element: every tuned
    launch (forward, input gradient, gated forward) must find a config that fits, and tf32x3 keeps fp32's error."""
    from sparseblocks import fp32_precision
    from sparseblocks.kernels.spmm import gated_rows, input_grad_rows

    w, dense = random_sparse(1024, 512, block, 0.5, dtype=torch.float32, seed=6)
    gate, _ = random_sparse(1024, 512, block, 0.5, dtype=torch.float32, seed=7)
    w, gate, dense = w.to("cuda"), gate.to("cuda"), dense.to("cuda")
    x, grad_out = torch.randn(512, 512, device="cuda"), torch.randn(512, 1024, device="cuda")
    # TF32 keeps 10 of fp32's 23 mantissa bits (about 1e-3 of error per product, more through the gated product)
    tolerance = 5e-3 if precision == "tf32" else TOLERANCE[torch.float32]
    with fp32_precision(precision):
        out, dx = run_kernel(x, w), input_grad_rows(grad_out, w)
        by_descriptor = run_kernel(x, w, descriptors=True)  # tuned, as large products are
        gated = gated_rows(x, w, gate, None, None, "silu")
    for forward in (out, by_descriptor):
        assert relative_error(forward, reference_float64(x, w)) < tolerance
    assert relative_error(dx, grad_out.double() @ dense) < tolerance
    assert relative_error(gated, reference_float64(x, gate, None, "silu") * reference_float64(x, w)) < tolerance


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("h", "k", "block", "density"), [(8192, 2048, 64, 0.1), (14336, 4096, 32, 0.5)])
def test_gated_one_token_real_sizes_on_gpu(h, k, block, density):
    up, _ = random_sparse(h, k, block, density, dtype=torch.bfloat16, seed=11)
    gate, _ = random_sparse(h, k, block, density, dtype=torch.bfloat16, seed=12)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    up, gate = up.to("cuda"), gate.to("cuda")
    check_output(run_gated(x, up, gate), reference_gated(x, up, gate), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_leaves_its_counters_zero():
    """The arrival counters are kept from call to call: both kernels (one token, a few) must leave them zero."""
    from sparseblocks.kernels import row_finish

    w, _ = random_sparse(1024, 2048, 64, 0.2, dtype=torch.bfloat16, seed=8)
    w = w.to("cuda")
    for m in (1, 1, 5, 16, 1):
        x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
        for out in decode_outputs(x, w, tiles_per_program=3):
            check_output(out, reference_float64(x, w), torch.bfloat16)
    torch.cuda.synchronize()
    assert row_finish._COUNTERS and not any(counters.any() for counters in row_finish._COUNTERS.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_descriptor_kernel_on_a_thread_without_cuda_context():
    """A fresh thread has no CUDA context current (PyTorch's backward thread can be one, when a layer's backward
    is its first CUDA work): the host still encodes the descriptors."""
    import threading

    w, _ = random_sparse(256, 128, 64, 0.5, dtype=torch.bfloat16, seed=1)
    x, w = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16), w.to("cuda")
    outputs = []
    thread = threading.Thread(target=lambda: outputs.append(run_kernel(x, w)))
    thread.start()
    thread.join()
    assert len(outputs) == 1, "the launch raised on the new thread"
    check_output(outputs[0], reference_float64(x, w), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_huge_m_on_gpu():
    """M large enough that M tiles × block rows passes 2^16 programs and M·K passes 2^31 elements."""
    w, _ = random_sparse(256, 64, 64, 0.5, dtype=torch.bfloat16)
    x = torch.randn(2**25 + 3, 64, device="cuda", dtype=torch.bfloat16)
    out = run_kernel(x, w.to("cuda"))
    rows = torch.tensor([0, 2**24, 2**25 + 2], device="cuda")
    ref = x[rows].double() @ w.to_dense().double().cuda().t()
    assert relative_error(out[rows], ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [(4, 197), (1, 1), (3, 5)])
def test_module_on_gpu_compiles_and_captures_in_cuda_graph(tokens):
    """Both kernels (the row kernel for 788 rows, the decode kernel for 1 and 15) compile and replay in a graph."""
    from sparseblocks import BlockSparseLinear

    layer = BlockSparseLinear(768, 3072, sparsity=0.9, block_size=64, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(*tokens, 768, device="cuda", dtype=torch.bfloat16)
    expected = reference.spmm(x.double(), layer.matrix.to(dtype=torch.float64), layer.bias.double())
    compiled = torch.compile(layer, fullgraph=True)
    assert relative_error(compiled(x), expected) < 1e-2
    static_x = x.clone()
    layer(static_x)  # tune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    expected = reference.spmm(static_x.double(), layer.matrix.to(dtype=torch.float64), layer.bias.double())
    assert relative_error(static_out, expected) < 1e-2
