"""Where the decode kernel's fixed time goes: the pieces of one call timed alone, as CUDA-graph replays (H200).

    PYTHONPATH=src python3 benchmarks/decode_overhead.py

Times, on Llama-1B down at 90% (block 64, 1 token; weights rotated past the L2): an empty Triton kernel, the
counters' memset, the decode kernel without the memset (counters kept zero by the kernel itself), the whole call,
and dense F.linear.
"""

import torch
import torch.nn.functional as F
import triton

from sparseblocks.bench.decode import clone_matrix, dense_weights, time_us, weight_copies
from sparseblocks.bench.spmm import random_weight
from sparseblocks.kernels import decode


@triton.jit
def _empty(ptr):
    pass


def main() -> None:
    n, k, m = 2048, 8192, 1
    one = random_weight(n, k, 0.9, 64, torch.bfloat16, torch.Generator().manual_seed(0))
    sets = weight_copies(lambda: {"w": clone_matrix(one)}, one.nbytes)
    counters = torch.zeros(one.block_grid[0], device="cuda", dtype=torch.int32)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tiles = max(1, triton.cdiv(one.nnz, decode.PROGRAMS_PER_SM * sms))
    programs = triton.cdiv(one.nnz, tiles)
    scratch = torch.empty((programs + one.block_grid[0], 16, 64), device="cuda", dtype=torch.float32)

    def kernel_only(x, w):
        w = w["w"]
        y = torch.empty((m, n), device="cuda", dtype=x.dtype)
        grid = (programs + triton.cdiv(one.block_grid[0], decode.EMPTY_ROWS_PER_PROGRAM),)
        decode._decode_kernel[grid](
            x, w.values, w.crow_indices, w.col_indices, w.row_indices_of_block, y, scratch, counters, y,
            m, n, k, w.nnz, one.block_grid[0], tiles, x.stride(0), x.stride(1), y.stride(0), y.stride(1), 2,
            BN=64, BK=64, BLOCK_M=16, EMPTY_ROWS_PER_PROGRAM=decode.EMPTY_ROWS_PER_PROGRAM, HAS_BIAS=False,
            ACTIVATION=0, INPUT_PRECISION="tf32", DOT_IN_FP32=False, EVEN_K=True, num_warps=4, num_stages=3,
        )  # fmt: skip
        return y

    cases = {
        "empty triton kernel (1 program)": lambda x, w: _empty[(1,)](x),
        "empty triton kernel (1000 programs)": lambda x, w: _empty[(1000,)](x),
        "torch.zeros(n_rows, int32)": lambda x, w: torch.zeros(32, device="cuda", dtype=torch.int32),
        "decode kernel, no memset": kernel_only,
        "spmm_decode_triton (memset + kernel)": lambda x, w: decode.spmm_decode_triton(x, w["w"]),
    }
    print(f"{torch.cuda.get_device_name()}: llama_1b_down 90% b64 M=1, {one.nnz} tiles, {tiles} per program")
    for name, fn in cases.items():
        print(f"{name:<40} {time_us(fn, m, k, sets):6.2f} us", flush=True)
    dense = weight_copies(lambda: dense_weights({"w": (n, k)}), 2 * n * k)
    print(f"{'dense F.linear':<40} {time_us(lambda x, w: F.linear(x, w['w']), m, k, dense):6.2f} us")


if __name__ == "__main__":
    main()
