import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from sparseblocks.backend import triton_interpreting
from sparseblocks.format import BlockSparseMatrix
from sparseblocks.masks import random_block_mask

# Property tests draw the same examples on every run and machine (a fixed seed instead of an example database): a
# failure reproduces, and CI time stays bounded by each test's max_examples. HYPOTHESIS_PROFILE=explore draws anew.
settings.register_profile("fixed", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))

# The kernel test modules' device and marks: compiled on a GPU, through Triton's interpreter on the CPU, fp32
# products in true fp32. Each such module sets `pytestmark = KERNEL_TEST_MARKS`.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_TEST_MARKS = [
    pytest.mark.skipif(
        KERNEL_DEVICE == "cpu" and not triton_interpreting(), reason="needs a CUDA GPU or TRITON_INTERPRET=1"
    ),
    pytest.mark.usefixtures("no_tf32"),
]


# ‖out − ref‖ / ‖ref‖ against a float64 reference, for one product whose output is rounded to its dtype, and for a
# chain of products rounded on the way (an MLP, a gated hidden activation: bf16's 8 mantissa bits show twice).
# fp32 under TF32 on a GPU keeps 10 mantissa bits.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
CHAINED_TOLERANCE = {**TOLERANCE, torch.bfloat16: 2e-2}
TF32_TOLERANCE = 1e-3


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, dtype=None, chained: bool = False) -> None:
    """``out`` has ``ref``'s shape and is within the tolerance of ``dtype`` (``out``'s by default) of it, exactly
    zero where ``ref`` is."""
    dtype = dtype or out.dtype
    tolerance = (CHAINED_TOLERANCE if chained else TOLERANCE)[dtype]
    if dtype == torch.float32 and out.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        tolerance = TF32_TOLERANCE
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    if ref.norm() == 0:
        assert torch.equal(out, torch.zeros_like(out))
    else:
        error = relative_error(out, ref)
        assert error < tolerance, f"relative error {error:.2e} over {tolerance:.1e} ({dtype})"


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (NaN anywhere gives inf, so it never passes)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def kernel_ir(*args: str) -> str:
    """What ``tools/kernel_ir.py`` prints for ``args``: a kernel compiled for sm_90 on this machine, no GPU
    (in a subprocess without ``TRITON_INTERPRET``, which would interpret rather than compile)."""
    script = Path(__file__).resolve().parents[1] / "tools" / "kernel_ir.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          check=True).stdout  # fmt: skip


def random_sparse(
    n: int, k: int, block, density: float, dtype=torch.float32, seed: int = 0
) -> tuple[BlockSparseMatrix, torch.Tensor]:
    """A random matrix with exactly round(density * tiles) tiles, and its masked dense twin (float64)."""
    generator = torch.Generator().manual_seed(seed)
    bn, bk = (block, block) if isinstance(block, int) else block
    grid = (-(-n // bn), -(-k // bk))
    mask = random_block_mask(grid, density, generator)
    dense = torch.randn(n, k, generator=generator, dtype=torch.float64)
    matrix = BlockSparseMatrix.from_dense(dense.to(dtype), (bn, bk), mask=mask)
    return matrix, matrix.to_dense().double()


def zero_tensor_bytes(path: Path, key: str) -> None:
    """Overwrite tensor ``key``'s bytes in the safetensors file ``path`` with zeros (same size, header untouched)."""
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    start, end = json.loads(data[8 : 8 + length])[key]["data_offsets"]
    data[8 + length + start : 8 + length + end] = bytes(end - start)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread: with two xdist workers of two threads each on two cores, a tiny Llama's
    forward and backward took 1 s instead of 3 ms (OpenMP threads waiting on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def no_tf32():
    """fp32 products in true fp32 for the test (kernels follow ``allow_tf32``, as cuBLAS does)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous
