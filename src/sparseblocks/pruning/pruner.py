"""Choosing the tiles a model keeps: block scores, a sparsity schedule, and a pruner for any training loop.

::

    pruner = Pruner(model, SparsityConfig(0.9, 32, "mlp"), method="magnitude", schedule=CubicSchedule(0, 1000, 50))
    for tokens, targets in data:
        loss = model(tokens, targets); loss.backward()
        pruner.observe_gradients()          # only for method="fisher"
        optimizer.step(); optimizer.zero_grad()
        pruner.step()                       # raises sparsity on schedule, keeps pruned tiles at zero
    report = pruner.finalize()              # BlockSparseLinear modules with the final masks

While pruning, the targeted ``nn.Linear`` stay dense and their pruned tiles are held at zero (masked dense
training: the pattern still changes). The methods (:func:`~sparseblocks.pruning.strategies.methods`): every score
of :data:`~sparseblocks.pruning.scores.SCORES`, per ``(bn, bk)`` tile of a weight W,

* ``magnitude``: ‖W_tile‖₂.
* ``activation_magnitude`` (Wanda-style): ‖W_tile · diag(‖x_j‖₂)‖₂, with input-feature norms from calibration
  batches run under :meth:`Pruner.observe_inputs`.
* ``fisher`` (oBERT-style, damped diagonal): Σ_tile w² (F + λ) / 2 with the empirical Fisher F the mean squared
  gradient over the batches seen by :meth:`Pruner.observe_gradients`: the loss increase of removing the tile.

and the strategies of :data:`~sparseblocks.pruning.strategies.STRATEGIES`:

* ``prune_grow`` (blocked RigL): magnitude to reach the schedule's sparsity; then at every later update, the
  ``regrow_fraction`` (decaying with a cosine to zero at the schedule's end) of kept tiles with the smallest
  magnitude are dropped and as many pruned tiles with the largest dense-gradient norm (from
  :meth:`Pruner.observe_gradients`) grow back, at zero, with their optimizer state reset.
* ``supermask`` (superblock): the targets become :class:`~sparseblocks.nn.supermask.SupermaskLinear`, whose
  trainable block scores (starting at the tile norms) pick the kept tiles in every forward; the schedule ramps
  their sparsity. Build the optimizer *after* the pruner, so that it trains the scores too.

With ``SparsityConfig(0.5, pattern="2:4")`` (a :mod:`layout <sparseblocks.integrations.layouts>` whose pattern
fixes the density) the scores are taken per weight and the mask keeps the 2 best of every 4 along a row (NVIDIA's
ASP recipe: prune once, at the schedule's first update, then train with the mask held fixed); :meth:`Pruner.finalize`
leaves :class:`~sparseblocks.nn.SemiStructuredLinear`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from sparseblocks.integrations.distributed.tensors import full_tensor, is_sharded, process_group_of
from sparseblocks.integrations.layouts import get_layout
from sparseblocks.integrations.sparsify import SparsifyReport, SparsityConfig, replace_module, sparsify, target_linears
from sparseblocks.masks import blocks_to_keep, top_blocks_mask
from sparseblocks.nn.linear import dense_linear, trainable_as
from sparseblocks.pruning.strategies import methods, regrow, strategy_for


def __getattr__(name: str):
    # METHODS, kept for imports of old: every Pruner method, read from the registries when asked for
    if name == "METHODS":
        return methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class CubicSchedule:
    """Gradual pruning (Zhu & Gupta): ``s_t = s_f + (s_0 - s_f)(1 - p)^3`` with p the progress from ``start`` to
    ``end`` steps; masks are recomputed every ``every`` steps in between (and at ``end``)."""

    start: int = 0
    end: int = 0
    every: int = 1
    initial: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end or self.every < 1:
            raise ValueError(f"a schedule needs 0 <= start <= end and every >= 1, got {self}")
        if not 0.0 <= self.initial < 1.0:
            raise ValueError(f"the initial sparsity must be in [0, 1), got {self.initial}")

    def sparsity(self, step: int, final: float) -> float:
        if step >= self.end:
            return final
        progress = max(0.0, (step - self.start) / max(self.end - self.start, 1))
        return final + (self.initial - final) * (1.0 - progress) ** 3

    def updates_at(self, step: int) -> bool:
        return step == self.end or (self.start <= step < self.end and (step - self.start) % self.every == 0)


class Pruner:
    """Prunes the linears a :class:`SparsityConfig` targets, in place, by ``method`` (one of
    :func:`~sparseblocks.pruning.strategies.methods`; its :class:`~sparseblocks.pruning.strategies.PruningStrategy`
    is :attr:`strategy`, the config's layout :attr:`layout`).

    schedule: a :class:`CubicSchedule` for gradual pruning, or None to prune on the first :meth:`step`.
    optimizer: for ``prune_grow``, whose state of regrown tiles is reset.
    allocation: ``"layer"`` gives each layer its configured sparsity; ``"global"`` ranks tiles across layers
    (each layer's scores divided by their mean, so layers of different scale compete fairly) to reach the
    configured sparsity overall. balanced: keep the same number of tiles in every block row (kernels like it).
    """

    def __init__(
        self,
        model: nn.Module,
        config: SparsityConfig,
        method: str = "magnitude",
        schedule: CubicSchedule | None = None,
        allocation: str = "layer",
        balanced: bool = False,
        damping: float = 1e-8,
        regrow_fraction: float = 0.3,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        strategy = strategy_for(method)
        if allocation not in ("layer", "global"):
            raise ValueError(f"allocation must be 'layer' or 'global', got {allocation!r}")
        if allocation == "global" and balanced:
            raise ValueError("balanced patterns need allocation='layer'")
        self.model, self.config, self.method, self.strategy = model, config, method, strategy
        self.schedule = schedule or CubicSchedule()
        if strategy.within_layer and (allocation != "layer" or balanced):
            raise ValueError(f"{method} works within each layer: use allocation='layer', balanced=False")
        self.allocation, self.balanced, self.damping = allocation, balanced, damping
        self.regrow_fraction, self.optimizer = regrow_fraction, optimizer
        self.layout = get_layout(config.pattern)
        if not self.layout.free_masks and (not strategy.scores_only or allocation != "layer" or balanced):
            scored = [name for name in methods() if strategy_for(name).scores_only]
            raise ValueError(
                f"the {self.layout.name} pattern takes {', '.join(scored[:-1])} or {scored[-1]}, per layer, unbalanced"
            )
        self.block = self.layout.mask_block(config.block_size)  # 2:4: blocks of one element
        self.layers = dict(target_linears(model, config))
        self.masks = {
            name: torch.ones(-(-w.out_features // self.block[0]), -(-w.in_features // self.block[1]),
                             dtype=torch.bool, device=w.weight.device)
            for name, w in self.layers.items()
        }  # fmt: skip
        self.input_sq: dict[str, torch.Tensor] = {}
        self.grad_sq: dict[str, torch.Tensor] = {}
        self.gradient_batches = 0
        self.step_count = 0
        strategy.prepare(self)

    # ------------------------------------------------------------------ statistics

    @contextlib.contextmanager
    def observe_inputs(self) -> Iterator[None]:
        """Within the block, forward passes add each target's squared input features (``activation_magnitude``)."""

        fresh: dict[str, torch.Tensor] = {}

        def hook(name):
            def accumulate(module, args):
                x = args[0].detach().reshape(-1, module.in_features).float()
                fresh[name] = fresh.get(name, 0) + x.square().sum(0)

            return accumulate

        handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in self.layers.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        for name, sums in fresh.items():  # sharded (FSDP2): every rank saw its own batches; sum them over ranks
            group = process_group_of(self.layers[name].weight)
            if group is not None:
                torch.distributed.all_reduce(sums, group=group)
            self.input_sq[name] = self.input_sq.get(name, 0) + sums

    def observe_gradients(self) -> None:
        """Add the targets' squared weight gradients (call after ``backward``; the ``fisher`` method needs it)."""
        for name, layer in self.layers.items():
            if layer.weight.grad is not None:  # sharded (FSDP2): the gradient reduced over ranks, gathered whole
                grad = full_tensor(layer.weight.grad.detach())
                self.grad_sq[name] = self.grad_sq.get(name, 0) + grad.float().square()
        self.gradient_batches += 1

    # ------------------------------------------------------------------ scores and masks

    def scores(self) -> dict[str, torch.Tensor]:
        """Each target's tile scores ``(N_blocks, K_blocks)`` (higher = keep), pruned tiles at -inf."""
        return self.strategy.scores(self)

    def update_masks(self, step: int | None = None) -> None:
        """Recompute every mask at the schedule's sparsity for ``step`` (default: the current step)."""
        self.strategy.update_masks(self, self.step_count if step is None else step)

    def choose_masks(self, scores: dict[str, torch.Tensor], step: int) -> None:
        """Set the masks from ``scores`` (pruned tiles at -inf) at the schedule's sparsity for ``step``, allocated
        per layer, balanced per block row, or across layers, as configured."""
        keep = {name: 1.0 - self.schedule.sparsity(step, self.config.sparsity_of(name)) for name in self.layers}
        if self.allocation == "global":
            total = sum(s.numel() for s in scores.values())
            wanted = round(sum(keep[n] * scores[n].numel() for n in scores))
            normalized = {}
            for name, score in scores.items():
                alive = score[torch.isfinite(score)]
                scale = alive.mean() if alive.numel() and alive.mean() > 0 else 1.0
                normalized[name] = score / scale
            kept = top_blocks_mask(torch.cat([s.flatten() for s in normalized.values()]), wanted / total)
            for name, part in zip(normalized, kept.split([s.numel() for s in normalized.values()]), strict=True):
                self.masks[name] = part.reshape(normalized[name].shape)
            return
        for name, score in scores.items():
            if self.balanced:
                per_row = blocks_to_keep(score.shape[1], keep[name])
                top = score.topk(per_row, dim=1).indices
                self.masks[name] = torch.zeros_like(score, dtype=torch.bool).scatter_(1, top, True)
            else:
                self.masks[name] = self.layout.select(score, keep[name])

    def apply_masks(self) -> None:
        """Zero the pruned tiles of every target (after each optimizer step, so pruned tiles stay pruned)."""
        self.strategy.apply_masks(self)

    def regrow(self) -> None:
        """Drop the weakest kept tiles and grow as many pruned ones with the largest gradient norm (prune_grow)."""
        regrow(self)

    def step(self) -> None:
        """One training step passed: update the masks when the schedule says so; keep pruned tiles at zero."""
        if self.schedule.updates_at(self.step_count):
            self.strategy.on_update(self)
        self.apply_masks()
        self.step_count += 1

    def sparsity(self) -> dict[str, float]:
        """The current fraction of pruned tiles per target."""
        return {name: 1.0 - mask.float().mean().item() for name, mask in self.masks.items()}

    def state_dict(self) -> dict:
        """What the pruner has learned while training (masks, input and gradient statistics, step count, Supermask's
        current sparsities), for checkpoints: tensors and plain values."""
        state = {
            "step_count": self.step_count,
            "gradient_batches": self.gradient_batches,
            "masks": dict(self.masks),
            "input_sq": dict(self.input_sq),
            "grad_sq": dict(self.grad_sq),
        }
        return {**state, **self.strategy.state(self)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`; raises ``ValueError`` when it prunes other layers."""
        if set(state["masks"]) != set(self.layers):
            raise ValueError(f"the state prunes {sorted(state['masks'])}, this pruner {sorted(self.layers)}")
        for name, mask in state["masks"].items():
            mine = self.masks[name]
            if not isinstance(mask, torch.Tensor) or mask.shape != mine.shape or mask.dtype != mine.dtype:
                shown = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(
                    f"the state's mask of {name} is {shown}, this pruner's {mine.dtype} {tuple(mine.shape)}"
                )
        devices = {name: layer.weight.device for name, layer in self.layers.items()}
        self.step_count, self.gradient_batches = state["step_count"], state["gradient_batches"]
        for field in ("masks", "input_sq", "grad_sq"):
            setattr(self, field, {name: t.to(devices[name]) for name, t in state[field].items()})
        self.strategy.load_state(self, state)

    def finalize(self) -> SparsifyReport:
        """Replace the targets by ``BlockSparseLinear`` (2:4: ``SemiStructuredLinear``) holding exactly the kept
        weights; returns the report."""
        self.strategy.finalize(self)
        self.apply_masks()
        for name, layer in self.layers.items():  # sharded (FSDP2): converted from the gathered weights
            if isinstance(layer, nn.Linear) and is_sharded(layer.weight):
                bias = None if layer.bias is None else full_tensor(layer.bias.detach())
                whole = dense_linear(full_tensor(layer.weight.detach()), bias)
                trainable_as((whole.weight, whole.bias), (layer.weight, layer.bias))
                replace_module(self.model, name, whole)
        return sparsify(self.model, self.config, masks=self.masks)


def trainer_callback(pruner: Pruner):
    """A Hugging Face ``TrainerCallback`` that calls ``pruner.step()`` after every optimizer step."""
    from transformers import TrainerCallback

    class PrunerCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            pruner.step()

    return PrunerCallback()
