"""Time each op of a sparse layer's training step against its dense counterpart (GPU only).

    PYTHONPATH=src python3 benchmarks/diagnose/train_breakdown.py [SHAPE ...]

Per layer shape at 90% sparsity, block 64, bf16: forward, the activation-gradient recompute, dX and dW (SDDMM,
for several splits of M), each beside the dense cuBLAS op that does the same job. What was learnt goes to
benchmarks/notes/.
"""

import sys

import torch
import torch.nn.functional as F

from sparseblocks.bench.harness import time_ms
from sparseblocks.bench.spmm import SHAPES, Case, sparse_weight
from sparseblocks.kernels.sddmm import default_split, sddmm_triton
from sparseblocks.kernels.spmm import spmm_activation_grad_triton, spmm_input_grad_triton, spmm_triton


def breakdown(shape: str, sparsity: float = 0.9, block: int = 64) -> None:
    m, k, n = SHAPES[shape]
    w = sparse_weight(Case(shape, m, k, n, "bf16", sparsity, block), torch.bfloat16)
    dense = w.to_dense()
    x = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16)]
    dy = [torch.randn(m, n, device="cuda", dtype=torch.bfloat16)]
    pairs = {
        "forward": (lambda x: spmm_triton(x, w), lambda x: F.linear(x, dense), x),
        "act_grad": (
            lambda g: spmm_activation_grad_triton(g, x[0], w, None, "gelu"),
            lambda g: torch.ops.aten.gelu_backward(g, F.linear(x[0], dense)),
            dy,
        ),
        "dX": (lambda g: spmm_input_grad_triton(g, w), lambda g: g @ dense, dy),
        "dW": (lambda g: sddmm_triton(g, x[0], w), lambda g: g.t() @ x[0], dy),
    }
    print(f"{shape} (M={m}, K={k}, N={n}) s={sparsity} b={block}, default split {default_split(m, w.nnz, x[0].device)}")
    for op, (ours, theirs, inputs) in pairs.items():
        ours_ms, _ = time_ms(ours, inputs)
        dense_ms, _ = time_ms(theirs, inputs)
        print(f"  {op:<9} ours {ours_ms * 1e3:7.1f} us   dense {dense_ms * 1e3:7.1f} us   {dense_ms / ours_ms:5.2f}x")
    for split in (1, 2, 4, 8, 16, 32):
        ms, _ = time_ms(lambda g, split=split: sddmm_triton(g, x[0], w, split=split), dy)
        print(f"  dW split={split:<3} {ms * 1e3:7.1f} us")


if __name__ == "__main__":
    for name in sys.argv[1:] or SHAPES:
        breakdown(name)
