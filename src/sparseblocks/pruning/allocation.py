"""Each layer's sparsity from its sensitivity, under an overall target.

A tile's Fisher saliency ``Σ_tile w² (F + λ) / 2`` estimates the loss increase of removing it, in the same units in
every layer (unlike magnitudes, which differ in scale between layers). :func:`sensitivity_allocation` removes the
tiles of least saliency across all layers until the overall target is met, no layer past ``max_layer_sparsity``
(never a whole layer), and returns each layer's resulting sparsity; the pruner then prunes each layer to its own
sparsity on the schedule, by whatever method. :func:`per_layer_config` turns it into a :class:`SparsityConfig`.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from sparseblocks.integrations.sparsify import SparsityConfig


def sensitivity_allocation(
    scores: dict[str, torch.Tensor], sparsity: float, max_layer_sparsity: float | None = None
) -> dict[str, float]:
    """Per layer, the fraction of its tiles to prune so that ``sparsity`` of all tiles are, removing the tiles of
    least ``scores`` (``(N_blocks, K_blocks)`` each, comparable across layers) first. ``max_layer_sparsity``
    (default halfway between the target and 1) caps every layer; raises ``ValueError`` when the cap makes the
    target unreachable."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    cap = (1.0 + sparsity) / 2 if max_layer_sparsity is None else max_layer_sparsity
    if not sparsity <= cap < 1.0:
        raise ValueError(f"max_layer_sparsity must lie in [sparsity, 1), got {cap}")
    names = list(scores)
    sizes = torch.tensor([scores[n].numel() for n in names])
    caps = (sizes.double() * cap).floor().long()
    wanted = round(sparsity * int(sizes.sum()))
    if wanted > int(caps.sum()):
        raise ValueError(f"no layer may pass {cap:.3f} sparsity: {sparsity} overall is out of reach")
    flat = torch.cat([scores[n].detach().double().flatten().cpu() for n in names])
    layer = torch.repeat_interleave(torch.arange(len(names)), sizes)
    # each tile's rank within its own layer, least salient first: the tiles a layer may give up are its first caps
    rank = torch.empty_like(layer)
    offset = 0
    for i, size in enumerate(sizes.tolist()):
        rank[offset : offset + size] = scores[names[i]].flatten().cpu().argsort(stable=True).argsort()
        offset += size
    eligible = rank < caps[layer]
    order = flat.masked_fill(~eligible, float("inf")).argsort(stable=True)[:wanted]
    pruned = torch.bincount(layer[order], minlength=len(names))
    return {name: pruned[i].item() / sizes[i].item() for i, name in enumerate(names)}


def per_layer_config(config: SparsityConfig, sparsities: dict[str, float]) -> SparsityConfig:
    """``config`` with one sparsity per layer (patterns matching each full name exactly)."""
    mapping = {f"re:^{re.escape(name)}$": value for name, value in sparsities.items()}
    return dataclasses.replace(config, sparsity=mapping)
