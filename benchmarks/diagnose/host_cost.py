"""CPU time of issuing eager ``spmm`` and ``sparse_mlp`` calls on the kernel path, every Triton launch replaced by a
no-op (no GPU needed): what our Python costs per call on top of the launches themselves.

    PYTHONPATH=<tree>/src python3 benchmarks/diagnose/host_cost.py [--repeats N]

CPU tensors stand in for CUDA ones (the ops are told the kernels run); nothing is computed, so the outputs are
garbage and only the times mean anything. Run it on two trees, alternating, to compare their host cost.
"""

import argparse
import importlib
import json
import time

import torch
from triton.runtime.jit import JITFunction

from sparseblocks import BlockSparseLinear
from sparseblocks.kernels.tuning import TunedKernel
from sparseblocks.ops import sparse_mlp, spmm


def microseconds(call, repeats: int) -> float:
    """The least over seven rounds of the mean CPU time (this process's, so other processes on a shared machine
    count less) of ``repeats`` calls, after a warm-up."""
    for _ in range(200):
        call()
    rounds = []
    for _ in range(7):
        start = time.process_time()
        for _ in range(repeats):
            call()
        rounds.append((time.process_time() - start) / repeats * 1e6)
    return min(rounds)


def stub_launches() -> None:
    """Every launch does nothing: tuned kernels answer with their first config, JIT kernels ignore the call."""
    TunedKernel.launch = lambda self, key, grid, args, meta: self.configs[0]
    JITFunction.__getitem__ = lambda self, grid: lambda *args, **kwargs: None
    for name in ("sparseblocks.ops.spmm", "sparseblocks.ops.mlp"):
        module = importlib.import_module(name)
        if hasattr(module, "use_triton"):
            module.use_triton = lambda x: True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    stub_launches()
    torch.manual_seed(0)
    up, gate = (BlockSparseLinear(512, 2048, sparsity=0.9, block_size=64) for _ in range(2))
    down = BlockSparseLinear(2048, 512, sparsity=0.9, block_size=64)
    w = up.matrix
    one, many = torch.randn(1, 512), torch.randn(128, 512)
    calls = {
        "spmm, 1 token": lambda: spmm(one, w, up.bias, "gelu"),
        "spmm, 128 tokens": lambda: spmm(many, w, up.bias, "gelu"),
        "SwiGLU sparse_mlp, 1 token": lambda: sparse_mlp(one, up.matrix, down.matrix, gate.matrix, activation="silu"),
    }
    rows = []
    with torch.no_grad():
        for name, call in calls.items():
            rows.append({"call": name, "us": round(microseconds(call, args.repeats), 2)})
            print(f"{name:<40} {rows[-1]['us']:7.2f} µs", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
