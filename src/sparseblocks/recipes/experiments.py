"""The pruning experiment on real text: a character GPT on tinyshakespeare, every method at the same steps and seed.

Protocol (all methods train ``steps`` steps from the same initialisation on the same batches):

* ``dense``: no pruning. ``dense_iso_params``: a narrower MLP with as many weights as the sparse MLP keeps.
* ``magnitude`` and ``activation_magnitude``: dense until ``prune_start``, then pruned at once (the latter after
  ``calibration_batches`` batches of input statistics), then trained masked.
* ``gradual_magnitude`` and ``fisher``: cubic schedule from ``prune_start`` to ``prune_end``, ten mask updates
  (fisher from the gradients of the steps since the previous update).
* ``prune_grow``: magnitude at ``prune_start``, then tile swaps every ``regrow_every`` steps until ``prune_end``.
* ``supermask``: block scores trained from the first step, sparsity ramped until ``prune_end``.
* ``magnitude_2_4`` and ``activation_magnitude_2_4`` (sparsity 0.5 only): the 2:4 pattern, chosen per weight at
  ``prune_start`` as the one-shot methods do, then trained masked (NVIDIA's ASP recipe).

Pruned models are converted to ``BlockSparseLinear`` at the end; the validation loss is of that converted model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparseblocks.integrations.layouts import get_layout
from sparseblocks.integrations.sparsify import SparsifyReport, SparsityConfig
from sparseblocks.pruning.pruner import CubicSchedule, Pruner
from sparseblocks.recipes.gpt import GPT, CharData, GPTConfig

# experiment method -> (Pruner method, schedule of _schedule, SparsityConfig pattern); the Pruner methods and the
# patterns are those of the pruning and layout registries
PLANS: dict[str, tuple[str, str, str]] = {
    "magnitude": ("magnitude", "one_shot", "block"),
    "activation_magnitude": ("activation_magnitude", "one_shot", "block"),
    "supermask": ("supermask", "ramp", "block"),
    "gradual_magnitude": ("magnitude", "gradual", "block"),
    "prune_grow": ("prune_grow", "regrow", "block"),
    "fisher": ("fisher", "gradual", "block"),
    "magnitude_2_4": ("magnitude", "one_shot", "2:4"),
    "activation_magnitude_2_4": ("activation_magnitude", "one_shot", "2:4"),
}
METHODS = ("dense", "dense_iso_params", *PLANS)
# the methods whose pattern fixes the density (2:4): sparsity 0.5 only, no block
TWO_OF_FOUR = tuple(name for name, plan in PLANS.items() if not get_layout(plan[2]).free_masks)
CURVE_EVERY = 100  # each row's train_curve holds the mean training loss of every CURVE_EVERY steps


@dataclass(frozen=True)
class Experiment:
    """Model and training settings shared by every run (nanoGPT's shakespeare-char model by default).

    Without dropout the dense model overfits the 1M training characters within 3000 steps (train loss 0.12,
    validation 3.33 on an H200), so the default keeps nanoGPT's 0.2.
    """

    layers: int = 6
    heads: int = 6
    width: int = 384
    context: int = 256
    dropout: float = 0.2
    batch_size: int = 64
    steps: int = 3000
    lr: float = 1e-3
    beta2: float = 0.99  # nanoGPT's for this model; AdamW's 0.999 adapts slowly to the jump in gradients at a prune
    seed: int = 0
    eval_batches: int = 40
    prune_start: float = 0.25
    prune_end: float = 0.75
    regrow_every: int = 100
    calibration_batches: int = 8


def _schedule(kind: str, sparsity: float, experiment: Experiment) -> CubicSchedule:
    """The protocol's schedules (module docstring): pruned at once at ``prune_start``, gradually until ``prune_end``
    (ten updates), regrown every ``regrow_every`` steps in between, or Supermask's ramp from the first step."""
    start, end = round(experiment.prune_start * experiment.steps), round(experiment.prune_end * experiment.steps)
    if kind == "one_shot":
        return CubicSchedule(start=start, end=start)
    if kind == "gradual":
        return CubicSchedule(start=start, end=end, every=max(1, (end - start) // 10))
    if kind == "regrow":
        return CubicSchedule(start=start, end=end, every=experiment.regrow_every, initial=sparsity)
    return CubicSchedule(start=0, end=end)


def _pruner(method: str, model: GPT, sparsity: float, block: int, experiment: Experiment) -> Pruner:
    scoring, schedule, pattern = PLANS[method]
    if method in TWO_OF_FOUR:
        config = SparsityConfig(0.5, targets="mlp", pattern=pattern)
    else:
        config = SparsityConfig(sparsity, block, targets="mlp", pattern=pattern)
    return Pruner(model, config, method=scoring, schedule=_schedule(schedule, sparsity, experiment))


@torch.no_grad()
def validation_loss(model: GPT, data: CharData, experiment: Experiment, device: torch.device) -> float:
    """Mean loss over ``eval_batches`` fixed validation windows."""
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(experiment.eval_batches):
        tokens, targets = data.batch("val", experiment.batch_size, experiment.context, generator, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses.append(model(tokens, targets)[1].item())
    model.train()
    return sum(losses) / len(losses)


class PruningRun:
    """One method's training run, a step at a time: :func:`run` drives it to the end; ``sparseblocks train gpt``
    also checkpoints it between steps (:meth:`state` names every object that changes while it trains).

    ``device`` defaults to CUDA when available. After ``experiment.steps`` calls of :meth:`train_step`,
    :meth:`finish` converts the pruned MLPs to ``BlockSparseLinear`` and returns the result row.
    """

    def __init__(
        self, method: str, sparsity: float, block: int | None, data: CharData, experiment: Experiment,
        device: torch.device | None = None,
    ) -> None:  # fmt: skip
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method, self.sparsity, self.block, self.data, self.experiment = method, sparsity, block, data, experiment
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        hidden = 4 * experiment.width
        if method == "dense_iso_params":
            hidden = max(1, round(hidden * (1.0 - sparsity)))
        self.config = GPTConfig(vocab_size=data.vocab_size, context=experiment.context, layers=experiment.layers,
                                heads=experiment.heads, width=experiment.width, mlp_hidden=hidden,
                                dropout=experiment.dropout)  # fmt: skip
        torch.manual_seed(experiment.seed)
        self.model = GPT(self.config).to(self.device)
        self.pruner = None if method.startswith("dense") else _pruner(method, self.model, sparsity, block, experiment)
        self.optimizer = torch.optim.AdamW(  # after the pruner: Supermask's scores are parameters too
            self.model.parameters(), lr=experiment.lr, betas=(0.9, experiment.beta2), weight_decay=0.1
        )
        if self.pruner is not None:
            self.pruner.optimizer = self.optimizer
        self.generator = torch.Generator().manual_seed(experiment.seed)
        self.losses = torch.zeros(experiment.steps, device=self.device)  # read once at the end: no sync per step
        self.step, self.steps = 0, experiment.steps
        self.report: SparsifyReport | None = None

    def state(self) -> dict[str, object]:
        """What changes during training (the global RNG aside, which dropout draws from), by name."""
        return {"model": self.model, "optimizer": self.optimizer, "pruner": self.pruner,
                "batches": self.generator, "losses": self.losses}  # fmt: skip

    def train_step(self) -> torch.Tensor:
        """One optimizer step (and pruner step); returns the batch's loss, a detached scalar tensor (no sync)."""
        experiment, data, device, step = self.experiment, self.data, self.device, self.step
        model, optimizer, pruner = self.model, self.optimizer, self.pruner
        warmup = max(1, experiment.steps // 20)
        for group in optimizer.param_groups:  # linear warm-up, cosine decay to a tenth
            progress = step / experiment.steps
            scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
            group["lr"] = experiment.lr * scale
        tokens, targets = data.batch("train", experiment.batch_size, experiment.context, self.generator, device)
        if pruner is not None and "inputs" in pruner.strategy.needs and pruner.schedule.updates_at(step):
            with pruner.observe_inputs(), torch.no_grad():
                for _ in range(experiment.calibration_batches):
                    model(*data.batch("train", experiment.batch_size, experiment.context, self.generator, device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(tokens, targets)[1]
        self.losses[step] = loss.detach()
        loss.backward()
        if pruner is not None and "gradients" in pruner.strategy.needs:
            pruner.observe_gradients()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if pruner is not None:
            pruner.step()
        self.step += 1
        return self.losses[step]

    def finish(self) -> dict:
        """Convert the pruned MLPs to ``BlockSparseLinear`` (the report lands in :attr:`report`) and return the row:
        validation loss of the converted model, steps, seed, MLP weights kept."""
        if self.pruner is not None:
            self.report = self.pruner.finalize()
        mlp_weights = sum(
            p.numel()
            for block_ in self.model.blocks
            for n, p in block_.mlp.named_parameters()
            if not n.endswith("bias")
        )
        experiment = self.experiment
        return {"method": self.method, "sparsity": self.sparsity, "block": self.block,
                "val_loss": validation_loss(self.model, self.data, experiment, self.device),
                "train_loss_last": self.losses[self.step - 1].item(),
                "train_curve": [round(chunk.mean().item(), 4) for chunk in self.losses.split(CURVE_EVERY)],
                "steps": experiment.steps, "seed": experiment.seed, "mlp_weights": mlp_weights}  # fmt: skip


def run(method: str, sparsity: float, block: int | None, data: CharData, experiment: Experiment) -> dict:
    """Train one model by ``method`` and return its row: validation loss, steps, seed, MLP weights kept."""
    training = PruningRun(method, sparsity, block, data, experiment)
    while training.step < training.steps:
        training.train_step()
    return training.finish()


def grid(
    sparsities: tuple[float, ...], blocks: tuple[int, ...], extra_blocks: tuple[int, ...] = (), extra_at: float = 0.9
) -> list[tuple[str, float, int | None]]:
    """The runs, as (method, sparsity, block): dense once; per sparsity, the iso-parameter dense model and every
    pruning method at each of ``blocks``, plus ``extra_blocks`` at sparsity ``extra_at``; the 2:4 methods at 0.5."""
    runs: list[tuple[str, float, int | None]] = [("dense", 0.0, None)]
    for sparsity in sparsities:
        runs.append(("dense_iso_params", sparsity, None))
        sizes = blocks + (extra_blocks if sparsity == extra_at else ())
        runs += [(method, sparsity, block) for block in sizes for method in METHODS[2:] if method not in TWO_OF_FOUR]
        if sparsity == 0.5:
            runs += [(method, sparsity, None) for method in TWO_OF_FOUR]
    return runs
