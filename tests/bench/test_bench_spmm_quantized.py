"""``bench spmm --quantize``: our kernels timed on the quantized tiles too, each row with its own bytes and floor."""

import torch

from conftest import random_sparse
from sparseblocks.bench.plots import spmm_table
from sparseblocks.bench.spmm import implementations, quantized_weights


def test_quantized_paths_compute_the_dequantized_product():
    w, _ = random_sparse(64, 96, 32, 0.5, dtype=torch.bfloat16, seed=1)
    quantized = quantized_weights(w, ("int8", "fp8"))
    assert set(quantized) == {"sparseblocks_int8", "sparseblocks_fp8"}
    assert all(q.nbytes < w.nbytes for q in quantized.values())  # 1-byte tiles, float32 scales per tile row
    paths, _ = implementations(w, quantized=quantized)
    x = torch.randn(5, 96).to(torch.bfloat16)
    for impl, q in quantized.items():
        expected = x.double() @ q.to_dense().double().T  # the dequantized weight
        assert ((paths[impl](x).double() - expected).norm() / expected.norm()) < 1e-2
    assert quantized_weights(w.to(dtype=torch.float32), ("int8",)) == {}  # fp32 cases keep 16-bit-only kernels


def test_the_table_shows_each_quantized_row_with_its_own_floor():
    base = {"shape": "s", "M": 8, "dtype": "bf16", "K": 96, "N": 64}
    rows = [
        {**base, "impl": "dense", "sparsity": 0.0, "block": None, "mask": None, "ms": 1.0, "floor_ms": 0.5},
        {**base, "impl": "sparseblocks", "sparsity": 0.9, "block": 32, "mask": "random", "ms": 0.4, "floor_ms": 0.2},
        {**base, "impl": "sparseblocks_int8", "sparsity": 0.9, "block": 32, "mask": "random", "ms": 0.25,
         "floor_ms": 0.125, "bytes": 1000},
    ]  # fmt: skip
    table = spmm_table(rows)
    assert "sparseblocks_int8" in table and "4.00x (floor 8.00x)" in table and "| 5.00x |" in table
