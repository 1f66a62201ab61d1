"""``sparseblocks demo``: sparsify a small model of real shape and check it against the masked dense model.

The model is the MLP stack of all-MiniLM-L6-v2 (6 layers, 384 -> 1536 -> 384, GELU) with random weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sparseblocks.backend import describe
from sparseblocks.patch import SparsityConfig, densify, model_size, sparsify


def minilm_mlp_stack(layers: int = 6, width: int = 384, hidden: int = 1536) -> nn.Sequential:
    """The MLPs of a 6-layer BERT (all-MiniLM-L6-v2's shapes) as one ``nn.Sequential``."""
    return nn.Sequential(
        *[nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)) for _ in range(layers)]
    )


def run_demo(sparsity: float = 0.9, block_size: int = 32, tokens: int = 512, seed: int = 0) -> float:
    """Print the demo's report; return the relative error of the sparse model against the masked dense one."""
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dense = minilm_mlp_stack().to(device)
    sparse = copy.deepcopy(dense)
    report = sparsify(sparse, SparsityConfig(sparsity, block_size, targets="all-linear"))
    reference = densify(copy.deepcopy(sparse))

    x = torch.randn(tokens, 384, device=device)
    with torch.no_grad():
        out, expected = sparse(x), reference(x)
    error = ((out - expected).norm() / expected.norm()).item()

    (dense_params, dense_bytes), (sparse_params, sparse_bytes) = model_size(dense), model_size(sparse)
    print(f"sparseblocks demo: MiniLM-L6 MLP stack, {len(report.layers)} linears -> BlockSparseLinear")
    print(f"  sparsity {sparsity:.0%}, blocks {block_size}x{block_size}, ops: {describe()}")
    print(f"  {'':<10}{'params':>12}{'bytes':>14}")
    print(f"  {'dense':<10}{dense_params:>12,}{dense_bytes:>14,}")
    print(f"  {'sparse':<10}{sparse_params:>12,}{sparse_bytes:>14,}")
    print(f"  {'ratio':<10}{sparse_params / dense_params:>12.3f}{sparse_bytes / dense_bytes:>14.3f}")
    status = "OK" if error < 1e-4 else "MISMATCH"
    print(f"  output vs masked dense model on {tokens} tokens: relative error {error:.1e} [{status}]")
    return error
