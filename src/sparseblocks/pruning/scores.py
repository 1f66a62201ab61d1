"""Block scores: one signature, one table (:data:`SCORES`). Each score is a Pruner method of its own.

A score maps a weight ``(N, K)`` (float32) to one number per ``(bn, bk)`` cell, ``(ceil(N/bn), ceil(K/bk))``,
higher = keep, from the statistics a :class:`~sparseblocks.pruning.pruner.Pruner` gathered. A new score::

    @register_score("my_score", needs=("inputs",))
    def my_score(name, weight, block, stats): ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from sparseblocks.masks import block_norms, block_sums

NEEDS = ("inputs", "gradients")  # what a score may need: observe_inputs batches, observe_gradients after backward


class Statistics(Protocol):
    """What a score may read (the Pruner has these): per layer name, the summed squared input features ``(K,)`` and
    the summed squared weight gradients ``(N, K)`` over ``gradient_batches`` batches; the Fisher ``damping``."""

    input_sq: dict[str, torch.Tensor]
    grad_sq: dict[str, torch.Tensor]
    gradient_batches: int
    damping: float


ScoreFunction = Callable[[str, torch.Tensor, tuple[int, int], Statistics], torch.Tensor]


@dataclass(frozen=True)
class Score:
    """A scoring function and the statistics it needs (``NEEDS``). One that needs gradients uses those gathered
    since the previous mask update: the Pruner clears them after each update."""

    function: ScoreFunction
    needs: tuple[str, ...] = ()


SCORES: dict[str, Score] = {}


def register_score(name: str, needs: tuple[str, ...] = ()) -> Callable[[ScoreFunction], ScoreFunction]:
    """Decorator: add ``function(name, weight, block, stats) -> scores`` to :data:`SCORES` as ``name``."""
    if unknown := set(needs) - set(NEEDS):
        raise ValueError(f"a score needs some of {NEEDS}, got {sorted(unknown)}")

    def register(function: ScoreFunction) -> ScoreFunction:
        if name in SCORES:
            raise ValueError(f"a score named {name!r} is registered already")
        SCORES[name] = Score(function, tuple(needs))
        return function

    return register


@register_score("magnitude")
def magnitude(name: str, weight: torch.Tensor, block: tuple[int, int], stats: Statistics) -> torch.Tensor:
    """‖W_tile‖₂."""
    return block_norms(weight, block)


@register_score("activation_magnitude", needs=("inputs",))
def activation_magnitude(name: str, weight: torch.Tensor, block: tuple[int, int], stats: Statistics) -> torch.Tensor:
    """Wanda-style ‖W_tile · diag(‖x_j‖₂)‖₂, the input-feature norms from calibration batches."""
    if name not in stats.input_sq:
        raise RuntimeError(
            f"activation_magnitude has no inputs of {name}: run calibration batches under observe_inputs()"
        )
    return block_norms(weight * stats.input_sq[name].sqrt()[None, :], block)


@register_score("fisher", needs=("gradients",))
def fisher(name: str, weight: torch.Tensor, block: tuple[int, int], stats: Statistics) -> torch.Tensor:
    """oBERT-style damped diagonal Fisher: Σ_tile w² (F + λ) / 2, the loss increase of removing the tile."""
    if name not in stats.grad_sq:
        raise RuntimeError(
            f"fisher has no gradient of {name}: call observe_gradients() after backward passes, and "
            "leave out layers the loss does not reach (e.g. a pooler)"
        )
    empirical = stats.grad_sq[name] / stats.gradient_batches + stats.damping
    return block_sums(weight.square() * empirical / 2, block)
