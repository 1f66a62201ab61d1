"""CPU time of issuing eager ``spmm`` and ``sparse_mlp`` calls on the kernel path, every Triton launch replaced by a
no-op (no GPU needed): what our Python costs per call on top of the launches themselves.

    PYTHONPATH=<tree>/src python3 benchmarks/diagnose/host_cost.py [--repeats N]

CPU tensors stand in for CUDA ones (the ops are told the kernels run); nothing is computed, so the outputs are
garbage and only the times mean anything. Run it on two trees, alternating, to compare their host cost.

Each call is timed on the full path (prepared launches off) and replayed from a prepared launch
(``ops/prepared_calls.py``), where the compiled kernel's launcher is a no-op too: the second figure is our Python of
the replay, without Triton's C launcher.
"""

import argparse
import importlib
import json
import time

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.runtime.jit import JITFunction, create_function_from_signature

from sparseblocks import BlockSparseLinear
from sparseblocks.backend import prepared_launches
from sparseblocks.kernels import few_tokens, one_token, prepared
from sparseblocks.kernels.tuning import TunedKernel
from sparseblocks.ops import prepared_calls, sparse_mlp, spmm


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


class NoLaunch:
    """A compiled kernel whose launcher does nothing."""

    function, packed_metadata = 0, (2, 1, 0)
    run = staticmethod(lambda *args: None)


def stub_launches() -> None:
    """Every launch does nothing: tuned kernels answer with their first config, JIT kernels ignore the call; both
    report a compiled kernel that launches nothing, so calls are prepared and replayed as on a GPU (stream 0, the
    binder built for an sm_90 target, arrival counters kept as on CUDA)."""

    def tuned_launch(self, key, grid, args, meta):
        kwargs = {**meta, **self.configs[0].all_kwargs()}
        prepared.launched(self.kernel, NoLaunch(), grid, args, kwargs)
        return self.configs[0]

    TunedKernel.launch = tuned_launch
    JITFunction.__getitem__ = lambda self, grid: lambda *args, **kwargs: NoLaunch()
    for name in ("sparseblocks.ops.spmm", "sparseblocks.ops.mlp"):
        module = importlib.import_module(name)
        if hasattr(module, "use_triton"):
            module.use_triton = lambda x: True
    importlib.import_module("sparseblocks.ops.spmm")._replay_device = lambda x: True
    prepared_calls._stream = lambda x: 0
    binders = {}
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    prepared.binder = lambda kernel: binders.setdefault(
        kernel, create_function_from_signature(kernel.signature, kernel.params, backend)
    )
    counters = {}

    def arrival_counters(device, n_rows):
        buffer = counters.setdefault(n_rows, torch.zeros(n_rows, dtype=torch.int32))
        prepared.persistent(buffer)
        return buffer

    one_token.arrival_counters = few_tokens.arrival_counters = arrival_counters


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
    print(f"{'call':<40} {'full path':>10} {'prepared':>10}")
    with torch.no_grad():
        for name, call in calls.items():
            with prepared_launches(False):
                full = microseconds(call, args.repeats)
            with prepared_launches(True):
                replayed = microseconds(call, args.repeats)
            rows.append({"call": name, "us": round(full, 2), "prepared_us": round(replayed, 2)})
            print(f"{name:<40} {full:7.2f} µs {replayed:7.2f} µs", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
