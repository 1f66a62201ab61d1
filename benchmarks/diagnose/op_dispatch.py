"""CPU time of one call of each ``sparseblocks::`` op, the kernels replaced by an empty output (no GPU needed).

    PYTHONPATH=<tree>/src python3 benchmarks/diagnose/op_dispatch.py

What ``torch.compile``d code pays per op on top of the kernels' own launch: the dispatcher, the op's Python
wrappers, and rebuilding the ``BlockSparseMatrix`` from the op's arguments. Run it on two trees to compare.
"""

import importlib
import statistics
import time

import torch

from sparseblocks import BlockSparseLinear

spmm_ops = importlib.import_module("sparseblocks.ops.spmm")
mlp_ops = importlib.import_module("sparseblocks.ops.mlp")


def microseconds(call, repeats: int = 3000) -> float:
    """The median over five rounds of the mean time of ``repeats`` calls."""
    for _ in range(200):
        call()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        rounds.append((time.perf_counter() - start) / repeats * 1e6)
    return statistics.median(rounds)


def main() -> None:
    empty = lambda x, n: x.new_empty((*x.shape[:-1], n))
    spmm_ops._forward = lambda x, w, bias, activation: empty(x, w.shape[0])
    spmm_ops._input_grad = lambda grad, w: empty(grad, w.shape[1])
    mlp_ops._fused_mlp = lambda x, up, down, gate, biases, activation, path: empty(x, down.shape[0])
    up, gate = (BlockSparseLinear(256, 512, sparsity=0.9, block_size=64) for _ in range(2))
    down = BlockSparseLinear(512, 256, sparsity=0.9, block_size=64)
    x, grad = torch.randn(1, 256), torch.randn(1, 512)
    w = up.matrix
    matrices = [up.matrix, down.matrix, gate.matrix]
    mlp_args = (
        [m.values for m in matrices],
        [t for m in matrices for t in spmm_ops._index(m)],
        [n for m in matrices for n in m.shape],
        [up.bias, down.bias, gate.bias],
    )
    calls = {
        "spmm": lambda: spmm_ops._spmm_op(x, w.values, spmm_ops._index(w), list(w.shape), up.bias, "gelu"),
        "spmm_input_grad": lambda: spmm_ops._spmm_input_grad_op(grad, w.values, spmm_ops._index(w), list(w.shape)),
        "fused_mlp (SwiGLU)": lambda: mlp_ops._fused_mlp_op(x, *mlp_args, "silu"),
    }
    with torch.no_grad():
        for name, call in calls.items():
            print(f"{name:<20} {microseconds(call):6.1f} µs", flush=True)


if __name__ == "__main__":
    main()
