"""The Triton forward kernel against the float64 reference.

On the CPU it runs through Triton's interpreter (``TRITON_INTERPRET=1``, as ``make test`` sets) on small shapes;
on a GPU the same cases run compiled, plus the ``gpu``-marked real sizes.
"""

import pytest
import torch

from conftest import random_sparse, relative_error
from sparseblocks import BlockSparseMatrix, reference
from sparseblocks.backend import triton_interpreting
from sparseblocks.masks import skewed_block_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.skipif(DEVICE == "cpu" and not triton_interpreting(), reason="needs a CUDA GPU or TRITON_INTERPRET=1"),
    pytest.mark.usefixtures("no_tf32"),
]
# ‖out − ref‖ / ‖ref‖ bounds; the output itself is rounded to its dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def run_kernel(x, w, bias=None, activation=None):
    from sparseblocks.kernels.spmm import spmm_triton

    return spmm_triton(x, w, bias, activation)


def check(x, w, bias=None, activation=None):
    out = run_kernel(x, w, bias, activation)
    ref = reference.spmm(x.double(), w.to(dtype=torch.float64), None if bias is None else bias.double(), activation)
    assert out.shape == ref.shape and out.dtype == x.dtype
    tolerance = TOLERANCE[x.dtype]
    if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and x.is_cuda:
        tolerance = 1e-3
    if ref.norm() == 0:
        assert torch.equal(out, torch.zeros_like(out))
    else:
        assert relative_error(out, ref) < tolerance


@pytest.mark.parametrize("block", [16, 32, 64, 128, (16, 128), (64, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_block_and_dtype_with_ragged_edges(block, dtype):
    w, _ = random_sparse(150, 140, block, 0.5, dtype=dtype, seed=1)
    w = w.to(DEVICE)
    x = torch.randn(37, 140, device=DEVICE).to(dtype)
    bias = torch.randn(150, device=DEVICE).to(dtype)
    check(x, w, bias)


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


def test_single_row_input():
    w, _ = random_sparse(96, 64, 32, 0.5)
    check(torch.randn(1, 64, device=DEVICE), w.to(DEVICE))


def test_output_written_everywhere():
    """A poisoned output buffer would show through: the kernel allocates, so check no NaN/garbage leaks."""
    w, _ = random_sparse(64, 64, 16, 0.0)
    out = run_kernel(torch.randn(40, 64, device=DEVICE), w.to(DEVICE), torch.full((64,), 3.0, device=DEVICE))
    assert torch.equal(out, torch.full_like(out, 3.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("m", "n", "k", "block", "dtype"),
    [
        (1, 3072, 768, 64, torch.bfloat16),
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
def test_module_on_gpu_compiles_and_captures_in_cuda_graph():
    from sparseblocks import BlockSparseLinear

    layer = BlockSparseLinear(768, 3072, sparsity=0.9, block_size=64, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 197, 768, device="cuda", dtype=torch.bfloat16)
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
