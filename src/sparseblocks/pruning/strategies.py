"""Pruning strategies: what a :class:`~sparseblocks.pruning.pruner.Pruner` does differently per method.

Every score of :data:`~sparseblocks.pruning.scores.SCORES` is a method run by :class:`ScoreStrategy` (masks from the
score on the schedule); :data:`STRATEGIES` adds the methods that do more: ``prune_grow`` (:class:`PruneAndGrow`)
and ``supermask`` (:class:`Supermask`). :func:`strategy_for` picks one by method name; :func:`methods` lists them.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from sparseblocks.integrations.distributed.tensors import full_tensor, placed_like
from sparseblocks.integrations.sparsify import SparsityConfig, replace_module
from sparseblocks.masks import block_norms, block_sums, expand_block_mask
from sparseblocks.nn.supermask import SupermaskLinear
from sparseblocks.pruning.scores import SCORES, Statistics


class PrunerLike(Statistics, Protocol):
    """What strategies use of a :class:`~sparseblocks.pruning.pruner.Pruner` (a protocol: strategies are defined
    below the pruner that calls them)."""

    model: nn.Module
    config: SparsityConfig
    schedule: object  # CubicSchedule: sparsity(step, final), start, end
    layers: dict[str, nn.Module]
    masks: dict[str, torch.Tensor]
    block: tuple[int, int]
    regrow_fraction: float
    optimizer: torch.optim.Optimizer | None
    step_count: int

    def update_masks(self, step: int | None = None) -> None: ...

    def choose_masks(self, scores: dict[str, torch.Tensor], step: int) -> None: ...


class PruningStrategy:
    """The hooks the Pruner's loop calls; the defaults are plain masked dense training from a score."""

    needs: tuple[str, ...] = ()  # statistics the training loop must gather: "inputs", "gradients"
    within_layer = False  # masks are chosen within each layer only (allocation="layer", unbalanced)
    scores_only = False  # masks come from one score alone: what a fixed-density layout (2:4) can take

    def __init__(self, method: str) -> None:
        self.method = method

    def prepare(self, pruner: PrunerLike) -> None:
        """Once, when the pruner is built (its masks exist, all kept)."""

    def scores(self, pruner: PrunerLike) -> dict[str, torch.Tensor]:
        """Each target's cell scores ``(N_blocks, K_blocks)`` (higher = keep), pruned cells at -inf."""
        raise NotImplementedError

    def update_masks(self, pruner: PrunerLike, step: int) -> None:
        """Recompute every mask at the schedule's sparsity for ``step``."""
        pruner.choose_masks(self.scores(pruner), step)

    def on_update(self, pruner: PrunerLike) -> None:
        """A step at which the schedule updates the masks."""
        pruner.update_masks()

    @torch.no_grad()
    def apply_masks(self, pruner: PrunerLike) -> None:
        """Zero the pruned cells of every target."""
        for name, layer in pruner.layers.items():
            kept = expand_block_mask(pruner.masks[name], pruner.block, layer.weight.shape)
            layer.weight.mul_(placed_like(kept.to(layer.weight.dtype), layer.weight))  # sharded: this rank's part

    def state(self, pruner: PrunerLike) -> dict:
        """What :meth:`Pruner.state_dict` saves beyond masks and statistics."""
        return {}

    def load_state(self, pruner: PrunerLike, state: dict) -> None:
        """Restore what :meth:`state` saved."""

    def finalize(self, pruner: PrunerLike) -> None:
        """Before the masks are applied a last time and the targets converted."""


class ScoreStrategy(PruningStrategy):
    """Masks from a registered score (the method's name) at the schedule's sparsity."""

    scores_only = True

    def __init__(self, method: str, score: str | None = None) -> None:
        super().__init__(method)
        self.score = SCORES[score or method]
        self.needs = self.score.needs

    def scores(self, pruner):
        out = {}
        for name, layer in pruner.layers.items():
            weight = full_tensor(layer.weight.detach()).float()  # sharded (FSDP2): gathered, the same on every rank
            score = self.score.function(name, weight, pruner.block, pruner)
            out[name] = score.masked_fill(~pruner.masks[name], float("-inf"))
        return out

    def update_masks(self, pruner, step):
        scores = self.scores(pruner)
        if "gradients" in self.score.needs:  # each update uses the gradients gathered since the previous one
            pruner.grad_sq.clear()
            pruner.gradient_batches = 0
        pruner.choose_masks(scores, step)


class PruneAndGrow(ScoreStrategy):
    """Blocked RigL: magnitude to reach the schedule's sparsity; at every later update, swap the weakest kept tiles
    for the pruned ones of largest dense-gradient norm (:func:`regrow`)."""

    needs = ("gradients",)
    within_layer = True
    scores_only = False

    def __init__(self, method: str) -> None:
        super().__init__(method, score="magnitude")
        self.needs = PruneAndGrow.needs  # regrow's, not magnitude's

    def on_update(self, pruner):
        grown_before = pruner.step_count > pruner.schedule.start
        pruner.update_masks()
        if grown_before:
            regrow(pruner)


def regrow(pruner: PrunerLike) -> None:
    """Drop the weakest kept tiles and grow as many pruned ones with the largest gradient norm, the fraction
    (``regrow_fraction``) decaying with a cosine to zero at the schedule's end; grown weights restart at zero."""
    if not pruner.grad_sq:
        raise RuntimeError("prune_grow needs gradients: call observe_gradients() after backward passes")
    schedule = pruner.schedule
    progress = (pruner.step_count - schedule.start) / max(schedule.end - schedule.start, 1)
    fraction = pruner.regrow_fraction * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    for name, layer in pruner.layers.items():
        mask = pruner.masks[name]
        swaps = min(int(fraction * mask.sum().item()), int((~mask).sum().item()))
        if swaps == 0:
            continue
        weight = full_tensor(layer.weight.detach())
        magnitude = block_norms(weight, pruner.block).masked_fill(~mask, float("inf"))
        growth = block_sums(pruner.grad_sq[name], pruner.block).masked_fill(mask, float("-inf"))
        dropped = magnitude.flatten().topk(swaps, largest=False).indices
        grown = growth.flatten().topk(swaps).indices
        flat = mask.flatten().clone()
        flat[dropped], flat[grown] = False, True
        pruner.masks[name] = flat.view_as(mask)
        _restart(layer, expand_block_mask(~mask & pruner.masks[name], pruner.block, layer.weight.shape), pruner)
    pruner.grad_sq.clear()
    pruner.gradient_batches = 0


@torch.no_grad()
def _restart(layer: nn.Linear, grown: torch.Tensor, pruner: PrunerLike) -> None:
    """Grown weights start at zero, and without the optimizer moments they gathered while pruned."""
    grown = placed_like(grown, layer.weight)  # sharded (FSDP2): weight and moments are DTensors placed alike
    layer.weight.masked_fill_(grown, 0)
    optimizer = pruner.optimizer
    if optimizer is None or layer.weight not in optimizer.state:
        return
    for value in optimizer.state[layer.weight].values():
        if isinstance(value, torch.Tensor) and value.shape == layer.weight.shape:
            value.masked_fill_(grown, 0)


class Supermask(PruningStrategy):
    """superblock: the targets become :class:`~sparseblocks.nn.supermask.SupermaskLinear`, whose trainable block
    scores pick the kept tiles in every forward; the schedule ramps their sparsity; folded to plain weights at the
    end."""

    within_layer = True

    def prepare(self, pruner):
        for name, linear in list(pruner.layers.items()):
            initial = pruner.schedule.sparsity(0, pruner.config.sparsity_of(name))
            pruner.layers[name] = SupermaskLinear(linear, pruner.block, initial)
            replace_module(pruner.model, name, pruner.layers[name])

    def scores(self, pruner):
        return {name: full_tensor(layer.scores.detach()).float() for name, layer in pruner.layers.items()}

    def update_masks(self, pruner, step):
        # the scores choose the tiles in each forward; the schedule sets how many
        for name, layer in pruner.layers.items():
            layer.sparsity = pruner.schedule.sparsity(step, pruner.config.sparsity_of(name))
            pruner.masks[name] = layer.block_mask()

    def apply_masks(self, pruner):
        """Nothing: its forward masks; the weights under pruned tiles may come back."""

    def state(self, pruner):
        return {"sparsity": {name: layer.sparsity for name, layer in pruner.layers.items()}}

    def load_state(self, pruner, state):
        for name, sparsity in state.get("sparsity", {}).items():
            pruner.layers[name].sparsity = sparsity

    def finalize(self, pruner):
        pruner.update_masks()
        for name, layer in list(pruner.layers.items()):
            pruner.layers[name] = layer.to_linear()
            replace_module(pruner.model, name, pruner.layers[name])


STRATEGIES: dict[str, type[PruningStrategy]] = {"prune_grow": PruneAndGrow, "supermask": Supermask}


def register_strategy(name: str, strategy: type[PruningStrategy]) -> None:
    """Make ``strategy`` the Pruner's method ``name`` (a plain score needs none: :func:`register_score` suffices)."""
    if name in STRATEGIES or name in SCORES:
        raise ValueError(f"a pruning method named {name!r} is registered already")
    STRATEGIES[name] = strategy


def methods() -> tuple[str, ...]:
    """Every Pruner method: the registered scores, then the strategies."""
    return (*SCORES, *(name for name in STRATEGIES if name not in SCORES))


def strategy_for(method: str) -> PruningStrategy:
    """A new strategy for ``method``; ``ValueError`` naming the known methods otherwise."""
    if not isinstance(method, str) or method not in methods():
        raise ValueError(f"method must be one of {methods()}, got {method!r}")
    return STRATEGIES[method](method) if method in STRATEGIES else ScoreStrategy(method)
