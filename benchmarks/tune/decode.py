"""Tiles per program and launch config of the few-token decode kernel, on the decode benchmark's weights (bf16).

    PYTHONPATH=src python3 benchmarks/tune/decode.py [--tokens 4,16] [--programs-per-sm 1,2,4,8,16] [--out FILE]

Prints, per shape and token count, the time of every (programs per SM, num_warps, num_stages) against dense and
the row kernel, with weights rotated past the L2 as in ``sparseblocks bench decode``, and writes each as a row of a
``tune_decode`` result (``--out``, default ``benchmarks/results/<gpu>/tune_decode.json``). Chose
``dispatch.PROGRAMS_PER_SM``, by tile size (one token has its own kernel, one program per tile: not tuned here).
(``results/h200/tune_decode.txt`` also swept how many partial sums the reducing program loads at once: one was
best everywhere, so that knob is gone.)
"""

import argparse
import itertools
import math
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from sparseblocks.bench.decode import clone_matrix, dense_weights, time_us, weight_copies
from sparseblocks.bench.harness import start_run
from sparseblocks.bench.results import write_result
from sparseblocks.bench.spmm import random_weight
from sparseblocks.dispatch import Plan, Tiles, descriptors_fit, row_loads
from sparseblocks.kernels.few_tokens import LAUNCH_CONFIGS, spmm_few_tokens
from sparseblocks.kernels.spmm import spmm_rows

# name -> (N, K)
SHAPES = {
    "llama_8b_up": (14336, 4096),
    "llama_8b_down": (4096, 14336),
    "llama_1b_up": (8192, 2048),
    "llama_1b_down": (2048, 8192),
}
CONFIGS = [{"num_warps": w, "num_stages": s} for w, s in LAUNCH_CONFIGS]  # the ones the kernel autotunes over
CASES = [(0.9, 64), (0.9, 32), (0.8, 64), (0.5, 64), (0.5, 32), (0.9, 128), (0.5, 128)]  # (sparsity, block)


def row_kernel(x, w):
    """The row kernel, reading its tiles as ``dispatch.row_loads`` says (by pointer at these sizes)."""
    fits = lambda: descriptors_fit(x, w, "forward")
    return spmm_rows(x, w, descriptors=row_loads(x.shape[0], Tiles.of(w), fits) is Plan.ROWS_DESCRIPTORS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="4,16", help="rows of x, 2..64")
    parser.add_argument("--programs-per-sm", default="1,2,4,8,16")
    parser.add_argument("--out", type=Path, help="result file (default benchmarks/results/<gpu>/tune_decode.json)")
    args = parser.parse_args()
    payload, folder = start_run("tune_decode", "PYTHONPATH=src python3 " + shlex.join(sys.argv), None)
    tokens = [int(m) for m in args.tokens.split(",")]
    programs_per_sm = [int(p) for p in args.programs_per_sm.split(",")]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    generator = torch.Generator().manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, {sms} SMs")
    for (shape, (n, k)), (sparsity, block) in itertools.product(SHAPES.items(), CASES):
        one = random_weight(n, k, sparsity, block, torch.bfloat16, generator)
        sparse_sets = weight_copies(lambda one=one: {"w": clone_matrix(one)}, one.nbytes)
        dense_sets = weight_copies(lambda n=n, k=k: dense_weights({"w": (n, k)}), 2 * n * k)
        for m in tokens:
            dense = time_us(lambda x, w: F.linear(x, w["w"]), m, k, dense_sets)
            rows = time_us(lambda x, w: row_kernel(x, w["w"]), m, k, sparse_sets)
            results = []
            for per_sm, config in itertools.product(programs_per_sm, CONFIGS):
                tiles = max(1, math.ceil(one.nnz / (per_sm * sms)))

                def fn(x, w, tiles=tiles, config=config):
                    return spmm_few_tokens(x, w["w"], None, None, tiles, config)

                results.append((time_us(fn, m, k, sparse_sets), per_sm, config))
            base = {"shape": shape, "sparsity": sparsity, "block": block, "M": m, "dense_us": dense, "rows_us": rows}
            payload["rows"] += [{**base, "programs_per_sm": p, **c, "us": us} for us, p, c in results]
            write_result(args.out or folder / "tune_decode.json", payload)
            best = min(results, key=lambda r: r[0])
            print(f"{shape} s={sparsity} b={block} M={m}: dense {dense:.1f} us; rows kernel {rows:.1f} us; best "
                  f"{best[0]:.1f} us ({dense / best[0]:.2f}x) at {best[1]}/SM, {best[2]}",
                  flush=True)  # fmt: skip
            for per_sm in programs_per_sm:
                row = [f"{us:5.1f}" for us, p, _ in results if p == per_sm]
                print(f"    {per_sm:2}/SM: {' '.join(row)}  (configs {[tuple(c.values()) for c in CONFIGS]})")


if __name__ == "__main__":
    main()
