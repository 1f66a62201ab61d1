"""Block masks: bool ``(N_blocks, K_blocks)`` tensors saying which tiles of a weight are kept.

Scores come from pruning methods (block L2 norm here); masks from scores keep an exact number of blocks, so a
requested sparsity is the sparsity you get.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def block_sums(values: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Sum of a 2-D ``values`` over each ``(bn, bk)`` tile, as float32 ``(ceil(N/bn), ceil(K/bk))``.

    Ragged edges count as zero-padded.
    """
    if values.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(values.shape)}")
    bn, bk = block
    n, k = values.shape
    rows, cols = math.ceil(n / bn), math.ceil(k / bk)
    padded = torch.nn.functional.pad(values.detach().float(), (0, cols * bk - k, 0, rows * bn - n))
    return padded.reshape(rows, bn, cols, bk).sum(dim=(1, 3))


def block_norms(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """L2 norm of each ``(bn, bk)`` tile of a 2-D ``weight``, as float32 ``(ceil(N/bn), ceil(K/bk))``."""
    return block_sums(weight.detach().float().square(), block).sqrt()


def expand_block_mask(mask: torch.Tensor, block: tuple[int, int], shape: Sequence[int]) -> torch.Tensor:
    """A block mask ``(N_blocks, K_blocks)`` as an element mask of ``shape`` ``(N, K)`` (ragged edges cut off).

    Differentiable when ``mask`` is a float tensor (Supermask's straight-through scores).
    """
    rows, cols = mask.shape
    # A broadcast view copied once: its backward is a plain sum, far cheaper than repeat_interleave's on a GPU.
    full = mask[:, None, :, None].expand(rows, block[0], cols, block[1]).reshape(rows * block[0], cols * block[1])
    return full[: shape[0], : shape[1]]


def blocks_to_keep(total: int, keep: float) -> int:
    """How many of ``total`` blocks a keep fraction means: ``round(keep * total)``, and at least one for any
    ``keep > 0`` (a layer of a few blocks at 50% would otherwise round to none: Python rounds 0.5 to 0)."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be a fraction in [0, 1], got {keep}")
    return max(round(keep * total), 1 if keep > 0 and total > 0 else 0)


def top_blocks_mask(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """Bool mask of the same shape as ``scores`` keeping the ``blocks_to_keep(scores.numel(), keep)`` largest."""
    count = blocks_to_keep(scores.numel(), keep)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[torch.topk(scores.flatten().float(), count, sorted=False).indices] = True
    return mask.view_as(scores)


def n_of_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask of a 2-D ``scores`` ``(N, K)`` keeping the ``n`` largest of every ``m`` consecutive entries of a
    row (``n=2, m=4``: the 2:4 pattern of sparse tensor cores); K must be a multiple of ``m``."""
    rows, k = scores.shape
    if k % m:
        raise ValueError(f"an {n}:{m} mask needs a multiple of {m} columns, got {k}")
    groups = scores.detach().float().reshape(rows, k // m, m)
    top = groups.topk(n, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).reshape(rows, k)


def random_block_mask(grid: tuple[int, int], density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniformly random bool mask over ``grid`` with exactly ``round(density * blocks)`` kept blocks."""
    return top_blocks_mask(torch.rand(grid, generator=generator), density)


def skewed_block_mask(grid: tuple[int, int], density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random mask with exactly ``round(density * blocks)`` blocks whose rows are very unequal.

    Row weights fall off geometrically, so a few block rows are (nearly) full and many are empty: the worst case
    for a kernel that gives each block row the same amount of hardware.
    """
    rows, cols = grid
    row_weight = torch.logspace(0, -3, rows)[torch.randperm(rows, generator=generator)]
    scores = torch.rand(grid, generator=generator) * row_weight[:, None]
    return top_blocks_mask(scores, density)
