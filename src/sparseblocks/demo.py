"""``sparseblocks demo``: sparsify a small model of real shape and check it against the masked dense model.

The model is the MLP stack of all-MiniLM-L6-v2 (6 layers, 384 -> 1536 -> 384, GELU) with random weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sparseblocks.backend import describe
from sparseblocks.nn import BlockSparseLinear


def minilm_mlp_stack(layers: int = 6, width: int = 384, hidden: int = 1536) -> nn.Sequential:
    """The MLPs of a 6-layer BERT (all-MiniLM-L6-v2's shapes) as one ``nn.Sequential``."""
    return nn.Sequential(
        *[nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)) for _ in range(layers)]
    )


def sparsify_linears(model: nn.Module, sparsity: float, block_size: int) -> list[str]:
    """Replace every ``nn.Linear`` by a ``BlockSparseLinear`` (block-norm magnitude); return their names."""
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, BlockSparseLinear.from_linear(child, sparsity, block_size))
                replaced.append(f"{name}.{child_name}" if name else child_name)
    return replaced


def masked_dense_twin(model: nn.Module) -> nn.Module:
    """A copy with each ``BlockSparseLinear`` turned back into a dense ``nn.Linear`` (zeros where pruned)."""
    twin = copy.deepcopy(model)
    for module in list(twin.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, BlockSparseLinear):
                setattr(module, child_name, child.to_linear())
    return twin


def model_bytes(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of a model: every parameter and buffer, indices included."""
    params = sum(p.numel() for p in model.parameters())
    tensors = [*model.parameters(), *model.buffers()]
    return params, sum(t.numel() * t.element_size() for t in tensors)


def run_demo(sparsity: float = 0.9, block_size: int = 32, tokens: int = 512, seed: int = 0) -> float:
    """Print the demo's report; return the relative error of the sparse model against the masked dense one."""
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dense = minilm_mlp_stack().to(device)
    sparse = copy.deepcopy(dense)
    replaced = sparsify_linears(sparse, sparsity, block_size)
    reference = masked_dense_twin(sparse)

    x = torch.randn(tokens, 384, device=device)
    with torch.no_grad():
        out, expected = sparse(x), reference(x)
    error = ((out - expected).norm() / expected.norm()).item()

    (dense_params, dense_bytes), (sparse_params, sparse_bytes) = model_bytes(dense), model_bytes(sparse)
    print(f"sparseblocks demo: MiniLM-L6 MLP stack, {len(replaced)} linears -> BlockSparseLinear")
    print(f"  sparsity {sparsity:.0%}, blocks {block_size}x{block_size}, ops: {describe()}")
    print(f"  {'':<10}{'params':>12}{'bytes':>14}")
    print(f"  {'dense':<10}{dense_params:>12,}{dense_bytes:>14,}")
    print(f"  {'sparse':<10}{sparse_params:>12,}{sparse_bytes:>14,}")
    print(f"  {'ratio':<10}{sparse_params / dense_params:>12.3f}{sparse_bytes / dense_bytes:>14.3f}")
    status = "OK" if error < 1e-4 else "MISMATCH"
    print(f"  output vs masked dense model on {tokens} tokens: relative error {error:.1e} [{status}]")
    return error
