"""Where the one-token decode call's time goes: its pieces timed alone, as CUDA-graph replays (H200).

    PYTHONPATH=src python3 benchmarks/diagnose/decode_overhead.py

For Llama-1B down, Llama-8B up and down at 90% (block 64, 1 token; weights rotated past the L2): an empty Triton
kernel, a memset of the counters' size (what each call paid before the counters were kept between calls), the
one-token kernel alone at 1, 2 and 4 warps, the whole call, and dense F.linear. (1, 2 or 4 tiles per program, an
earlier version of the kernel, measured 6.5, 7.7 and 8.4 µs on Llama-8B up: one tile per program was kept.)
"""

import torch
import torch.nn.functional as F
import triton

from sparseblocks.bench.decode import clone_matrix, dense_weights, time_us, weight_copies
from sparseblocks.bench.spmm import random_weight
from sparseblocks.kernels import one_token
from sparseblocks.kernels.row_finish import EMPTY_ROWS_PER_PROGRAM
from sparseblocks.ops.spmm import forward_with_kernels


@triton.jit
def _empty(ptr):
    pass


def kernel_alone(one, warps: int):
    """The one-token kernel launched directly, on counters it leaves zero."""
    (n, k), (bn, bk), (n_rows, _) = one.shape, one.block_shape, one.block_grid
    counters = torch.zeros(n_rows, device="cuda", dtype=torch.int32)
    scratch = torch.empty((one.nnz, bn), device="cuda", dtype=torch.float32)
    grid = (one.nnz + triton.cdiv(n_rows, EMPTY_ROWS_PER_PROGRAM),)

    def run(x, w):
        w = w["w"]
        y = torch.empty((1, n), device="cuda", dtype=x.dtype)
        one_token._one_token_kernel[grid](
            x, w.values, w.crow_indices, w.col_indices, w.row_indices_of_block, y, *(y,) * 5, scratch, counters, y,
            n, k, w.nnz, 0, n_rows, x.stride(1), y.stride(1), BN=bn, BK=bk,
            EMPTY_ROWS_PER_PROGRAM=EMPTY_ROWS_PER_PROGRAM, REDUCE_CHUNK=one_token.REDUCE_CHUNK, HAS_BIAS=False,
            HAS_GATE_BIAS=False, ACTIVATION=0, GATED=False, EVEN_K=True, DEPENDENT=0, num_warps=warps, num_stages=1,
        )  # fmt: skip
        return y

    return run


def main() -> None:
    print(torch.cuda.get_device_name())
    for name, (n, k) in {
        "llama_1b_down": (2048, 8192),
        "llama_8b_up": (14336, 4096),
        "llama_8b_down": (4096, 14336),
    }.items():
        one = random_weight(n, k, 0.9, 64, torch.bfloat16, torch.Generator().manual_seed(0))
        sets = weight_copies(lambda one=one: {"w": clone_matrix(one)}, one.nbytes)
        cases = {
            "empty triton kernel (1 program)": lambda x, w: _empty[(1,)](x),
            "empty triton kernel (1000 programs)": lambda x, w: _empty[(1000,)](x),
            "torch.zeros(n_rows, int32)": lambda x, w, r=one.block_grid[0]: torch.zeros(
                r, device="cuda", dtype=torch.int32
            ),
            **{f"one-token kernel alone, {warps} warps": kernel_alone(one, warps) for warps in (1, 2, 4)},
            "whole call (forward_with_kernels: one token)": lambda x, w: forward_with_kernels(x, w["w"], None, None),
        }
        print(f"{name} 90% b64 M=1, {one.nnz} tiles, {one.nbytes / 1e6:.1f} MB")
        for case, fn in cases.items():
            print(f"  {case:<48} {time_us(fn, 1, k, sets):6.2f} us", flush=True)
        dense = weight_copies(lambda n=n, k=k: dense_weights({"w": (n, k)}), 2 * n * k)
        print(f"  {'dense F.linear':<48} {time_us(lambda x, w: F.linear(x, w['w']), 1, k, dense):6.2f} us")


if __name__ == "__main__":
    main()
