"""How fast whole-model decode could get from MLP sparsity alone: the model with its MLPs removed, same run.

PYTHONPATH=src python3 benchmarks/diagnose/decode_mlp_bound.py llama-3.2-1b llama-3.1-8b

Llama decode at batch 1 (compiled, CUDA-graph replays, as ``bench e2e --modes compiled_graph``): dense; the same
model whose MLPs return zeros (no MLP time at all: the bound on any MLP sparsity's speedup); and ours at 90%/b64.
The gap between the bound and the weight-bytes floor is the rest of the model's time (attention, norms, the head,
kernel boundaries), the same on the dense and the sparse side.
"""

import sys

import torch
from torch import nn

from sparseblocks.bench import e2e


class NoMLP(nn.Module):
    """An MLP that costs nothing: zeros, so the residual stream passes through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def tokens_per_s(model: nn.Module, grid: e2e.Grid) -> float:
    value = e2e.decode_measurements(model, 1, grid, "compiled_graph", 20)[0]["value"]
    torch._dynamo.reset()
    return value


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    grid = e2e.Grid((1,), ("bf16",), (0.9,), (64,), ("mlp",), ("compiled_graph",))
    for name in sys.argv[1:]:
        dense, _ = e2e.build_model(name, torch.bfloat16, torch.device("cuda"))
        with torch.no_grad():
            base = tokens_per_s(dense, grid)
            ours = e2e.sparse_models(dense, 0.9, 64, "mlp")[0]["sparseblocks"]
            sparse = tokens_per_s(ours, grid)
            del ours
            for layer in dense.model.layers:
                layer.mlp = NoMLP()
            bound = tokens_per_s(dense, grid)
        print(f"{name} decode batch 1, compiled_graph: dense {base:.1f} tokens/s | ours 90%/b64 {sparse:.1f} "
              f"({sparse / base:.2f}x) | MLPs removed {bound:.1f} ({bound / base:.2f}x: the bound)",
              flush=True)  # fmt: skip
        del dense
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
