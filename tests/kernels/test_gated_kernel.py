"""The row kernels' gated mode, ``act(X·Wgᵀ + bg) ⊙ (X·Wuᵀ + bu)`` in one launch, against float64, and the
``"gated"`` inference path of ``sparse_mlp`` that uses it.

Like test_spmm_kernel.py: through the interpreter on the CPU, compiled on a GPU (plus the ``gpu``-marked Llama-size
cases). Both versions of the row kernel run: pointer loads and tensor descriptors.
"""

import functools
import importlib

import pytest
import torch

from conftest import (
    KERNEL_DEVICE,
    KERNEL_TEST_MARKS,
    assert_close_to_reference,
    random_sparse,
)
from sparseblocks import BlockSparseMatrix, reference
from sparseblocks.backend import triton_interpreting
from sparseblocks.format import MLPWeights

DEVICE = KERNEL_DEVICE
pytestmark = KERNEL_TEST_MARKS
# ‖out − ref‖ / ‖ref‖ bounds: act(gate), up and their product are each rounded to the dtype, as the unfused path does
ROW_KERNEL_CONFIG = {"BLOCK_M": 16, "num_warps": 4, "num_stages": 2}


def _pair(h, k, block, dtype, density=0.5, seed=0):
    """Up and gate, (H, K) in the same blocks with different random patterns."""
    up, _ = random_sparse(h, k, block, density, dtype, seed)
    gate, _ = random_sparse(h, k, block, density, dtype, seed + 1)
    return up.to(DEVICE), gate.to(DEVICE)


def _reference(x, up, gate, up_bias, gate_bias, activation):
    """act(x·gateᵀ + gate_bias) ⊙ (x·upᵀ + up_bias) in float64."""
    as64 = lambda t: None if t is None else t.double()
    gated = reference.spmm(x.double(), gate.to(dtype=torch.float64), as64(gate_bias), activation)
    return gated * reference.spmm(x.double(), up.to(dtype=torch.float64), as64(up_bias))


def _check(x, up, gate, up_bias=None, gate_bias=None, activation="silu", descriptors=False, config=ROW_KERNEL_CONFIG):
    from sparseblocks.dispatch import descriptors_fit
    from sparseblocks.kernels.row_launch import RowLaunch, RowMode
    from sparseblocks.kernels.spmm import launch_rows

    spec = RowLaunch(RowMode.GATED, up_bias, activation, gate=gate, gate_bias=gate_bias)
    descriptors = descriptors and descriptors_fit(x, up, "gated_hidden", gate=gate)  # else the pointer kernel
    out, no_sums = launch_rows(x, up, spec, descriptors, config)
    ref = _reference(x, up, gate, up_bias, gate_bias, activation)
    assert out.dtype == x.dtype and no_sums is None
    assert_close_to_reference(out, ref, chained=True)


@pytest.mark.parametrize("descriptors", [True, False])
@pytest.mark.parametrize("block", [16, 32, 64, 128, (32, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_block_and_dtype_with_ragged_edges(block, dtype, descriptors):
    """H × K = 152 × 136 end in part-tiles for every block yet keep TMA's 16-byte rows (fp32 always takes the
    pointer kernel); M = 37 ends in a part M tile."""
    from sparseblocks.dispatch import descriptors_fit

    up, gate = _pair(152, 136, block, dtype, seed=1)
    x = torch.randn(37, 136, device=DEVICE).to(dtype)
    assert descriptors_fit(x, up, "gated_hidden", gate=gate) == (dtype != torch.float32)
    up_bias, gate_bias = (torch.randn(152, device=DEVICE).to(dtype) for _ in range(2))
    _check(x, up, gate, up_bias, gate_bias, descriptors=descriptors)


@pytest.mark.parametrize("descriptors", [True, False])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", None])
@pytest.mark.parametrize("biases", ["none", "up", "gate", "both"])
def test_biases_and_activations(biases, activation, descriptors):
    up, gate = _pair(96, 64, 32, torch.float16, seed=2)
    x = torch.randn(21, 64, device=DEVICE, dtype=torch.float16)
    up_bias = torch.randn(96, device=DEVICE, dtype=torch.float16) if biases in ("up", "both") else None
    gate_bias = torch.randn(96, device=DEVICE, dtype=torch.float16) if biases in ("gate", "both") else None
    _check(x, up, gate, up_bias, gate_bias, activation, descriptors)


def _masked(dense, block, rows_kept):
    """``dense`` tiled in ``block`` with only the block rows ``rows_kept`` stored (all their tiles)."""
    mask = torch.zeros(dense.shape[0] // block, -(-dense.shape[1] // block), dtype=torch.bool)
    mask[rows_kept] = True
    return BlockSparseMatrix.from_dense(dense, block, mask=mask).to(DEVICE)


@pytest.mark.parametrize("descriptors", [True, False])
@pytest.mark.parametrize("with_biases", [False, True])
@pytest.mark.parametrize(("up_rows", "gate_rows"), [([1, 3], [0, 3]), ([0, 1, 2, 3], []), ([], [0, 2])])
def test_block_rows_empty_in_up_gate_or_both(up_rows, gate_rows, with_biases, descriptors):
    """Block row 0 stored in gate only, 1 in up only, 2 in neither, 3 in both; and up or gate with no tile at all
    (the descriptor kernel cannot address no tiles: the pointer kernel takes that launch)."""
    dense = torch.randn(2, 64, 80, dtype=torch.float16)
    up, gate = _masked(dense[0], 16, up_rows), _masked(dense[1], 16, gate_rows)
    x = torch.randn(19, 80, device=DEVICE, dtype=torch.float16)
    biases = [torch.randn(64, device=DEVICE, dtype=torch.float16) if with_biases else None for _ in range(2)]
    _check(x, up, gate, *biases, descriptors=descriptors)


@pytest.mark.parametrize("m", [1, 16, 70])
def test_row_counts_and_strided_x(m):
    """Any M (the decode kernel is for ops.mlp to prefer, not a limit here) and x with a row stride wider than K,
    which the pointer kernel reads in place."""
    up, gate = _pair(48, 40, 16, torch.float32, seed=3)
    x = torch.randn(m, 43, device=DEVICE)[:, :40]
    _check(x, up, gate, activation="gelu", descriptors=False)


def test_gated_rows_and_refused_inputs():
    """The entry point (autotuned launch, interpreter config under the interpreter) and what a launch refuses."""
    from sparseblocks.kernels.row_launch import RowLaunch, RowMode
    from sparseblocks.kernels.spmm import gated_rows

    up, gate = _pair(64, 48, 16, torch.bfloat16, seed=4)
    x = torch.randn(70, 48, device=DEVICE).to(torch.bfloat16)
    bias = torch.randn(64, device=DEVICE).to(torch.bfloat16)
    out = gated_rows(x, up, gate, bias, None, "silu")
    assert_close_to_reference(out, _reference(x, up, gate, bias, None, "silu"), chained=True)
    assert gated_rows(x[:0], up, gate, None, None, "silu").shape == (0, 64)
    other_blocks, _ = random_sparse(64, 48, 32, 0.5, torch.bfloat16)
    with pytest.raises(ValueError, match="must match"):
        gated_rows(x, up, other_blocks.to(DEVICE), None, None, "silu")
    with pytest.raises(ValueError, match="gated mode"):
        RowLaunch(RowMode.INPUT_GRAD, gate=gate).check()


def test_gated_configs_fit_two_accumulators():
    """Gated launches keep configs whose two fp32 accumulators fit in 128 registers a thread; others keep all."""
    from sparseblocks.kernels.spmm import spmm_tuned
    from sparseblocks.kernels.tuning import prune_row_kernel_configs

    def kept(bn, gated):
        configs = prune_row_kernel_configs(spmm_tuned.configs, {"M_BUCKET": 8192}, BN=bn, GATED=gated)
        return {(c.kwargs["BLOCK_M"], c.num_warps) for c in configs}

    assert kept(64, False) == {(c.kwargs["BLOCK_M"], c.num_warps) for c in spmm_tuned.configs}
    assert kept(64, True) == {(64, 4), (128, 4), (128, 8), (256, 8)}
    assert kept(128, True) == {(64, 4), (128, 8)}
    assert kept(256, True) == {(64, 4)}  # none fits: the config with the fewest registers


def _gated_mlp(k=48, hidden=64, n=40, dtype=torch.float32):
    """A SwiGLU MLP whose down blocks do not chain with up's (so the fused kernel cannot take it)."""
    up, gate = _pair(hidden, k, 16, dtype, seed=5)
    down, _ = random_sparse(n, hidden, (16, 32), 0.5, dtype, seed=7)
    biases = [torch.randn(size, device=DEVICE).to(dtype) for size in (hidden, n, hidden)]
    return up, down.to(DEVICE), gate, biases


def test_mlp_plan_takes_gated_rows_above_the_decode_kernels_tokens():
    from sparseblocks.dispatch import ALWAYS_TOKENS, INTERPRETER, Tiles, mlp_plan

    up, down, gate = _gated_mlp()[:3]
    plan = lambda m, up, down, gate: mlp_plan(m, *(Tiles.of(w) if w is not None else None for w in (up, down, gate)),
                                              INTERPRETER).value  # fmt: skip
    assert plan(1, up, down, gate) == "one_token"
    for m in (2, ALWAYS_TOKENS):  # few enough rows for the decode kernels: a product each
        assert plan(m, up, down, gate) == "unfused"
    for m in (ALWAYS_TOKENS + 1, 8192):
        assert plan(m, up, down, gate) == "gated_rows"
    assert plan(100, up, down, None) == "unfused"  # not gated
    gate_other_blocks = random_sparse(64, 48, 32, 0.5, seed=8)[0].to(DEVICE)
    assert plan(100, up, down, gate_other_blocks) == "unfused"
    chaining_down = random_sparse(40, 64, 16, 0.25, seed=9)[0].to(DEVICE)
    assert plan(100, up, chaining_down, gate) == "fused_mlp"  # where the fused kernel pays, it still runs


# The interpreter (Triton 3.6) casts fp32 to bf16 by truncation, torch's bf16 product rounds to nearest: under it a
# bf16 hidden activation differs from the unfused one by an ulp, so bf16 is compared on a GPU only.
BF16_ON_GPU = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(triton_interpreting(), reason="truncating casts"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16_ON_GPU])
def test_sparse_mlp_gated_path_equals_unfused(monkeypatch, dtype):
    """``sparse_mlp`` at 70 tokens (batch 2 × 35) takes the gated kernel, eagerly and through the custom op under
    torch.compile, and gives exactly the unfused path's numbers (CPU tensors take the kernels here as CUDA ones do
    on a GPU)."""
    from sparseblocks.kernels import spmm as kernels
    from sparseblocks.ops import sparse_mlp

    for module in ("sparseblocks.ops.mlp", "sparseblocks.ops.spmm"):  # the package names the function spmm
        monkeypatch.setattr(importlib.import_module(module), "use_triton", lambda x: True)
    calls = []
    gated = kernels.gated_rows
    monkeypatch.setattr(kernels, "gated_rows", lambda *args: calls.append(1) or gated(*args))
    up, down, gate, (up_bias, down_bias, gate_bias) = _gated_mlp(dtype=dtype)
    x = torch.randn(2, 35, 48, device=DEVICE).to(dtype)
    run = lambda x, fused=True: sparse_mlp(x, up, down, gate, up_bias, down_bias, gate_bias, "silu", fused=fused)
    unfused = run(x, fused=False)
    assert not calls
    assert torch.equal(run(x), unfused) and len(calls) == 1
    assert torch.equal(torch.compile(run, backend="eager", fullgraph=True)(x), unfused) and len(calls) == 2
    ref = reference.mlp(x.double(), MLPWeights(*(w.to(dtype=torch.float64) for w in (up, down, gate)),
                        up_bias.double(), down_bias.double(), gate_bias.double()), "silu")  # fmt: skip
    assert_close_to_reference(unfused, ref, chained=True)


@functools.cache
def _llama_1b_mlp():
    """Llama-3.2-1B's MLP (K 2048, H 8192) at 90% sparsity in blocks of 64, bf16, on the GPU: up, down, gate."""
    up, gate = _pair(8192, 2048, 64, torch.bfloat16, density=0.1, seed=10)
    down, _ = random_sparse(2048, 8192, 64, 0.1, torch.bfloat16, seed=12)
    return up, down.to(DEVICE), gate


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("descriptors", [True, False])
@pytest.mark.parametrize("m", [8192, 100])
def test_llama_1b_mlp_size_on_gpu(m, descriptors):
    """The gated launch at Llama-3.2-1B's size, autotuned, both kernels, with biases."""
    up, _, gate = _llama_1b_mlp()
    x = torch.randn(m, 2048, device=DEVICE).to(torch.bfloat16)
    up_bias, gate_bias = (torch.randn(8192, device=DEVICE).to(torch.bfloat16) * 0.1 for _ in range(2))
    _check(x, up, gate, up_bias, gate_bias, descriptors=descriptors, config=None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("m", "path"), [(1, "one_token"), (16, "unfused"), (32, "gated_rows"), (8192, "gated_rows")])
def test_llama_1b_sparse_mlp_paths_eager_and_compiled_on_gpu(m, path):
    """``sparse_mlp`` at Llama-3.2-1B's size: the decode kernels up to 16 tokens (gate and up have too many block
    rows for them past that), the gated launch above; eager and inside a fullgraph compile, against float64."""
    from sparseblocks.dispatch import Tiles, device_facts, mlp_plan
    from sparseblocks.ops import sparse_mlp

    up, down, gate = _llama_1b_mlp()
    assert mlp_plan(m, Tiles.of(up), Tiles.of(down), Tiles.of(gate), device_facts(up.device)).value == path
    x = torch.randn(m, 2048, device=DEVICE).to(torch.bfloat16)
    expected = reference.mlp(x.double(), MLPWeights(*(w.to(dtype=torch.float64) for w in (up, down, gate))), "silu")
    run = lambda x: sparse_mlp(x, up, down, gate, activation="silu")
    with torch.no_grad():
        assert_close_to_reference(run(x), expected, chained=True)
        assert_close_to_reference(torch.compile(run, fullgraph=True)(x), expected, chained=True)
