"""Recovery by distillation (``sparseblocks distill``): prune a Hugging Face model gradually while it learns to
match its dense self.

::

    result = distill("path/to/model", "train.txt", "out/", DistillConfig(sparsity=0.7, block=32, steps=1000))

* teacher: the dense model, frozen (``teacher_dtype`` bf16 halves its memory; ``teacher_device`` puts it elsewhere);
  student: a copy whose targets the :class:`~sparseblocks.pruning.pruner.Pruner` prunes on the cubic schedule over
  the first ``prune_fraction`` of the steps (0: one shot before training), by ``method`` (a score, or
  ``prune_grow``).
* losses by the model's head: causal and masked LMs, the KL divergence of the logits (temperature ``temperature``)
  plus every layer's hidden states, MSE divided by the teacher's variance of that layer (SquareHead); encoders
  (sentence-transformers folders, bare ``*Model``), 1 − cosine of the pooled embeddings plus the same per-layer
  term. Each term is weighted, recorded and shown on the progress bar. ``teacher=False``: plain fine-tuning on the
  model's own loss instead (causal and masked LMs), the baseline distillation is compared with.
* AdamW, linear warm-up and cosine decay, gradient accumulation, gradient clipping, bf16 autocast on GPUs;
  checkpoints and ``resume`` through :func:`~sparseblocks.recipes.training.run_training` (bitwise on the CPU).
* before training, ``calibration`` windows give each target's Fisher (the model's own loss; an encoder's is the
  unit-Gaussian one of :mod:`~sparseblocks.integrations.huggingface`): the scores of ``method="fisher"`` until the
  first tiles are pruned (while the student equals the teacher the distillation loss has zero gradient), the
  per-layer sparsities of ``allocation="sensitivity"`` (:mod:`~sparseblocks.pruning.allocation`) and the saliency
  that ``permute`` gathers into tiles (:mod:`~sparseblocks.pruning.permutation`).
* at the end: the sparse modules (``fuse_mlp``: fused MLPs), the held-out metric before and after (perplexity,
  masked-LM loss on a fixed 15% of the tokens, or embedding cosine to the teacher), a folder written by
  :func:`~sparseblocks.integrations.huggingface.save_hf_sparse`, ``distill.json`` (schema-1 result: settings,
  metrics, per-layer sparsity, the curve) and ``distill.png``.

Data: the text is tokenized by the folder's tokenizer and packed into windows of ``seq_len`` tokens (with the
tokenizer's special tokens around each); without ``eval_text`` the last ``held_out`` of the tokens are held out.

Known limits (2026-12): the whole text is tokenized in memory; windows are not padded (one length); pipeline or
tensor parallelism is not supported; the final folder is written beside the checkpoint, which stays (delete it
when done).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparseblocks.integrations.huggingface import (
    MASKED_FRACTION,
    _fisher_loss,
    _special_tokens,
    load_pretrained,
    save_hf_sparse,
)
from sparseblocks.integrations.sparsify import (
    LINEAR_LIKE,
    SparsityConfig,
    _layout_key,
    as_linear,
    model_size,
    replace_module,
    target_linears,
)
from sparseblocks.masks import block_sums
from sparseblocks.pruning.allocation import per_layer_config, sensitivity_allocation
from sparseblocks.pruning.permutation import permute_mlps, permute_tensor
from sparseblocks.pruning.pruner import CubicSchedule, Pruner
from sparseblocks.recipes.training import run_training

logger = logging.getLogger("sparseblocks")

METHODS = ("fisher", "activation_magnitude", "magnitude", "prune_grow")
ALLOCATIONS = ("uniform", "global", "sensitivity")
RESULT_FILE, PLOT_FILE = "distill.json", "distill.png"
TERMS = ("loss", "kl", "hidden", "cosine", "task")  # columns of the curve; a run fills those of its head


@dataclass(frozen=True)
class DistillConfig:
    """The settings of a distillation run (see the module docstring). ``targets``: comma-separated presets, globs
    or ``re:`` patterns. ``prune_every``: steps between mask updates (0: a fiftieth of the pruning steps).
    ``eval_every``: steps between held-out evaluations (0: a tenth of the steps)."""

    sparsity: float = 0.7
    block: int = 32
    targets: str = "mlp"
    exclude: str = ""
    method: str = "fisher"
    allocation: str = "uniform"
    permute: bool = False
    steps: int = 1000
    prune_fraction: float = 0.5
    prune_every: int = 0
    batch_size: int = 8
    seq_len: int = 128
    accumulation: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.05
    clip: float = 1.0
    logits_weight: float = 1.0
    hidden_weight: float = 1.0
    cosine_weight: float = 1.0
    temperature: float = 1.0
    teacher: bool = True
    teacher_dtype: str = "float32"
    held_out: float = 0.1
    eval_windows: int = 64
    eval_every: int = 0
    calibration: int = 16
    dropout: bool = False
    fuse_mlp: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"sparsity must lie in (0, 1), got {self.sparsity}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.method == "prune_grow" and self.allocation != "uniform":
            raise ValueError("prune_grow chooses tiles within each layer: use allocation 'uniform'")
        counts = {"steps": self.steps, "batch_size": self.batch_size, "accumulation": self.accumulation,
                  "eval_windows": self.eval_windows, "calibration": self.calibration}  # fmt: skip
        if bad := [f"{name}={value}" for name, value in counts.items() if value < 1]:
            raise ValueError(f"{', '.join(bad)}: must be at least 1")
        if self.seq_len < 4 or self.prune_every < 0 or self.eval_every < 0:
            raise ValueError("seq_len must be at least 4, prune_every and eval_every at least 0")
        if not (0.0 <= self.prune_fraction <= 1.0 and 0.0 <= self.warmup < 1.0 and 0.0 < self.held_out < 1.0):
            raise ValueError("prune_fraction must lie in [0, 1], warmup in [0, 1), held_out in (0, 1)")
        if not (self.lr > 0 and self.clip >= 0 and self.temperature > 0):
            raise ValueError("lr and temperature must be positive, clip at least 0 (0: no clipping)")
        if self.teacher_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"teacher_dtype must be float32, bfloat16 or float16, got {self.teacher_dtype!r}")

    @property
    def prune_steps(self) -> int:
        return round(self.prune_fraction * self.steps)

    @property
    def update_every(self) -> int:
        return self.prune_every or max(1, self.prune_steps // 50)

    @property
    def evaluate_every(self) -> int:
        return self.eval_every or max(1, self.steps // 10)


# ---------------------------------------------------------------------------------------------- data


def _special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (``[CLS]``/``[SEP]``, ``<s>``), found from one word."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare) :]
    return [], []


def text_windows(text: str, tokenizer, seq_len: int, what: str = "text") -> torch.Tensor:
    """``(windows, seq_len)``: ``text`` tokenized and packed, each window the tokenizer's special tokens around
    consecutive tokens. Raises ``ValueError`` when it holds fewer tokens than one window."""
    prefix, suffix = _special_affixes(tokenizer)
    content = seq_len - len(prefix) - len(suffix)
    if content < 2:
        raise ValueError(f"seq_len {seq_len} leaves no room beside the tokenizer's {len(prefix) + len(suffix)} "
                         "special tokens")  # fmt: skip
    lines = text.splitlines(keepends=True)
    ids: list[int] = []
    for start in range(0, len(lines), 2000):  # in pieces: tokenizers warn about (and truncate) very long inputs
        ids += tokenizer("".join(lines[start : start + 2000]), add_special_tokens=False, verbose=False)["input_ids"]
    count = len(ids) // content
    if count < 1:
        raise ValueError(f"the {what} holds {len(ids)} tokens, fewer than one window of {content} (--seq-len "
                         f"{seq_len} with {seq_len - content} special tokens)")  # fmt: skip
    body = torch.tensor(ids[: count * content]).view(count, content)
    return torch.cat(
        [
            torch.tensor(prefix, dtype=torch.long).expand(count, -1),
            body,
            torch.tensor(suffix, dtype=torch.long).expand(count, -1),
        ],
        1,
    )


@dataclass
class DistillData:
    """Packed windows: ``train`` and ``held`` ``(windows, seq_len)``, and a description of where each came from."""

    train: torch.Tensor
    held: torch.Tensor
    origin: str


def load_data(
    data: str | Path,
    eval_text: str | Path | None,
    tokenizer,
    vocab_size: int,
    config: DistillConfig,
    allow_random_ids: bool = False,
) -> DistillData:
    """The training and held-out windows of the text files (see the module docstring). Without a tokenizer:
    ``ValueError`` unless ``allow_random_ids`` (then random ids of the vocabulary, as many windows as the text's
    characters would make at four per token, which describe no real text)."""
    text = Path(data).read_text(encoding="utf-8", errors="replace")
    held_text = None
    if eval_text is not None:
        held_text = Path(eval_text).read_text(encoding="utf-8", errors="replace")
        if Path(eval_text).resolve() == Path(data).resolve() or held_text == text:
            message = (
                f"sparseblocks: --eval {eval_text} is the training text: the held-out metric measures nothing held out"
            )
            logger.warning(message)
            warnings.warn(message, UserWarning, stacklevel=2)
    if tokenizer is None:
        if not allow_random_ids:
            raise ValueError("the model folder has no tokenizer (tokenizer.json, vocab.txt, ...): add one, or pass "
                             "--allow-random-ids to train on random token ids (no real text)")  # fmt: skip
        warnings.warn("sparseblocks: no tokenizer: training on random token ids", UserWarning, stacklevel=2)
        generator = torch.Generator().manual_seed(config.seed)
        count = max(2, len(text) // (4 * config.seq_len))
        windows = torch.randint(vocab_size, (count, config.seq_len), generator=generator)
        split = max(1, round(config.held_out * count))
        return DistillData(windows[:-split], windows[-split:], "random token ids (no tokenizer)")
    windows = text_windows(text, tokenizer, config.seq_len, f"training text {data}")
    if held_text is not None:
        held = text_windows(held_text, tokenizer, config.seq_len, f"held-out text {eval_text}")
        return DistillData(windows, held, f"{data} ({len(windows)} windows), held out: {eval_text}")
    split = round(config.held_out * len(windows))
    if split < 1 or split >= len(windows):
        raise ValueError(f"the training text makes {len(windows)} windows of {config.seq_len} tokens: too few to "
                         f"hold out {config.held_out:.0%} (give --eval, or more text)")  # fmt: skip
    return DistillData(windows[:-split], windows[-split:], f"{data}: {len(windows) - split} windows, the last "
                       f"{split} held out")  # fmt: skip


def _spread(windows: torch.Tensor, count: int) -> torch.Tensor:
    """At most ``count`` windows spread evenly over ``windows``."""
    if len(windows) <= count:
        return windows
    return windows[torch.linspace(0, len(windows) - 1, count).round().long()]


# ---------------------------------------------------------------------------------------------- losses


def _pooling(folder: Path) -> str:
    """A sentence-transformers folder's pooling (``mean`` or ``cls``); ``mean`` for any other encoder."""
    for path in sorted(folder.glob("*_Pooling/config.json")):
        settings = json.loads(path.read_text())
        if settings.get("pooling_mode_cls_token"):
            return "cls"
    return "mean"


def _embedding(hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    pooled = hidden[:, 0] if pooling == "cls" else hidden.mean(1)  # windows are never padded
    return F.normalize(pooled.float(), dim=-1)


def _masked_inputs(ids: torch.Tensor, tokenizer, vocab_size: int, generator: torch.Generator):
    """(inputs with 15% of the ordinary tokens masked, labels -100 elsewhere): BERT's corruption."""
    special = _special_tokens(ids, tokenizer)
    chosen = (torch.rand(ids.shape, generator=generator) < MASKED_FRACTION) & ~special
    chosen[:, 0] |= ~chosen.any(1) & ~special[:, 0]
    mask_id = getattr(tokenizer, "mask_token_id", None) if tokenizer is not None else None
    if mask_id is not None:
        fill = torch.full_like(ids, mask_id)
    else:
        fill = torch.randint(vocab_size, ids.shape, generator=generator)
    return torch.where(chosen, fill, ids), ids.masked_fill(~chosen, -100)


def hidden_state_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """SquareHead: the mean over layers (the embeddings' output excluded) of MSE(student, teacher) / var(teacher)."""
    terms = [
        F.mse_loss(s.float(), t.float()) / t.float().var().clamp_min(1e-8)
        for s, t in zip(student[1:], teacher[1:], strict=True)
    ]
    return torch.stack(terms).mean()


def logits_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) of the token distributions at ``temperature``, times its square, averaged over tokens."""
    s = F.log_softmax(student.float() / temperature, -1).flatten(0, -2)
    t = F.log_softmax(teacher.float() / temperature, -1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


# ---------------------------------------------------------------------------------------------- the run


def _convert_linear_like(model: nn.Module, config: SparsityConfig) -> int:
    """Replace the targeted linear-like modules (GPT-2's ``Conv1D``) by the ``nn.Linear`` they compute, so that the
    pruner scores the weight the way it is multiplied."""
    converted = 0
    for name, module in target_linears(model, config, linear_like=True):
        if _layout_key(type(module)) in LINEAR_LIKE:
            replace_module(model, name, as_linear(module))
            converted += 1
    return converted


def _fingerprint(folder: Path) -> str:
    """config.json's bytes and the weight files' names and sizes: the identity of a model folder, cheaply."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.iterdir()):
        if path.suffix in (".safetensors", ".bin"):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()


class Distillation:
    """One distillation run, step by step (what :func:`~sparseblocks.recipes.training.run_training` drives):
    ``step``, ``steps``, :meth:`train_step`, :meth:`state`; :meth:`evaluate` measures a model on the held-out
    windows; :meth:`finish` converts the student."""

    def __init__(
        self,
        model_dir: str | Path,
        data: DistillData,
        config: DistillConfig,
        device: str | torch.device = "cpu",
        teacher_device: str | torch.device | None = None,
        loaded: tuple | None = None,
    ) -> None:
        self.folder, self.config, self.data = Path(model_dir), config, data
        self.device = torch.device(device)
        self.teacher_device = torch.device(teacher_device or device)
        teacher, self.tokenizer, self.head = loaded or load_pretrained(self.folder, self.device)
        self.pooling = _pooling(self.folder)
        if not config.teacher and self.head == "base":
            raise ValueError("an encoder without a head has no loss of its own: it needs the teacher")
        self.vocab_size = teacher.config.vocab_size
        positions = getattr(teacher.config, "max_position_embeddings", None) or getattr(
            teacher.config, "n_positions", None
        )
        if positions and config.seq_len > positions:
            raise ValueError(f"--seq-len {config.seq_len} exceeds the model's {positions} positions")
        self.student = _copy(teacher).to(self.device).train(config.dropout)
        dtype = getattr(torch, config.teacher_dtype)
        self.teacher = teacher.to(self.teacher_device, dtype).eval().requires_grad_(False) if config.teacher else None
        exclude = [p for p in config.exclude.split(",") if p]
        sparsity_config = SparsityConfig(
            config.sparsity, config.block, config.targets.split(","), exclude, fuse_mlp=config.fuse_mlp
        )
        _convert_linear_like(self.student, sparsity_config)
        targets = dict(target_linears(self.student, sparsity_config))
        if not targets:
            raise ValueError(f"--targets {config.targets} matches no linear layer of {self.folder}")
        self.mask_generator = torch.Generator().manual_seed(config.seed + 1)  # masked-LM corruption of training
        self.calibration_stats = self._calibrate(targets)
        self.permutation = None
        if config.permute:
            orders, self.permutation = permute_mlps(
                self.student, self._saliency(targets), config.block, config.sparsity
            )
            for units, order in orders.values():
                for name in [*units.inputs, units.output]:
                    for field in ("grad_sq", "input_sq"):
                        stats = self.calibration_stats[field]
                        if name in stats:
                            stats[name] = permute_tensor(name, units, order, stats[name])
        self.allocated = None
        if config.allocation == "sensitivity":
            scores = {name: block_sums(layer.weight.detach().float().square()
                                       * (self.calibration_stats["grad_sq"][name] / self.calibration_stats["batches"]
                                          + 1e-8) / 2, (config.block, config.block))
                      for name, layer in targets.items()}  # fmt: skip
            self.allocated = sensitivity_allocation(scores, config.sparsity)
            sparsity_config = per_layer_config(sparsity_config, self.allocated)
        schedule = CubicSchedule(0, config.prune_steps, config.update_every)
        # the optimizer is built before the pruner only for prune_grow, which resets regrown tiles' moments
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.pruner = Pruner(self.student, sparsity_config, config.method, schedule,
                             allocation="global" if config.allocation == "global" else "layer",
                             optimizer=self.optimizer)  # fmt: skip
        if config.method == "activation_magnitude":
            self.pruner.input_sq = dict(self.calibration_stats["input_sq"])
        if config.method in ("fisher", "prune_grow"):
            self._use_calibration_gradients()
        if config.prune_steps == 0:  # one shot: the masks before the first step
            self.pruner.update_masks()
            self.pruner.apply_masks()
            if config.method in ("fisher", "prune_grow"):
                self._use_calibration_gradients()  # the step-0 update of the schedule re-ranks among the kept tiles
        warm = round(config.warmup * config.steps)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, config.steps - warm))))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.steps, self.step = config.steps, 0
        self.curve = torch.full((config.steps, len(TERMS) + 1), float("nan"))  # terms and the overall sparsity
        self.evaluations = torch.full((config.steps // config.evaluate_every + 1, 2), float("nan"))  # step, metric
        self.held = _spread(data.held, config.eval_windows)

    # ------------------------------------------------------------------ calibration

    def _calibrate(self, targets: dict[str, nn.Linear]) -> dict:
        """Squared gradients of the model's own loss and squared inputs of every target, on ``calibration``
        training windows of the dense student."""
        windows = _spread(self.data.train, self.config.calibration)
        grad_sq: dict[str, torch.Tensor] = {}
        input_sq: dict[str, torch.Tensor] = {}

        def hook(name):
            def accumulate(module, args):
                x = args[0].detach().reshape(-1, module.in_features).float()
                input_sq[name] = input_sq.get(name, 0) + x.square().sum(0)

            return accumulate

        handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in targets.items()]
        generator = torch.Generator(self.device).manual_seed(self.config.seed)
        training = self.student.training
        self.student.eval()
        try:
            for window in windows.split(1):
                loss = _fisher_loss(self.student, window.to(self.device), self.head, self.tokenizer, generator)
                weights = [layer.weight for layer in targets.values()]
                gradients = torch.autograd.grad(loss, weights, allow_unused=True)
                for name, gradient in zip(targets, gradients, strict=True):
                    if gradient is not None:
                        grad_sq[name] = grad_sq.get(name, 0) + gradient.float().square()
        finally:
            for handle in handles:
                handle.remove()
            self.student.train(training)
        for name, layer in targets.items():  # a target the loss does not reach (a pooler): no saliency from it
            grad_sq.setdefault(name, torch.zeros_like(layer.weight, dtype=torch.float32))
        return {"grad_sq": grad_sq, "input_sq": input_sq, "batches": len(windows)}

    def _saliency(self, targets: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
        """Per-weight saliency of ``method`` (what its tile scores sum): w²(F+λ)/2, (w·‖x‖)², or w²."""
        stats, out = self.calibration_stats, {}
        for name, layer in targets.items():
            w2 = layer.weight.detach().float().square()
            if self.config.method == "fisher":
                out[name] = w2 * (stats["grad_sq"][name] / stats["batches"] + 1e-8) / 2
            elif self.config.method == "activation_magnitude":
                out[name] = w2 * stats["input_sq"][name][None, :]
            else:
                out[name] = w2
        return out

    def _use_calibration_gradients(self) -> None:
        self.pruner.grad_sq = {name: g.clone() for name, g in self.calibration_stats["grad_sq"].items()}
        self.pruner.gradient_batches = self.calibration_stats["batches"]

    # ------------------------------------------------------------------ training

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def losses(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every loss term of one batch of windows (on the student's device), and their weighted sum ``loss``."""
        config, terms = self.config, {}
        labels = None
        if self.head == "masked_lm":
            ids, labels = _masked_inputs(ids.cpu(), self.tokenizer, self.vocab_size, self.mask_generator)
            ids, labels = ids.to(self.device), labels.to(self.device)
        elif self.head == "causal_lm":
            labels = ids
        with self._autocast():
            student = self.student(input_ids=ids, output_hidden_states=True,
                                   labels=None if config.teacher else labels)  # fmt: skip
        if not config.teacher:
            terms["task"] = student.loss.float()
            terms["loss"] = terms["task"]
            return terms
        with torch.no_grad(), self._autocast():
            teacher = self.teacher(input_ids=ids.to(self.teacher_device), output_hidden_states=True)
        teacher_states = tuple(h.to(self.device) for h in teacher.hidden_states)
        total = 0.0
        if self.head == "base":
            terms["cosine"] = 1 - (_embedding(student.hidden_states[-1], self.pooling)
                                   * _embedding(teacher_states[-1], self.pooling)).sum(-1).mean()  # fmt: skip
            total = total + config.cosine_weight * terms["cosine"]
        else:
            terms["kl"] = logits_kl(student.logits, teacher.logits.to(self.device), config.temperature)
            total = total + config.logits_weight * terms["kl"]
        if config.hidden_weight:
            terms["hidden"] = hidden_state_loss(student.hidden_states, teacher_states)
            total = total + config.hidden_weight * terms["hidden"]
        terms["loss"] = total
        return terms

    def _observe(self) -> bool:
        """Whether this step's gradients inform the pruner: always for prune_grow; for fisher, once tiles are
        pruned (before, the student equals the teacher and the calibration Fisher stands in)."""
        if self.config.method == "prune_grow":
            return True
        return self.config.method == "fisher" and (not self.config.teacher or self.overall_sparsity() > 0)

    def train_step(self) -> torch.Tensor:
        config = self.config
        sums: dict[str, torch.Tensor] = {}
        for _ in range(config.accumulation):
            chosen = torch.randint(len(self.data.train), (config.batch_size,), generator=self.generator)
            terms = self.losses(self.data.train[chosen].to(self.device))
            (terms["loss"] / config.accumulation).backward()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0) + value.detach() / config.accumulation
        if self._observe():
            self.pruner.observe_gradients()
        if config.clip:
            nn.utils.clip_grad_norm_(self.student.parameters(), config.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        before = self.pruner.step_count
        self.pruner.step()
        if before == 0 and config.method == "fisher" and self.overall_sparsity() == 0:
            self._use_calibration_gradients()  # the step-0 update (sparsity 0) cleared them
        row = [sums[name].item() if name in sums else float("nan") for name in TERMS]
        self.curve[self.step] = torch.tensor([*row, self.overall_sparsity()])
        self.step += 1
        if self.step % config.evaluate_every == 0 or self.step == self.steps:
            done = int((~self.evaluations[:, 0].isnan()).sum())
            self.evaluations[done] = torch.tensor([self.step, self.evaluate()])
        return sums["loss"]

    def postfix(self) -> dict[str, str]:
        """What the progress bar shows: the last step's terms and the sparsity."""
        row = self.curve[self.step - 1].tolist()
        shown = {name: f"{value:.4f}" for name, value in zip(TERMS, row, strict=False) if not math.isnan(value)}
        return shown | {"sparsity": f"{row[-1]:.3f}"}

    def state(self) -> dict[str, object]:
        return {"model": self.student, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "pruner": self.pruner, "generator": self.generator, "mask_generator": self.mask_generator,
                "curve": self.curve, "evaluations": self.evaluations}  # fmt: skip

    def overall_sparsity(self) -> float:
        masks = self.pruner.masks.values()
        return 1.0 - sum(m.sum().item() for m in masks) / sum(m.numel() for m in masks)

    # ------------------------------------------------------------------ evaluation

    @property
    def metric(self) -> str:
        return {"causal_lm": "perplexity", "masked_lm": "masked_lm_loss", "base": "embedding_cosine"}[self.head]

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> float:
        """The held-out metric of ``model`` (default the student): perplexity, masked-LM loss on a fixed 15% of the
        tokens, or mean cosine of the pooled embeddings to the teacher's."""
        model = self.student if model is None else model
        training = model.training
        model.eval()
        generator = torch.Generator().manual_seed(self.config.seed + 2)  # the same masked tokens every time
        total, count = 0.0, 0
        try:
            for ids in self.held.split(self.config.batch_size):
                ids = ids.to(self.device)
                with self._autocast():
                    if self.head == "causal_lm":
                        total += model(input_ids=ids, labels=ids).loss.float().item() * len(ids)
                    elif self.head == "masked_lm":
                        inputs, labels = _masked_inputs(ids.cpu(), self.tokenizer, self.vocab_size, generator)
                        total += model(
                            input_ids=inputs.to(self.device), labels=labels.to(self.device)
                        ).loss.item() * len(ids)
                    else:
                        mine = _embedding(model(input_ids=ids).last_hidden_state, self.pooling)
                        reference = self.teacher(input_ids=ids.to(self.teacher_device)).last_hidden_state
                        total += (mine * _embedding(reference.to(self.device), self.pooling)).sum(-1).sum().item()
                count += len(ids)
        finally:
            model.train(training)
        mean = total / count
        return math.exp(mean) if self.head == "causal_lm" else mean

    def finish(self) -> dict:
        """Convert the student to sparse modules (fused MLPs if configured) and return the per-layer report."""
        self.student.eval()
        report = self.pruner.finalize()
        return {name: self.pruner.sparsity()[name] for name in self.pruner.layers} | {"_report": report}


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


# ---------------------------------------------------------------------------------------------- entry point


def distill(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path,
    config: DistillConfig | None = None,
    eval_text: str | Path | None = None,
    device: str | None = None,
    teacher_device: str | None = None,
    resume: bool = False,
    checkpoint_every: int = 100,
    stop_after: int | None = None,
    allow_random_ids: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict | None:
    """Distil a pruned copy of the Hugging Face folder ``model_dir`` toward the dense model on the text file
    ``data``, save it in ``out`` and return the result (also ``out/distill.json``); None when stopped at
    ``stop_after`` steps (``resume`` continues from the checkpoint in ``out``)."""
    config = config or DistillConfig()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    folder, out = Path(model_dir), Path(out)
    if out.resolve() == folder.resolve():
        raise ValueError(f"--out must be another folder than {folder}")
    loaded = load_pretrained(folder, device)
    windows = load_data(data, eval_text, loaded[1], loaded[0].config.vocab_size, config, allow_random_ids)
    run = Distillation(folder, windows, config, device, teacher_device, loaded)
    data_sha256 = hashlib.sha256(windows.train.numpy().tobytes() + windows.held.numpy().tobytes()).hexdigest()
    recipe = {
        "recipe": "distill",
        **dataclasses.asdict(config),
        "model": _fingerprint(folder),
        "data_sha256": data_sha256,
    }
    dense_metric = run.evaluate(run.teacher if run.teacher is not None else _dense_copy(run))
    run_training(run, out, recipe, checkpoint_every, resume, stop_after, progress, "distill")
    if run.step < run.steps:
        print(f"stopped at step {run.step}/{run.steps}; continue with --resume")
        return None
    dense_params, dense_bytes = model_size(run.student)
    layers = run.finish()
    report = layers.pop("_report")
    after = run.evaluate()
    sparse_params, sparse_bytes = model_size(run.student)
    save_hf_sparse(run.student.cpu(), folder, out, command=command)
    for pooling in folder.glob("*_Pooling"):  # sentence-transformers' pooling settings
        if pooling.is_dir():
            shutil.copytree(pooling, out / pooling.name, dirs_exist_ok=True)
    result = _result(run, dense_metric, after, layers, (dense_params, sparse_params), (dense_bytes, sparse_bytes),
                     command, report)  # fmt: skip
    from sparseblocks.bench.results import write_result

    write_result(out / RESULT_FILE, result)
    _plot(result, out / PLOT_FILE)
    print(f"distill: {run.metric} {dense_metric:.4f} dense -> {after:.4f} at {result['sparsity']:.3f} sparsity; "
          f"saved to {out}")  # fmt: skip
    return result


def _dense_copy(run: Distillation) -> nn.Module:
    """The dense model for the 'before' metric of a run without teacher: the folder loaded again."""
    return load_pretrained(run.folder, run.device)[0]


def _result(run, before, after, layers, params, nbytes, command, report) -> dict:
    from sparseblocks.bench.results import new_result

    curve = run.curve.tolist()
    rows = [{"step": i + 1, **{name: value for name, value in zip(TERMS, row, strict=False) if not math.isnan(value)},
             "sparsity": row[-1]} for i, row in enumerate(curve)]  # fmt: skip
    for step, value in run.evaluations.tolist():
        if not math.isnan(step):
            rows[int(step) - 1][run.metric] = value
    result = new_result("accuracy_distill", command or "sparseblocks distill (library call)")
    result |= {
        "model": str(run.folder),
        "head": run.head,
        "data": run.data.origin,
        "settings": dataclasses.asdict(run.config),
        "metric": run.metric,
        "before": before,
        "after": after,
        "sparsity": run.overall_sparsity(),
        "layer_sparsity": layers,
        "allocated": run.allocated,
        "params": list(params),
        "bytes": list(nbytes),
        "converted_layers": len(report.layers),
        "held_out_windows": len(run.held),
        "rows": rows,
    }
    if run.permutation is not None:
        result["permutation"] = {"kept_before": run.permutation.kept_before, "kept_after": run.permutation.kept_after}
    return json.loads(json.dumps(result, default=float))


def _plot(result: dict, path: Path) -> None:
    """Loss terms, the held-out metric and the sparsity against steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("sparseblocks: no matplotlib: %s not drawn", path)
        return
    rows = result["rows"]
    steps = [r["step"] for r in rows]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for term in TERMS[1:]:
        values = [(r["step"], r[term]) for r in rows if term in r]
        if values:
            axes[0].plot(*zip(*values, strict=True), label=term, linewidth=0.8)
    axes[0].set_yscale("log")
    axes[0].set_title("training loss terms")
    axes[0].legend()
    metric = [(r["step"], r[result["metric"]]) for r in rows if result["metric"] in r]
    if metric:
        axes[1].plot(*zip(*metric, strict=True), marker="o")
    axes[1].axhline(result["before"], color="gray", linestyle="--", label="dense")
    axes[1].set_title(f"held-out {result['metric']}")
    axes[1].legend()
    axes[2].plot(steps, [r["sparsity"] for r in rows])
    axes[2].set_title("tile sparsity of the targets")
    for axis in axes:
        axis.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
