"""Launch configs of the column-sum kernel (``kernels/column_sums.py``) on the bias-gradient shapes (GPU only).

    PYTHONPATH=src python3 benchmarks/tune/column_sums.py [--out FILE.json]

For each shape: the copy floor, cuBLAS's ``ones @ g``, and every (BLOCK_M, BLOCK_N, warps, programs per SM, least
rows per chunk) config, fastest first, with its relative error against a float64 sum; each config's time is a row of
a ``tune_column_sums`` result (``--out``, default ``benchmarks/results/<gpu>/tune_column_sums.json``).
"""

import argparse
import shlex
import sys
from pathlib import Path

import torch
import triton

from sparseblocks.bench.harness import start_run
from sparseblocks.bench.results import write_result
from sparseblocks.kernels import column_sums

CONFIGS = [(64, 128, 4, 4, 512), (128, 128, 8, 4, 512), (64, 256, 4, 4, 512), (32, 256, 4, 8, 256),
           (128, 64, 4, 8, 256), (64, 128, 4, 8, 128), (32, 128, 4, 16, 64), (16, 256, 4, 16, 64)]  # fmt: skip
# ViT-B fc2's dY, a Llama-1B-wide gradient, and the activation-gradient kernel's per-M-tile parts (ViT-B fc1)
SHAPES = [((50432, 768), torch.bfloat16), ((8192, 2048), torch.bfloat16), ((394, 3072), torch.float32)]


def time_config(g: torch.Tensor, config: tuple[int, ...], ref: torch.Tensor) -> tuple[float, int, float]:
    """(µs per call, chunks of M, relative error) of one config, partial sums' allocation and sum included."""
    block_m, block_n, warps, per_sm, min_chunk = config
    (m, n), sms = g.shape, torch.cuda.get_device_properties(0).multi_processor_count
    blocks_n = triton.cdiv(n, block_n)
    chunk = triton.cdiv(max(triton.cdiv(m * blocks_n, per_sm * sms), min_chunk), block_m) * block_m
    split = triton.cdiv(m, chunk)

    def run() -> torch.Tensor:
        partial = torch.empty((split, n), device="cuda", dtype=torch.float32)
        kernel = column_sums._column_sums_kernel[(blocks_n, split)]
        kernel(g, partial, m, n, chunk, g.stride(0), g.stride(1), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        return partial[0] if split == 1 else partial.sum(0)

    error = ((run().double() - ref).norm() / ref.norm()).item()
    return triton.testing.do_bench(run, warmup=50, rep=300) * 1e3, split, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="result file (default benchmarks/results/<gpu>/tune_column_sums.json)")
    args = parser.parse_args()
    payload, folder = start_run("tune_column_sums", "PYTHONPATH=src python3 " + shlex.join(sys.argv), None)
    print(torch.cuda.get_device_name())
    for shape, dtype in SHAPES:
        g = torch.randn(*shape, device="cuda", dtype=dtype)
        ref = g.double().sum(0)
        floor = g.numel() * g.element_size() / 4.25e12 * 1e6
        ones = triton.testing.do_bench(lambda: g.new_ones(1, shape[0]) @ g, warmup=50, rep=300) * 1e3  # noqa: B023
        print(shape, dtype, f"floor {floor:.1f} us; ones@g {ones:.1f} us")
        for us, split, error, (bm, bn, warps, per_sm, min_chunk) in sorted(
            (*time_config(g, c, ref), c) for c in CONFIGS
        ):
            print(f"   {us:.1f} us BM={bm} BN={bn} warps={warps} per_sm={per_sm} min_chunk={min_chunk} split={split} "
                  f"err={error:.0e}")  # fmt: skip
            payload["rows"].append({"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "floor_us": floor,
                                    "ones_matmul_us": ones, "BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps,
                                    "programs_per_sm": per_sm, "min_chunk": min_chunk, "split": split, "us": us,
                                    "relative_error": error})  # fmt: skip
        write_result(args.out or folder / "tune_column_sums.json", payload)


if __name__ == "__main__":
    main()
