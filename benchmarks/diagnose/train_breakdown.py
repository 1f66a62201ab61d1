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
from sparseblocks.dispatch import Plan, Tiles, descriptors_fit, row_loads
from sparseblocks.kernels.sddmm import default_split, sddmm_triton
from sparseblocks.kernels.spmm import activation_grad_rows, input_grad_rows
from sparseblocks.ops.spmm import forward_with_kernels


def by_descriptor(m: int, w, decision: str, *fit_args) -> bool:
    """Whether the row kernel reads its tiles by descriptor in a ``decision`` launch, as the ops decide."""
    return row_loads(m, Tiles.of(w), lambda: descriptors_fit(*fit_args), decision) is Plan.ROWS_DESCRIPTORS


def breakdown(shape: str, sparsity: float = 0.9, block: int = 64) -> None:
    m, k, n = SHAPES[shape]
    w = sparse_weight(Case(shape, m, k, n, "bf16", sparsity, block), torch.bfloat16)
    dense = w.to_dense()
    x = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16)]
    dy = [torch.randn(m, n, device="cuda", dtype=torch.bfloat16)]
    act_grad_loads = by_descriptor(m, w, "activation_grad", x[0], w, "activation_grad", dy[0])
    input_grad_loads = by_descriptor(m, w, "input_grad", dy[0], w, "input_grad")
    pairs = {
        "forward": (lambda x: forward_with_kernels(x, w, None, None), lambda x: F.linear(x, dense), x),
        "act_grad": (
            lambda g: activation_grad_rows(g, x[0], w, None, "gelu", descriptors=act_grad_loads),
            lambda g: torch.ops.aten.gelu_backward(g, F.linear(x[0], dense)),
            dy,
        ),
        "dX": (lambda g: input_grad_rows(g, w, input_grad_loads), lambda g: g @ dense, dy),
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
