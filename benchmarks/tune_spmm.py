"""Time the forward kernel under each launch config on a few telling cases (GPU only).

    PYTHONPATH=src python3 benchmarks/tune_spmm.py

Prints ms and speedup over dense cuBLAS per (case, config), so the autotuner's config set can be chosen from
measurements. Notes of what was learnt go to benchmarks/NOTES.md.
"""

import torch
import torch.nn.functional as F

from sparseblocks.bench.harness import input_sets, time_ms
from sparseblocks.bench.spmm import SHAPES, Case, sparse_weight
from sparseblocks.kernels.spmm import spmm_triton

CASES = [("llama_1b_up", 0.9, 64), ("vit_b_fc1", 0.9, 64), ("vit_b_fc1", 0.9, 32), ("llama_1b_down", 0.9, 128),
         ("llama_1b_up", 0.5, 64), ("vit_b_fc2", 0.9, 16)]  # fmt: skip
CONFIGS = [(bm, w, s) for bm in (64, 128) for w in (4, 8) for s in (2, 3, 4)] + [(256, 8, 3), (256, 8, 4)]


def tune_case(shape: str, sparsity: float, block: int) -> None:
    m, k, n = SHAPES[shape]
    w = sparse_weight(Case(shape, m, k, n, "bf16", sparsity, block), torch.bfloat16)
    xs = input_sets(lambda: torch.randn(m, k, device="cuda", dtype=torch.bfloat16), m * k * 2)
    dense = w.to_dense()
    dense_ms, _ = time_ms(lambda x: F.linear(x, dense), xs)
    results = []
    for block_m, warps, stages in CONFIGS:
        config = {"BLOCK_M": block_m, "num_warps": warps, "num_stages": stages}
        try:
            ms, _ = time_ms(lambda x, config=config: spmm_triton(x, w, config=config), xs)
        except Exception as error:  # e.g. out of shared memory
            print(f"  {config}: {type(error).__name__}")
            continue
        results.append((ms, block_m, warps, stages))
    results.sort()
    best = ", ".join(f"M{b}/w{wp}/s{st} {dense_ms / ms:.2f}x" for ms, b, wp, st in results[:4])
    print(f"{shape} s={sparsity} b={block}: dense {dense_ms * 1e3:.0f} us | best {best} | worst "
          f"{dense_ms / results[-1][0]:.2f}x", flush=True)  # fmt: skip


if __name__ == "__main__":
    for case in CASES:
        tune_case(*case)
