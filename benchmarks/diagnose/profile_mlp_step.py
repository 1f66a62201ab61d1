"""Profile forward + backward of one whole MLP as `bench train` times it, dense and 90%-sparse (GPU only).

    PYTHONPATH=src python3 benchmarks/diagnose/profile_mlp_step.py [--shape vit_b] [--block 64]

Prints the kernels with the most GPU time for each, so the time of the sparse step can be laid out op by op
(products, activation gradient, bias gradients, the split reduction of dW) against the dense step's.
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from sparseblocks.bench.spmm import random_weight
from sparseblocks.bench.train import MLP_SHAPES, _layer_shapes, make_linear, mlp_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="vit_b", choices=sorted(MLP_SHAPES))
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--block", type=int, default=64)
    args = parser.parse_args()
    tokens, width, _, kind = MLP_SHAPES[args.shape]
    print(torch.cuda.get_device_name(), args)
    for impl in ("dense", "sparseblocks"):
        generator = torch.Generator().manual_seed(0)
        weights = [random_weight(n, k, args.sparsity, args.block, torch.bfloat16, generator)
                   for n, k in _layer_shapes("mlp", args.shape)]  # fmt: skip
        forward = mlp_forward(kind, [make_linear(impl, w, bias=kind == "gelu") for w in weights])
        x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(x)
        for _ in range(3):  # autotuning and compilation out of the way
            forward(x).backward(grad)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            forward(x).backward(grad)
            torch.cuda.synchronize()
        print(f"--- {impl}")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=70))


if __name__ == "__main__":
    main()
