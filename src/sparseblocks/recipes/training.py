"""Training recipes behind ``sparseblocks train``: train, prune, convert to ``BlockSparseLinear``, save; resumable.

* ``gpt``: the tinyshakespeare experiment of :mod:`sparseblocks.recipes.experiments` for one pruning method (a character
  GPT, the method through :class:`~sparseblocks.pruning.pruner.Pruner`), :func:`train_gpt`.
* ``vit``: the superblock recipe, :func:`train_vit`: a small ViT (:mod:`sparseblocks.recipes.vit`) trained from scratch
  with Supermask on its MLPs (sparsity ramped over the first ``ramp`` of the steps), on scikit-learn's digits or on
  an image folder laid out as torchvision's ``ImageFolder`` (class subfolders of images, read with PIL).

Both drive a step-wise training object (:class:`~sparseblocks.recipes.experiments.PruningRun`,
:class:`~sparseblocks.recipes.vit.ClassifierTraining`) through one loop, :func:`run_training`: a progress bar, a
checkpoint every ``checkpoint_every`` steps, and resumption that gives bitwise the same model as an uninterrupted run
(on the CPU; CUDA kernels may reduce in another order from one run to the next).

Files in OUT:

* ``training_state.safetensors``: the last checkpoint. Every tensor of the training state (weights, optimizer
  moments, pruner masks and statistics, RNG states) in safetensors; the rest (step, the recipe's settings, optimizer
  hyper-parameters, scheduler counters) as JSON in the file's metadata, with the SHA-256 of every tensor (checked on
  resume; a file without digests, written before they existed, resumes unchecked). One file, replaced atomically: a
  run killed while saving leaves the previous checkpoint. No pickle is ever loaded; metadata of the wrong form (too
  deep, wrong types) is a :class:`ResumeError`.
* ``sparseblocks.safetensors`` + ``sparseblocks.json`` (:func:`~sparseblocks.integrations.checkpoint.save_sparse`) and
  ``recipe.json`` (model config, vocabulary or class names, settings, results), saved in one atomic update and
  hashed in ``sparseblocks.json``: :func:`load_recipe_model` checks the config's sizes against the tensor shapes in
  the safetensors header before it builds the model (on ``meta``), then loads it.

Known limits (2026-11): images are held in memory as one tensor (small data sets only); the GPT recipe reads the
whole text file; a checkpoint holds the last state only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from sparseblocks.format import normalize_block_size
from sparseblocks.integrations.checkpoint import WEIGHTS_FILE, load_sparse, read_config, save_sparse
from sparseblocks.integrations.files import read_json, replacing, tensor_sha256
from sparseblocks.integrations.sparsify import SparsityConfig, model_size
from sparseblocks.pruning.pruner import CubicSchedule, Pruner
from sparseblocks.recipes.experiments import TWO_OF_FOUR, Experiment, PruningRun
from sparseblocks.recipes.gpt import GPT, CharData, GPTConfig
from sparseblocks.recipes.vit import ClassifierTraining, ViT, ViTConfig, accuracy

STATE_FILE = "training_state.safetensors"
RECIPE_FILE = "recipe.json"
STATE_FORMAT_VERSION = 1
IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")  # torchvision's
LOSS_EVERY = 20  # the progress bar shows the loss every LOSS_EVERY steps (reading it waits for the GPU)


class ResumeError(ValueError):
    """A checkpoint in OUT that this run cannot continue, or must not overwrite."""


# ---------------------------------------------------------------------------------------------- training state
#
# A state is nested dicts, lists and tuples of tensors, numbers and strings (state_dicts, RNG states, a pruner's
# masks). It is split into the tensors (saved with safetensors, keyed by their path) and a JSON skeleton that says
# where each tensor goes. JSON has no tuples and only string keys: both are spelled out with marker keys.

_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


def _encode(value: object, path: str, tensors: dict[str, torch.Tensor]) -> object:
    if isinstance(value, torch.Tensor):
        if path in tensors:
            raise ValueError(f"two tensors of the training state would be saved as {path!r}")
        tensors[path] = value.detach().to("cpu", copy=True).contiguous()  # a copy: no storage shared (tied weights)
        return {_TENSOR: path}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in value.items()}
        return {_ITEMS: [[k, _encode(v, f"{path}/{k}", tensors)] for k, v in value.items()]}  # optimizer: int keys
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot save {type(value).__name__} at {path!r} in a training checkpoint")


def _decode(value: object, tensors: dict[str, torch.Tensor]) -> object:
    """The state a skeleton describes; ``ValueError`` for a skeleton :func:`_encode` cannot have written."""
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        if not isinstance(value[_TENSOR], str) or value[_TENSOR] not in tensors:
            raise ValueError(f"the checkpoint's metadata names a tensor it does not hold: {value[_TENSOR]!r}")
        return tensors[value[_TENSOR]]
    if _TUPLE in value:
        if not isinstance(value[_TUPLE], list):
            raise ValueError(f"the checkpoint's metadata has a {_TUPLE} that is no list")
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if _ITEMS in value:
        items = value[_ITEMS]
        if not isinstance(items, list) or not all(
            isinstance(item, list) and len(item) == 2 and isinstance(item[0], str | int) for item in items
        ):
            raise ValueError(f"the checkpoint's metadata has an {_ITEMS} that is no list of [key, value] pairs")
        return {k: _decode(v, tensors) for k, v in items}
    return {k: _decode(v, tensors) for k, v in value.items()}


def capture_state(parts: dict[str, object]) -> dict:
    """The state of a training's ``parts`` (modules, optimizers, schedulers, pruners: anything with a
    ``state_dict``; generators, tensors; None skipped) and of the global RNGs, as nested dicts of tensors and plain
    values."""
    state: dict[str, object] = {"rng": torch.get_rng_state()}  # dropout draws from it
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    for name, part in parts.items():
        if part is None:
            continue
        if isinstance(part, torch.Generator):
            state[name] = part.get_state()
        elif isinstance(part, torch.Tensor):
            state[name] = part
        else:
            state[name] = part.state_dict()
    return state


def restore_state(parts: dict[str, object], state: dict) -> None:
    """Put a :func:`capture_state` result back into ``parts`` (in place) and the global RNGs."""
    missing = [name for name, part in parts.items() if part is not None and name not in state]
    if missing:
        raise ResumeError(f"the checkpoint holds no state for {missing}")
    try:
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    except (KeyError, TypeError, RuntimeError) as error:
        raise ResumeError(f"the checkpoint's random number generator state is unusable: {error}") from error
    for name, part in parts.items():
        if part is None:
            continue
        try:
            if isinstance(part, torch.Generator):
                part.set_state(state[name])
            elif isinstance(part, torch.Tensor):
                part.copy_(state[name])
            else:
                part.load_state_dict(state[name])
        # a model or pruner of another shape than the checkpoint's, or a state of the wrong form
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
            raise ResumeError(f"the checkpoint's {name} does not fit this run: {error}") from error


def save_training_state(path: str | Path, step: int, recipe: dict, parts: dict[str, object]) -> None:
    """Write the checkpoint of a training at ``step`` (steps done) to ``path``, replacing the previous one only
    once the new file is complete."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(capture_state(parts), "", tensors)
    metadata = {
        "format": "sparseblocks-training",
        "format_version": str(STATE_FORMAT_VERSION),
        "step": str(step),
        "recipe": json.dumps(recipe),
        "state": json.dumps(skeleton),
        "sha256": json.dumps({key: tensor_sha256(tensor) for key, tensor in tensors.items()}),
    }
    with replacing(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def _check_digests(path: Path, metadata: dict, saved: dict[str, torch.Tensor]) -> None:
    if "sha256" not in metadata:
        return  # written before digests existed
    digests = read_json(metadata["sha256"], f"{path}: metadata 'sha256'")
    if not isinstance(digests, dict) or digests.keys() != saved.keys():
        raise ResumeError(f"{path}: the metadata's digests do not list the file's tensors")
    for key, tensor in saved.items():
        if tensor_sha256(tensor) != digests[key]:
            raise ResumeError(f"{path}: tensor {key!r} does not match its SHA-256 in the metadata (damaged file)")


def load_training_state(path: str | Path, tensors: bool = True, verify: bool = True) -> tuple[int, dict, dict | None]:
    """``(step, recipe, state)`` of a checkpoint written by :func:`save_training_state`; ``tensors`` False reads
    the metadata only (state None); ``verify`` checks the tensors against their SHA-256 digests. A file that cannot
    be read as one raises :class:`ResumeError`."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            if metadata.get("format") != "sparseblocks-training":
                raise ResumeError(f"{path}: not a sparseblocks training checkpoint")
            if metadata.get("format_version") != str(STATE_FORMAT_VERSION):
                raise ResumeError(f"{path}: format_version {metadata.get('format_version')!r} is not supported")
            step, recipe = int(metadata["step"]), read_json(metadata["recipe"], f"{path}: metadata 'recipe'")
            if step < 0 or not isinstance(recipe, dict):
                raise ResumeError(f"{path}: metadata needs a step >= 0 and a recipe mapping")
            if not tensors:
                return step, recipe, None
            saved = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (safe_open is no dict)
            if verify:
                _check_digests(path, metadata, saved)
            state = _decode(read_json(metadata["state"], f"{path}: metadata 'state'"), saved)
            if not isinstance(state, dict) or not isinstance(state.get("rng"), torch.Tensor):
                raise ResumeError(f"{path}: metadata 'state' must be a mapping with the RNG state")
            return step, recipe, state
    except ResumeError:
        raise
    except (SafetensorError, KeyError, ValueError) as error:  # a damaged file, or metadata that is not ours
        raise ResumeError(f"{path}: not a readable checkpoint ({error})") from error


def run_training(
    training,
    out: str | Path | None = None,
    recipe: dict | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    description: str = "train",
) -> torch.Tensor:
    """Run ``training`` (an object with ``step``, ``steps``, ``train_step() -> loss`` and ``state() -> parts``, as
    :class:`~sparseblocks.recipes.experiments.PruningRun`) to its last step or to ``stop_after`` steps, with a progress
    bar.

    Without ``out``, no checkpoints. With ``out``, a checkpoint goes to ``out/training_state.safetensors`` every
    ``checkpoint_every`` steps and when the loop ends. ``resume`` continues from that checkpoint (whose ``recipe``, a
    JSON-able dict of the settings and a fingerprint of the data, must equal this run's); without ``resume`` an
    existing checkpoint is an error (never overwritten). Returns the losses of the steps run by this call, float32
    ``(steps run,)``.
    """
    from tqdm import tqdm

    if out is not None and (recipe is None or checkpoint_every < 1):
        raise ValueError("checkpoints need the recipe's settings and checkpoint_every >= 1")
    recipe = json.loads(json.dumps(recipe))  # as it reads back from the file (tuples become lists)
    path = None if out is None else Path(out) / STATE_FILE
    if path is not None and path.exists():
        step, saved_recipe, _ = load_training_state(path, tensors=False)
        if not resume:
            raise ResumeError(
                f"{path} holds a checkpoint at step {step}/{training.steps}: resume it (--resume) or use another --out"
            )
        if saved_recipe != recipe:
            changed = sorted(k for k in recipe.keys() | saved_recipe.keys() if recipe.get(k) != saved_recipe.get(k))
            raise ResumeError(f"{path} was written by another run (differs in {', '.join(changed)}); use another --out")
        restore_state(training.state(), load_training_state(path)[2])
        training.step = step
        print(f"resuming from {path} at step {step}/{training.steps}")
    elif path is not None and resume:
        print(f"no checkpoint at {path}: starting at step 0")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    end = training.steps if stop_after is None else min(stop_after, training.steps)
    losses = []  # tensors, read once at the end: no wait for the GPU per step
    with tqdm(total=training.steps, initial=training.step, desc=description, unit="step", disable=not progress) as bar:
        while training.step < end:
            losses.append(training.train_step())
            bar.update()
            if training.step % LOSS_EVERY == 0:  # a training object may show more than the loss (postfix())
                shown = training.postfix() if hasattr(training, "postfix") else {"loss": f"{losses[-1].item():.3f}"}
                bar.set_postfix(shown, refresh=False)
            if path is not None and (training.step % checkpoint_every == 0 or training.step == end):
                save_training_state(path, training.step, recipe, training.state())
    return torch.stack(losses).float().cpu() if losses else torch.zeros(0)


def _fingerprint(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' bytes: the identity of a data set as the model sees it."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def save_recipe_model(model: GPT | ViT, out: str | Path, settings: dict, result: dict, **extra) -> Path:
    """``save_sparse(model, out)`` plus ``recipe.json``: the model's config (to rebuild it), ``settings``,
    ``result`` and ``extra`` (JSON-able: a vocabulary, class names), in one atomic update. Returns the folder."""
    payload = {"recipe": "gpt" if isinstance(model, GPT) else "vit", "model_config": dataclasses.asdict(model.config),
               **extra, "settings": settings, "result": result}  # fmt: skip
    return save_sparse(model, out, extra_files={RECIPE_FILE: json.dumps(payload, indent=1) + "\n"})


def _print_sizes(dense: tuple[int, int], sparse: tuple[int, int]) -> None:
    print(
        f"  params {dense[0]:,} -> {sparse[0]:,} ({sparse[0] / dense[0]:.3f}x), "
        f"bytes {dense[1]:,} -> {sparse[1]:,} ({sparse[1] / dense[1]:.3f}x)"
    )


_MODELS = {"gpt": (GPT, GPTConfig), "vit": (ViT, ViTConfig)}


def _recipe_config(out: Path) -> tuple[type[nn.Module], GPTConfig | ViTConfig]:
    """The model class and config ``recipe.json`` names, its sizes checked: positive integers, and as many layers
    as the weights file's header holds blocks (so that building the model on ``meta`` costs no more than the
    header's size)."""
    path = out / RECIPE_FILE
    try:
        payload = read_json(path.read_bytes(), str(path))
    except OSError as error:
        raise ValueError(f"{path}: not readable ({error})") from error
    recipe = payload.get("recipe") if isinstance(payload, dict) else None
    if recipe not in _MODELS or not isinstance(payload.get("model_config"), dict):
        raise ValueError(f"{path}: unknown recipe {recipe!r}, or no model_config mapping")
    model_class, config_class = _MODELS[recipe]
    try:
        config = config_class(**payload["model_config"])
    except TypeError as error:
        raise ValueError(f"{path}: model_config does not fit {config_class.__name__} ({error})") from error
    sizes = {field.name: getattr(config, field.name) for field in dataclasses.fields(config) if field.type == "int"}
    wrong = [name for name, size in sizes.items() if type(size) is not int or size < 1]
    if wrong:
        raise ValueError(f"{path}: model_config needs positive integers for {wrong}")
    try:
        with safe_open(str(out / WEIGHTS_FILE), framework="pt", device="cpu") as file:
            keys = list(file.keys())  # the header only
    except (OSError, SafetensorError) as error:
        raise ValueError(f"{out / WEIGHTS_FILE}: not a readable safetensors file ({error})") from error
    blocks = {key.split(".")[1] for key in keys if key.startswith("blocks.")}
    if config.layers != len(blocks):
        raise ValueError(f"{path}: model_config has {config.layers} layers, the weights file {len(blocks)} blocks")
    return model_class, config


def load_recipe_model(out: str | Path, verify: bool = True) -> nn.Module:
    """The converted model a recipe saved in ``out`` (built from ``recipe.json``, loaded by ``load_sparse``), in
    eval mode on the CPU. ``recipe.json`` is checked against the digest ``sparseblocks.json`` records (``verify``)
    and its sizes against the weights file before the model is built, on ``meta``: memory is given to its tensors
    only once ``load_sparse`` has found each in the file with its shape."""
    out = Path(out)
    read_config(out, verify)
    model_class, config = _recipe_config(out)
    try:
        with torch.device("meta"):
            model = model_class(config)
    except (ArithmeticError, ValueError, RuntimeError) as error:  # e.g. patch_size larger than image_size
        raise ValueError(f"{out / RECIPE_FILE}: model_config does not make a model ({error})") from error
    return load_sparse(out, model, verify=verify).eval()


# ---------------------------------------------------------------------------------------------- gpt


def train_gpt(
    data: str | Path,
    out: str | Path,
    method: str = "fisher",
    sparsity: float = 0.9,
    block: int = 32,
    experiment: Experiment | None = None,
    checkpoint_every: int = 500,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    fsdp: bool = False,
) -> dict | None:
    """Train the character GPT on the text file ``data`` with ``method``
    (:data:`sparseblocks.recipes.experiments.METHODS`) pruning its MLPs to ``sparsity`` in ``block``-sized tiles,
    convert it, print and return its result row (the converted model's validation loss, params and bytes
    before/after) and save it in ``out``.

    Returns None when stopped at ``stop_after`` steps (the checkpoint in ``out`` continues with ``resume``).

    ``fsdp``: run under ``torchrun`` with FSDP2 (:func:`_start_fsdp`): every rank draws the same batches and
    trains on its rows of them, so without dropout the losses are those of one process; no training checkpoints
    (``resume``/``stop_after`` refused); rank 0 saves the model.
    """
    out, experiment = Path(out), experiment or Experiment()
    if method == "dense":
        sparsity, block = 0.0, None
    elif method in TWO_OF_FOUR:  # the pattern fixes both
        sparsity, block = 0.5, None
    if fsdp and (resume or stop_after is not None):
        raise ValueError("--fsdp runs keep no training checkpoint yet: leave out --resume and --stop-after")
    text = CharData(data)
    rank, world, device = _start_fsdp() if fsdp else (0, 1, _device())
    if experiment.batch_size % world:
        raise ValueError(f"batch size {experiment.batch_size} does not split over {world} ranks")
    training = PruningRun(method, sparsity, block, _RankRows(text, rank, world) if fsdp else text, experiment, device)
    if fsdp:
        _shard_training(training)
    recipe = {
        "recipe": "gpt",
        "method": method,
        "sparsity": sparsity,
        "block": block,
        "experiment": dataclasses.asdict(experiment),
        "data_sha256": _fingerprint(text.train, text.val),
    }
    progress = progress and rank == 0
    log = print if rank == 0 else lambda *args: None
    run_training(
        training, None if fsdp else out, recipe, checkpoint_every, resume, stop_after, progress, f"gpt {method}"
    )
    if training.step < training.steps:
        print(f"stopped at step {training.step}/{training.steps}; continue with --resume")
        return None
    dense_size = model_size(training.model)
    if fsdp:  # each rank's loss of its rows; the mean over ranks is the loss of the whole batch
        torch.distributed.all_reduce(training.losses)
        training.losses /= world
    row = training.finish()
    if fsdp:
        val_loss = torch.tensor(row["val_loss"], device=device)
        torch.distributed.all_reduce(val_loss)
        row["val_loss"] = val_loss.item() / world
    if training.report is not None:
        dense_size = training.report.model_params_before, training.report.model_bytes_before
    sparse_size = model_size(training.model)
    row.update(params=(dense_size[0], sparse_size[0]), bytes=(dense_size[1], sparse_size[1]))
    log(f"gpt {method}: {training.steps} steps, MLP sparsity {sparsity:.0%}" + (f", blocks {block}" if block else ""))
    log(f"  validation loss {row['val_loss']:.4f} (of the converted model)")
    if rank == 0:
        _print_sizes(dense_size, sparse_size)
    if fsdp:
        from sparseblocks.integrations.distributed import whole_parameters

        with whole_parameters(training.model):
            if rank == 0:
                save_recipe_model(training.model, out, recipe, row, vocabulary="".join(text.chars))
        torch.distributed.barrier()
    else:
        save_recipe_model(training.model, out, recipe, row, vocabulary="".join(text.chars))
    log(f"  saved to {out}; load it with sparseblocks.recipes.training.load_recipe_model('{out}')")
    return row


def _start_fsdp() -> tuple[int, int, torch.device]:
    """Rank, world size and device of a ``torchrun`` process (its process group started: NCCL on GPUs, gloo on
    CPUs)."""
    import os

    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:
            raise ValueError(
                "--fsdp runs under torchrun: torchrun --nproc-per-node N -m sparseblocks.cli train gpt ..."
            )
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


class _RankRows:
    """Character data whose batches are this rank's rows of the batch every rank draws alike (the generator
    advances as in one process, so the ranks together see what one process would)."""

    def __init__(self, data: CharData, rank: int, world: int) -> None:
        self.data, self.rank, self.world = data, rank, world
        self.chars, self.vocab_size = data.chars, data.vocab_size

    def batch(self, split, batch_size, context, generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, targets = self.data.batch(split, batch_size, context, generator, device)
        return tokens.chunk(self.world)[self.rank], targets.chunk(self.world)[self.rank]


def _shard_training(training: PruningRun) -> None:
    """FSDP2 over the run's model (after its pruner, which may have swapped modules), and its optimizer made anew
    over the sharded parameters (no step taken yet: nothing is lost)."""
    from sparseblocks.integrations.distributed import shard_sparse_model

    shard_sparse_model(training.model)
    import inspect

    old = training.optimizer
    accepted = inspect.signature(type(old)).parameters  # defaults hold some the constructor does not take
    training.optimizer = type(old)(
        training.model.parameters(), **{k: v for k, v in old.defaults.items() if k in accepted}
    )
    if training.pruner is not None:
        training.pruner.optimizer = training.optimizer


# ---------------------------------------------------------------------------------------------- vit


@dataclass(frozen=True)
class ImageData:
    """A classification data set in memory: images float32 in [0, 1], ``(N, channels, size, size)``; labels
    int64 ``(N,)``; ``classes`` names each label."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]

    @property
    def channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]


def _read_images(files: list[Path], size: int, mode: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    images = []
    for file in files:
        with Image.open(file) as image:
            pixels = np.asarray(image.convert(mode).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
        images.append(torch.from_numpy(pixels.copy()))
    stacked = torch.stack(images).float() / 255.0  # (N, size, size) or (N, size, size, 3)
    return stacked.unsqueeze(1) if mode == "L" else stacked.permute(0, 3, 1, 2).contiguous()


def _class_files(root: Path) -> dict[str, list[Path]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    return {c: sorted(f for f in (root / c).rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS) for c in classes}


def image_folder(root: str | Path, image_size: int = 32, test_fraction: float = 0.25, seed: int = 0) -> ImageData:
    """Images in torchvision's ``ImageFolder`` layout (``root/<class>/<image>``), resized to ``image_size``
    squared; grayscale when every image is, RGB otherwise. ``root/train`` and ``root/test`` (or ``root/val``),
    each in that layout, are the split; otherwise each class is split at random (``test_fraction``, ``seed``; a
    class of one image trains only). Raises ``ValueError`` when no image is left to test on."""
    from PIL import Image

    root = Path(root)
    test_dir = next((root / name for name in ("test", "val") if (root / name).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        splits = {"train": _class_files(root / "train"), "test": _class_files(test_dir)}
        classes = tuple(splits["train"])
        if set(splits["test"]) - set(classes):
            raise ValueError(
                f"{test_dir} has classes that {root / 'train'} has not: {set(splits['test']) - set(classes)}"
            )
    else:
        splits, classes = {"all": _class_files(root)}, None
    files = [
        (split, file, label)
        for split, by_class in splits.items()
        for label, name in enumerate(classes or by_class)
        for file in by_class.get(name, [])
    ]
    if not files:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class subfolders")
    grayscale = {"1", "L", "LA", "I", "I;16", "F"}
    modes = set()
    for _, file, _ in files:
        with Image.open(file) as image:  # reads the header only
            modes.add(image.mode)
    images = _read_images([file for _, file, _ in files], image_size, "L" if modes <= grayscale else "RGB")
    labels = torch.tensor([label for _, _, label in files])
    if classes is not None:
        train = torch.tensor([split == "train" for split, _, _ in files])
        if train.all():
            raise ValueError(f"no test images in {test_dir} ({', '.join(IMAGE_EXTENSIONS)} in class subfolders)")
        return ImageData(images[train], labels[train], images[~train], labels[~train], classes)
    generator = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = min(len(members) - 1, max(1, round(test_fraction * len(members))))  # one of each class at least
        test[members[:count]] = True
    if not test.any():  # a class gives one image to the test split only when it has two
        raise ValueError(
            f"{root}: no test images: every class has a single image, and training keeps it; put two or more "
            "images in a class, or give train/ and test/ folders"
        )
    return ImageData(images[~test], labels[~test], images[test], labels[test], tuple(splits["all"]))


def load_image_data(spec: str, image_size: int | None = None, seed: int = 0) -> ImageData:
    """``"digits"`` (scikit-learn's 8×8 digits, :func:`sparseblocks.recipes.vit.digits`) or ``"imagefolder:PATH"``
    (:func:`image_folder`, ``image_size`` default 32)."""
    if spec == "digits":
        from sparseblocks.recipes.vit import digits

        if image_size not in (None, 8):
            raise ValueError("digits are 8×8 images: leave image_size at 8")
        return ImageData(*digits(seed), classes=tuple(str(d) for d in range(10)))
    if spec.startswith("imagefolder:"):
        return image_folder(spec.removeprefix("imagefolder:"), image_size or 32, seed=seed)
    raise ValueError(f"data must be 'digits' or 'imagefolder:PATH', got {spec!r}")


@dataclass(frozen=True)
class ViTRecipe:
    """The superblock recipe's settings. The defaults are ``benchmarks/digits_supermask.py``'s (96.1% test accuracy
    at 90% sparsity vs 95.6% dense on digits, 3 seeds). sparsity 0 trains the dense model (no pruner).
    patch_size None: a quarter of the image side (4×4 patches)."""

    sparsity: float = 0.9
    block: int = 16
    epochs: int = 60
    lr: float = 3e-3
    batch_size: int = 64
    layers: int = 4
    heads: int = 4
    width: int = 128
    patch_size: int | None = None
    ramp: float = 0.6  # Supermask's sparsity rises (cubic) over this fraction of the steps, then holds
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity}")
        normalize_block_size(self.block)
        counts = {"epochs": self.epochs, "batch_size": self.batch_size, "layers": self.layers, "heads": self.heads}
        if bad := [f"{name}={value}" for name, value in counts.items() if value < 1]:
            raise ValueError(f"{', '.join(bad)}: must be at least 1")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")
        if self.patch_size is not None and self.patch_size < 1:
            raise ValueError(
                f"patch_size must be at least 1 (or None: a quarter of the image side), got {self.patch_size}"
            )
        if not (self.lr > 0 and 0.0 < self.ramp <= 1.0):
            raise ValueError(f"lr must be positive and ramp in (0, 1], got {self.lr} and {self.ramp}")


def vit_training(data: ImageData, recipe: ViTRecipe) -> tuple[ClassifierTraining, Pruner | None]:
    """The ViT of ``recipe`` for ``data`` (on CUDA when available), with its Supermask pruner, ready to train."""
    patch = recipe.patch_size or data.image_size // 4
    if data.image_size % patch:
        raise ValueError(f"patch size {patch} does not divide the image side {data.image_size}")
    config = ViTConfig(
        image_size=data.image_size,
        patch_size=patch,
        channels=data.channels,
        classes=len(data.classes),
        layers=recipe.layers,
        heads=recipe.heads,
        width=recipe.width,
    )
    device = _device()
    torch.manual_seed(recipe.seed)
    model = ViT(config).to(device)
    images, labels = data.train_images.to(device), data.train_labels.to(device)
    pruner = None
    if recipe.sparsity > 0:
        steps = recipe.epochs * -(-len(labels) // recipe.batch_size)
        schedule = CubicSchedule(0, int(recipe.ramp * steps))
        pruner = Pruner(model, SparsityConfig(recipe.sparsity, recipe.block, targets="mlp"), "supermask", schedule)
    # after the pruner: the optimizer trains Supermask's scores too
    training = ClassifierTraining(
        model, images, labels, recipe.epochs, recipe.batch_size, recipe.lr, recipe.seed, pruner
    )
    return training, pruner


def finish_vit(training: ClassifierTraining, pruner: Pruner | None, data: ImageData) -> dict:
    """Convert the trained ViT (``pruner.finalize()``) and measure it: test accuracy, params and bytes
    before/after."""
    model = training.model.eval()
    dense_size = model_size(model)
    if pruner is not None:
        report = pruner.finalize()
        dense_size = report.model_params_before, report.model_bytes_before
    device = next(model.parameters()).device
    test_accuracy = accuracy(model, data.test_images.to(device), data.test_labels.to(device))
    sparse_size = model_size(model)
    return {
        "test_accuracy": test_accuracy,
        "params": (dense_size[0], sparse_size[0]),
        "bytes": (dense_size[1], sparse_size[1]),
    }


def train_vit(
    data: str = "digits",
    out: str | Path = "sparseblocks-vit",
    recipe: ViTRecipe | None = None,
    image_size: int | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict | None:
    """The superblock recipe on ``data`` (see :func:`load_image_data`): train, convert, print and return the test
    accuracy, params and bytes before/after; save the converted model in ``out``. Checkpoints every epoch.

    Returns None when stopped at ``stop_after`` steps (the checkpoint in ``out`` continues with ``resume``).
    """
    out, recipe = Path(out), recipe or ViTRecipe()
    images = load_image_data(data, image_size, recipe.seed)
    training, pruner = vit_training(images, recipe)
    settings = {
        "recipe": "vit",
        "data": data,
        **dataclasses.asdict(recipe),
        "data_sha256": _fingerprint(images.train_images, images.train_labels, images.test_images, images.test_labels),
    }
    run_training(training, out, settings, training.steps_per_epoch, resume, stop_after, progress, "vit")
    if training.step < training.steps:
        print(f"stopped at step {training.step}/{training.steps}; continue with --resume")
        return None
    result = finish_vit(training, pruner, images)
    kind = f"Supermask {recipe.sparsity:.0%}, blocks {recipe.block}" if pruner else "dense"
    print(
        f"vit on {data} ({len(images.classes)} classes, {len(images.train_labels)} training images): {kind}, "
        f"{recipe.epochs} epochs"
    )
    print(f"  test accuracy {result['test_accuracy']:.2%} on {len(images.test_labels)} images (converted model)")
    _print_sizes(*zip(result["params"], result["bytes"], strict=True))
    save_recipe_model(training.model, out, settings, result, classes=list(images.classes))
    print(f"  saved to {out}; load it with sparseblocks.recipes.training.load_recipe_model('{out}')")
    return result
