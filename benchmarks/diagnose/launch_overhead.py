"""CPU cost of issuing the pieces of one sparse layer at GPT-2-small MLP shapes (GPU only).

    PYTHONPATH=src python3 benchmarks/diagnose/launch_overhead.py

For each piece: the wall time per call of 300 calls issued without synchronizing (``cpu``), and including the
final synchronize (``wall``). At M = 64 the GPU work is a few µs, so ``cpu`` is the cost of issuing the call;
where ``wall`` exceeds ``cpu`` the GPU was the bottleneck. Also a whole layer's forward + backward through
autograd, against ``F.linear`` + GELU.
"""

import time

import torch
import torch.nn.functional as F

from sparseblocks.bench.spmm import random_weight
from sparseblocks.dispatch import Plan, Tiles, descriptors_fit, row_loads
from sparseblocks.format import BlockSparseMatrix
from sparseblocks.kernels.column_sums import column_sums_triton
from sparseblocks.kernels.row_launch import RowLaunch, RowMode
from sparseblocks.kernels.spmm import launch_rows
from sparseblocks.ops import spmm


def per_call_us(fn, calls: int = 300) -> tuple[float, float]:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return issued, (time.perf_counter() - start) / calls * 1e6


def measure(m: int, w: BlockSparseMatrix, b: torch.Tensor) -> None:
    """Print the per-call CPU and wall time of every piece at ``m`` tokens."""
    dense = w.to_dense()
    x = torch.randn(m, 768, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(m, 3072, device="cuda", dtype=torch.bfloat16)
    values = w.values.detach().requires_grad_()
    layer = BlockSparseMatrix.from_parts(values, w.shape, w.index_tensors())
    xg, bg, dense_g = x.clone().requires_grad_(), b.clone().requires_grad_(), dense.clone().requires_grad_()
    forward = RowLaunch(RowMode.FORWARD, b, "gelu")
    # the row kernel's loads as the dispatch picks them, the choice's CPU time included
    chosen_loads = lambda: row_loads(m, Tiles.of(w), lambda: descriptors_fit(x, w, "forward")) is Plan.ROWS_DESCRIPTORS
    actgrad = RowLaunch(RowMode.ACTIVATION_GRAD, b, "gelu", dy)
    actgrad_bias = RowLaunch(RowMode.ACTIVATION_GRAD, b, "gelu", dy, bias_grad=True)
    cases = {
        "torch.empty": lambda: torch.empty(m, 3072, device="cuda", dtype=torch.bfloat16),
        "F.linear dense": lambda: F.linear(x, dense, b),
        "fwd (chosen kernel)": lambda: launch_rows(x, w, forward, chosen_loads()),
        "fwd descriptors": lambda: launch_rows(x, w, forward, descriptors=True),
        "fwd pointers": lambda: launch_rows(x, w, forward, descriptors=False),
        "actgrad descriptors +bias": lambda: launch_rows(x, w, actgrad_bias, descriptors=True),
        "actgrad descriptors": lambda: launch_rows(x, w, actgrad, descriptors=True),
        "actgrad pointers": lambda: launch_rows(x, w, actgrad, descriptors=False),
        "column_sums_triton dy": lambda: column_sums_triton(dy),
        "torch.sum dy": lambda: dy.sum(0, dtype=torch.float32),
        "layer fwd+bwd (autograd)": lambda: spmm(xg, layer, bg, "gelu").backward(dy),
        "dense layer fwd+bwd": lambda: F.gelu(F.linear(xg, dense_g, bg)).backward(dy),
    }
    print(f"--- M={m}")
    for name, fn in cases.items():
        issued, wall = per_call_us(fn, 100 if "layer" in name else 300)
        print(f"{name:<26} cpu {issued:7.1f} us/call, wall {wall:7.1f} us/call", flush=True)


def main() -> None:
    print(torch.cuda.get_device_name())
    w = random_weight(3072, 768, 0.9, 64, torch.bfloat16, torch.Generator().manual_seed(0))
    b = torch.zeros(3072, device="cuda", dtype=torch.bfloat16)
    for m in (64, 8192):
        measure(m, w, b)


if __name__ == "__main__":
    main()
