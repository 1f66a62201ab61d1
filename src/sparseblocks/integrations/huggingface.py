"""Pretrained Hugging Face model folders: prune one with calibration text (``sparseblocks prune``), save it sparse.

::

    model, tokenizer, head = load_pretrained("path/to/folder")
    tokens = calibration_tokens(Path("calibration.txt").read_text(), tokenizer, model.config.vocab_size, 128, 128)
    report = prune_pretrained(model, SparsityConfig(0.9, 32, "mlp"), "fisher", tokens, head, tokenizer)
    save_hf_sparse(model, "path/to/folder", "out/")  # AutoModelFor...from_pretrained("out/") reads it back

The folder's ``config.json`` ``architectures`` name its head, and the model is loaded with it, so that a language
model keeps its output layer and its own loss: ``*ForCausalLM`` (``causal_lm``), ``*ForMaskedLM`` (``masked_lm``),
anything else (a bare encoder such as sentence-transformers' ``BertModel``) with ``AutoModel`` (``base``).

Scores (see :mod:`sparseblocks.pruning.pruner`), from ``samples`` windows of ``seq_len`` tokens spread evenly over
the text:

* ``magnitude``: the weights alone; no calibration.
* ``activation_magnitude``: each target's input-feature norms over the windows.
* ``fisher``: squared weight gradients, one window at a time (the empirical Fisher is a mean of per-sample
  squared gradients; the square of a batch's mean gradient would average most of it away). The loss: a causal
  LM's next-token loss; a masked LM's loss on 15% of the non-special tokens, masked. A bare encoder has no loss of
  its own, and distillation toward the dense model has zero gradient at the dense weights, so it gets the Fisher of a
  unit Gaussian model of its output h: the gradient of ⟨h, v⟩ with v ~ N(0, I) drawn per window, whose square has
  expectation diag(JᵀJ), the curvature of the distillation loss ½‖h(w) − h(w₀)‖² at the dense weights w₀. Targets
  that loss does not reach (a pooler) stay dense, with a warning. A masked LM's windows must be longer than the
  tokenizer's special tokens.

Without a tokenizer in the folder (tests, or weights copied alone), the windows are random token ids of the
vocabulary, with a warning: the statistics then describe no real text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from sparseblocks.integrations.checkpoint import CONFIG_FILE, load_sparse
from sparseblocks.integrations.files import move_into, temporary_sibling
from sparseblocks.integrations.hf_quantizer import METHOD, attach
from sparseblocks.integrations.model_card import write_model_card
from sparseblocks.integrations.sparsify import SparsifyReport, SparsityConfig, _as_list, sparse_layers, target_linears
from sparseblocks.pruning.pruner import Pruner
from sparseblocks.pruning.scores import SCORES

logger = logging.getLogger("sparseblocks")


def __getattr__(name: str):
    # PRUNE_METHODS, the one-shot methods (no training loop), are the registered scores, read when asked for: a
    # score registered after this module loaded is one too
    if name == "PRUNE_METHODS":
        return tuple(SCORES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# head -> the transformers class that loads (and reloads) a folder with that head
MODEL_CLASSES = {"causal_lm": "AutoModelForCausalLM", "masked_lm": "AutoModelForMaskedLM", "base": "AutoModel"}
_HEAD_SUFFIXES = {
    "ForCausalLM": "causal_lm",
    "LMHeadModel": "causal_lm",
    "ForMaskedLM": "masked_lm",
}  # GPT-2: *LMHeadModel
# files whose presence means the folder has a tokenizer (AutoTokenizer would otherwise guess one from the config)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
MASKED_FRACTION = 0.15  # BERT's masked-LM rate
ACTIVATION_BATCH = 8  # windows per forward pass while gathering input norms (a sum: the batch changes no number)


def model_head(config) -> str:
    """``causal_lm``, ``masked_lm`` or ``base``, from a transformers config's ``architectures``."""
    for architecture in getattr(config, "architectures", None) or ():
        for suffix, head in _HEAD_SUFFIXES.items():
            if architecture.endswith(suffix):
                return head
    return "base"


def auto_class(head: str) -> type:
    """The transformers auto class for a head of :data:`MODEL_CLASSES`."""
    import transformers

    return getattr(transformers, MODEL_CLASSES[head])


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer or None, head) of a local Hugging Face folder; never touches the network."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a Hugging Face model folder (no config.json)")
    head = model_head(AutoConfig.from_pretrained(folder, local_files_only=True))
    model = auto_class(head).from_pretrained(folder, local_files_only=True).to(device).eval()
    tokenizer = None
    if any((folder / name).is_file() for name in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer, head


def calibration_tokens(
    text: str | None, tokenizer, vocab_size: int, samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """``(samples, seq_len)`` token ids: windows of ``text`` spread evenly over it, each tokenized with the
    tokenizer's own special tokens (``[CLS] … [SEP]``, ``<s> …``); random ids of the vocabulary without a tokenizer
    (with a warning). Raises ``ValueError`` when the text holds fewer than ``seq_len`` tokens."""
    if samples < 1 or seq_len < 2:
        raise ValueError(f"need at least 1 sample of at least 2 tokens, got {samples} of {seq_len}")
    if text is not None and not text.strip():
        raise ValueError("the calibration text is empty")
    if tokenizer is None:
        message = (
            f"sparseblocks: the model folder has no tokenizer; calibrating on {samples} windows of random token "
            "ids, which describe no real text"
        )
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=2)
        return torch.randint(vocab_size, (samples, seq_len), generator=torch.Generator().manual_seed(seed))
    if text is None:
        raise ValueError("calibration needs text (or no tokenizer: random ids)")

    def encode(piece: str) -> list[int]:
        return tokenizer(piece, truncation=True, max_length=seq_len, verbose=False)["input_ids"]

    # Characters per token from a sample of the text, so that each window's text is cut long enough (1.5x margin).
    probe = text[:20_000]
    per_token = len(probe) / max(len(tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"]), 1)
    span = int(per_token * seq_len * 1.5) + 64
    last = max(len(text) - span, 0)
    windows = []
    for i in range(samples):
        start = round(i * last / max(samples - 1, 1))
        space = text.find(" ", start, start + 64) if start else -1
        start = space + 1 if space >= 0 else start  # begin at a word: a cut word tokenizes as an odd fragment
        ids = encode(text[start : start + span])
        if len(ids) < seq_len:  # more characters per token here than in the probe (runs of spaces, long words)
            ids = encode(text[start : start + 4 * span])
        if len(ids) < seq_len:  # then the window ran into the end of the text: the text's end instead
            ids = encode(text[-4 * span :])
        if len(ids) < seq_len:
            raise ValueError(f"the calibration text holds fewer than {seq_len} tokens (--seq-len): {len(ids)}")
        windows.append(ids)
    return torch.tensor(windows)


def _special_tokens(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Where ``ids`` ``(samples, seq_len)`` hold the tokenizer's special tokens (none without a tokenizer)."""
    if tokenizer is None:
        return torch.zeros_like(ids, dtype=torch.bool)
    return torch.tensor([tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True)
                         for row in ids.tolist()], dtype=torch.bool, device=ids.device)  # fmt: skip


def _check_maskable(tokens: torch.Tensor, tokenizer) -> None:
    """Raise ``ValueError`` unless every window holds a token a masked LM's loss can mask (not a special one)."""
    if _special_tokens(tokens, tokenizer).all(1).any():
        needed = tokenizer.num_special_tokens_to_add() + 1
        raise ValueError(
            f"--seq-len {tokens.shape[1]} leaves no token to mask in a window (the tokenizer's special tokens fill "
            f"it): a masked LM's Fisher needs windows of at least {needed} tokens"
        )


def _fisher_loss(model: nn.Module, ids: torch.Tensor, head: str, tokenizer, generator: torch.Generator) -> torch.Tensor:
    """The loss whose squared gradients make the Fisher of one window (see the module docstring)."""
    if head == "causal_lm":
        return model(input_ids=ids, labels=ids).loss
    if head == "masked_lm":
        special = _special_tokens(ids, tokenizer)
        chosen = (torch.rand(ids.shape, generator=generator, device=ids.device) < MASKED_FRACTION) & ~special
        if not chosen.any():  # a short window may draw no position: mask its first ordinary token
            chosen[0, (~special[0]).nonzero()[0]] = True
        mask_id = getattr(tokenizer, "mask_token_id", None)
        if mask_id is not None:
            fill = torch.full_like(ids, mask_id)
        else:  # BERT's other corruption: a random token in its place
            fill = torch.randint(model.config.vocab_size, ids.shape, generator=generator, device=ids.device)
        return model(input_ids=torch.where(chosen, fill, ids), labels=ids.masked_fill(~chosen, -100)).loss
    outputs = model(input_ids=ids)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    direction = torch.randn(hidden.shape, generator=generator, device=hidden.device, dtype=hidden.dtype)
    return (hidden * direction).sum()


def prune_pretrained(
    model: nn.Module,
    config: SparsityConfig,
    method: str,
    tokens: torch.Tensor | None = None,
    head: str = "base",
    tokenizer=None,
    seed: int = 0,
    reconstruct: bool = False,
) -> SparsifyReport:
    """Prune ``model``'s targets in one shot by ``method`` (a score of :data:`~sparseblocks.pruning.scores.SCORES`)
    from calibration ``tokens`` ``(samples, seq_len)`` (unused by scores that need no statistics, like magnitude),
    and replace them by the sparse modules of ``config.pattern``; returns the report.

    reconstruct: then refit the kept weights layer by layer to reproduce the dense layers' outputs on the
    calibration tokens (:func:`sparseblocks.pruning.reconstruct.reconstruct`)."""
    if method not in SCORES:
        raise ValueError(f"method must be one of {tuple(SCORES)}, got {method!r}")
    if head not in MODEL_CLASSES:
        raise ValueError(f"head must be one of {tuple(MODEL_CLASSES)}, got {head!r}")
    needs = SCORES[method].needs
    if (needs or reconstruct) and tokens is None:
        raise ValueError(f"{method}{' with reconstruction' if reconstruct else ''} needs calibration tokens")
    positions = getattr(model.config, "max_position_embeddings", None)
    if tokens is not None and positions and tokens.shape[1] > positions:
        raise ValueError(f"windows of {tokens.shape[1]} tokens exceed the model's {positions} positions (--seq-len)")
    device = next(model.parameters()).device
    if "gradients" in needs and head == "masked_lm":
        _check_maskable(tokens, tokenizer)
    if "gradients" in needs and head == "base":
        config = _without_unreached_targets(model, config, tokens[:1].to(device))
    pruner = Pruner(model, config, method=method)

    @torch.no_grad()
    def calibrate() -> None:
        for batch in tokens.split(ACTIVATION_BATCH):
            model(input_ids=batch.to(device))

    if "inputs" in needs:
        with pruner.observe_inputs():
            calibrate()
    if "gradients" in needs:
        generator = torch.Generator(device).manual_seed(seed)
        with _gradients_of_only(model, [layer.weight for layer in pruner.layers.values()]):
            for window in tokens.split(1):
                _fisher_loss(model, window.to(device), head, tokenizer, generator).backward()
                pruner.observe_gradients()
                model.zero_grad(set_to_none=True)
    pruner.update_masks()  # at the configured sparsity
    if reconstruct:
        from sparseblocks.pruning.reconstruct import reconstruct as refit

        refit(model, pruner.masks, pruner.block, calibrate)
    return pruner.finalize()  # applies the masks, then BlockSparseLinear


@contextlib.contextmanager
def _gradients_of_only(model: nn.Module, weights: list[torch.Tensor]) -> Iterator[None]:
    """Within the block, only ``weights`` require gradients: no memory for the others' (embeddings can be the
    largest); every parameter's flag is restored after."""
    trainable = {p: p.requires_grad for p in model.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for weight in weights:
        weight.requires_grad_(True)
    try:
        yield
    finally:
        for parameter, flag in trainable.items():
            parameter.requires_grad_(flag)


def _without_unreached_targets(model: nn.Module, config: SparsityConfig, window: torch.Tensor) -> SparsityConfig:
    """``config`` excluding the targets a bare encoder's Fisher loss does not reach, with a warning naming them: it
    reads the last hidden state, so a pooler (``all-linear`` targets BERT's) gets no gradient to score it by.
    Found from one window's backward; its random direction is drawn apart, so the scores' draws stay the same."""
    targets = dict(target_linears(model, config))
    with _gradients_of_only(model, [layer.weight for layer in targets.values()]):
        loss = _fisher_loss(model, window, "base", None, torch.Generator(window.device).manual_seed(0))
        gradients = torch.autograd.grad(loss, [layer.weight for layer in targets.values()], allow_unused=True)
    unreached = [name for name, gradient in zip(targets, gradients, strict=True) if gradient is None]
    if not unreached:
        return config
    for name in unreached:
        logger.warning("sparseblocks: %s stays dense: a bare encoder's Fisher loss (on its last hidden state) does "
                       "not reach it", name)  # fmt: skip
    exclude = [*_as_list(config.exclude), *(f"re:^{re.escape(name)}$" for name in unreached)]
    return dataclasses.replace(config, exclude=exclude)


def save_hf_sparse(model: nn.Module, source: str | Path, out: str | Path, command: str | None = None) -> Path:
    """Save a sparsified transformers ``model`` as a Hugging Face folder ``out`` that ``from_pretrained`` loads
    (``save_pretrained``: safetensors with the sparse layers' values and indices, ``config.json`` with the
    ``sparseblocks`` quantization config, see :mod:`~sparseblocks.integrations.hf_quantizer`), plus the other files
    of the ``source`` folder (tokenizer; not its weights, shard indexes or config) and the model card's sparsity
    section in ``README.md`` (:mod:`~sparseblocks.integrations.model_card`), recording ``command``. Returns ``out``.

    Written beside ``out`` first and moved in with ``config.json`` last: a save killed on the way leaves the old
    folder, the new one, or one without ``config.json``, which loading refuses."""
    if not sparse_layers(model):
        raise ValueError("the model has no sparse layers: sparsify it first")
    attach(model, command=command)
    out = Path(out)
    staging = temporary_sibling(out)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        written = {path.name for path in staging.iterdir()}
        for path in Path(source).iterdir():
            weights = path.suffix in _WEIGHT_SUFFIXES or path.name.endswith(".index.json")
            stale = path.name == CONFIG_FILE or path.name.startswith(".")  # the old format's record, temporaries
            if path.is_file() and not weights and not stale and path.name not in written:
                shutil.copy2(path, staging / path.name)
        write_model_card(staging)
        move_into(out, staging, record="config.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def load_hf_sparse(folder: str | Path, model_class: type | None = None, **kwargs) -> nn.Module:
    """A sparse Hugging Face model folder, in eval mode: one written by ``save_pretrained`` (``sparseblocks
    sparsify`` / ``prune``) through ``model_class.from_pretrained(folder, **kwargs)`` (``model_class`` defaults to
    the auto class of the head its ``architectures`` name: causal LM, masked LM, or the bare model); one in the
    older format (``sparseblocks.json`` + ``sparseblocks.safetensors``) built from its config and
    :func:`load_sparse`, then marked so that ``save_pretrained`` writes it in the new format (how to convert)."""
    from transformers import AutoConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model_class = model_class or auto_class(model_head(config))
    if (getattr(config, "quantization_config", None) or {}).get("quant_method") == METHOD:
        return model_class.from_pretrained(folder, local_files_only=True, **kwargs).eval()
    if not (folder / CONFIG_FILE).is_file():
        raise ValueError(f"{folder}: not a sparse folder (no sparseblocks quantization_config in config.json, no "
                         f"{CONFIG_FILE})")  # fmt: skip
    model = load_sparse(folder, model_class.from_config(config)).eval()
    attach(model)
    return model
