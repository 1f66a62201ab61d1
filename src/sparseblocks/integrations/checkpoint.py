"""Save and load sparsified models: safetensors for the tensors, JSON for what the sparse layers are. No pickle.

``save_sparse(model, folder)`` writes ``sparseblocks.safetensors`` (the whole state dict: the sparse layers' tiles
and indices, or 2:4 values and group masks, and every dense tensor, tied weights once) and ``sparseblocks.json``
(library version and, per sparse layer, its pattern, shape, dtype, bias and what its layout records: block, tile
count, density; see :mod:`sparseblocks.integrations.layouts`).
``load_sparse(folder, model)`` turns the named linears of a freshly built model into sparse layers and loads
everything. Each tensor read from disk is checked against the JSON and each matrix or 2:4 mask is validated (index
bounds, pointer monotonicity, shapes, dtypes, two of four kept) before any kernel can
see it: a crafted file gets a ``ValueError`` that says what is wrong, never an illegal memory access.

Integrity: the JSON records the SHA-256 of every tensor (and of any extra file saved with the folder, e.g. a Hugging
Face ``config.json``); ``load_sparse`` compares them and names the tensor or file that differs (``verify=False``
skips the hashing). Files written before digests existed load unverified, with a warning in the ``sparseblocks``
log. Saves are atomic (:mod:`sparseblocks.integrations.files`): each file is written beside its target and renamed
into place, the JSON last, after the old JSON is removed; a save killed at any point leaves the old checkpoint, the
new one, or a folder without JSON that ``load_sparse`` refuses, never old JSON beside new tensors. Memory: before the
file's tensors are checked against the JSON and the model, nothing larger than the file is allocated (a model on
``meta`` gets its memory only after its tensors were found in the file with their shapes).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model
from torch import nn

from sparseblocks.integrations.files import file_sha256, read_json, replacing_files, tensor_sha256
from sparseblocks.integrations.layouts import (
    LAYOUTS,
    check_entries,
    layer_entry,
    sparse_module_types,
)
from sparseblocks.integrations.sparsify import FUSED_MODULES, fuse_mlps, replace_module, sparse_layers

WEIGHTS_FILE = "sparseblocks.safetensors"
CONFIG_FILE = "sparseblocks.json"
FORMAT_VERSION = 1
DIGESTS = "sha256"  # the config's {"tensors": {key: hex}, "files": {name: hex}}

logger = logging.getLogger("sparseblocks")


def _key(layer: str, part: str) -> str:
    """A layer's tensor in the state dict: ``layer.part``, or ``part`` for the model itself (a bare layer)."""
    return f"{layer}.{part}" if layer else part


def save_sparse(model: nn.Module, folder: str | Path, extra_files: Mapping[str, bytes | str] | None = None) -> Path:
    """Write ``model``'s tensors and its sparse layers' description into ``folder`` (created); return the folder.

    extra_files: other files of the folder (name -> contents, str as UTF-8), written in the same atomic update
    and hashed in the JSON, so that ``load_sparse`` refuses them if they change (a recipe's ``recipe.json``,
    a Hugging Face ``config.json`` and tokenizer)."""
    from sparseblocks import __version__

    folder = Path(folder)
    extra = {
        name: data.encode() if isinstance(data, str) else bytes(data) for name, data in (extra_files or {}).items()
    }
    for name in extra:
        if name in (WEIGHTS_FILE, CONFIG_FILE) or Path(name).name != name or name.startswith("."):
            raise ValueError(f"extra file {name!r}: must be a plain file name other than {WEIGHTS_FILE}, {CONFIG_FILE}")
    folder.mkdir(parents=True, exist_ok=True)
    layers = {name: layer_entry(layer) for name, layer in sparse_layers(model).items()}
    fused = [name for name, module in model.named_modules() if isinstance(module, FUSED_MODULES)]
    config = {"format": "sparseblocks", "format_version": FORMAT_VERSION, "library_version": __version__}
    with replacing_files(folder, [WEIGHTS_FILE, *extra, CONFIG_FILE], record=CONFIG_FILE) as temporary:
        save_model(model, str(temporary[WEIGHTS_FILE]), metadata={"format": "pt"})
        with safe_open(str(temporary[WEIGHTS_FILE]), framework="pt", device="cpu") as file:  # the bytes written
            tensors = {key: tensor_sha256(file.get_tensor(key)) for key in file.keys()}  # noqa: SIM118
        for name, data in extra.items():
            temporary[name].write_bytes(data)
        digests = {"tensors": tensors, "files": {name: file_sha256(temporary[name]) for name in extra}}
        payload = {**config, "layers": layers, "fused_mlps": fused, DIGESTS: digests}
        temporary[CONFIG_FILE].write_text(json.dumps(payload, indent=1) + "\n")
    return folder


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _check_digests(folder: Path, digests: object) -> None:
    """``ValueError`` unless ``digests`` is ``{"tensors": {key: sha256}, "files": {name: sha256}}``."""
    where = f"{folder / CONFIG_FILE}: '{DIGESTS}'"
    if not isinstance(digests, dict) or set(digests) != {"tensors", "files"}:
        raise ValueError(f"{where} must be a mapping of 'tensors' and 'files'")
    for kind, entries in digests.items():
        if not isinstance(entries, dict) or not all(_is_digest(d) for d in entries.values()):
            raise ValueError(f"{where}: '{kind}' must map names to SHA-256 hex digests")
    for name in digests["files"]:
        if name in (WEIGHTS_FILE, CONFIG_FILE) or Path(name).name != name or name.startswith("."):
            raise ValueError(f"{where}: {name!r} is not a file this folder may hold")


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.exists() and (folder / WEIGHTS_FILE).exists():
        raise ValueError(f"{path}: missing beside {WEIGHTS_FILE}: a save into this folder was interrupted")
    try:
        config = read_json(path.read_bytes(), str(path))
    except OSError as error:
        raise ValueError(f"{path}: not a readable sparseblocks config ({error})") from error
    except ValueError as error:
        raise ValueError(f"not a readable sparseblocks config: {error}") from error
    if not isinstance(config, dict) or config.get("format") != "sparseblocks":
        raise ValueError(f"{folder / CONFIG_FILE}: not a sparseblocks config")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder / CONFIG_FILE}: format_version {config.get('format_version')!r} is not supported")
    check_entries(config.get("layers"), CONFIG_FILE)
    fused = config.setdefault("fused_mlps", [])
    if not isinstance(fused, list) or not all(isinstance(name, str) for name in fused):
        raise ValueError(f"{folder / CONFIG_FILE}: 'fused_mlps' must be a list of module names")
    if DIGESTS in config:
        _check_digests(folder, config[DIGESTS])
    return config


def _verify_files(folder: Path, config: dict) -> None:
    """``ValueError`` naming the first extra file whose bytes are not those the config's digests record."""
    for name, digest in config[DIGESTS]["files"].items():
        if not (folder / name).is_file():
            raise ValueError(f"{folder / name}: missing; {CONFIG_FILE} records it (an interrupted or partial copy)")
        if file_sha256(folder / name) != digest:
            raise ValueError(
                f"{folder / name}: SHA-256 differs from the one {CONFIG_FILE} records (changed or damaged)"
            )


def read_config(folder: str | Path, verify: bool = True) -> dict:
    """The validated ``sparseblocks.json`` of a ``save_sparse`` folder; with ``verify``, the extra files it records
    checked against their SHA-256 (``ValueError`` naming the first that differs)."""
    folder = Path(folder)
    config = _read_config(folder)
    if DIGESTS not in config:
        logger.warning("%s records no SHA-256 digests (written before they existed): loaded unverified", folder)
    elif verify:
        _verify_files(folder, config)
    return config


def read_tensors(folder: str | Path, verify: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a ``save_sparse`` folder, the config validated and, with ``verify``, every tensor and
    extra file checked against the SHA-256 its JSON records (``ValueError`` naming the first that differs)."""
    folder = Path(folder)
    config = read_config(folder, verify)
    digests = config.get(DIGESTS)
    try:
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt", device="cpu") as file:
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (OSError, SafetensorError) as error:
        raise ValueError(f"{folder / WEIGHTS_FILE}: not a readable safetensors file ({error})") from error
    if digests is not None and verify:
        recorded = digests["tensors"]
        for key, tensor in tensors.items():
            if key not in recorded:
                raise ValueError(f"{folder / WEIGHTS_FILE}: tensor {key!r} is not recorded in {CONFIG_FILE}")
            if tensor_sha256(tensor) != recorded[key]:
                raise ValueError(
                    f"{folder / WEIGHTS_FILE}: tensor {key!r} does not match its SHA-256 in {CONFIG_FILE} "
                    "(damaged, or written by another save)"
                )
        absent = sorted(recorded.keys() - tensors.keys())
        if absent:
            raise ValueError(f"{folder / WEIGHTS_FILE}: lacks tensors {CONFIG_FILE} records: {absent[:5]}")
    return config, tensors


def _load_layer(name: str, entry: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Check a layer's tensors against its JSON entry and build the module of its layout (which validates them)."""
    layout = LAYOUTS[entry["pattern"]]
    expected = layout.tensor_shapes(entry)
    if entry["bias"]:
        expected["bias"] = (entry["out_features"],)
    for part, shape in expected.items():
        tensor = tensors.get(_key(name, part))
        if tensor is None:
            raise ValueError(f"layer {name!r}: the weights file has no tensor {_key(name, part)}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"layer {name!r}: {part} has shape {tuple(tensor.shape)}, expected {shape}")
    parts = {part: tensors[_key(name, part)] for part in expected}
    bias = parts.pop("bias", None)
    try:
        layout.check_dtypes(entry, parts, bias)
        return layout.load(entry, parts, bias)
    except ValueError as error:
        raise ValueError(f"layer {name!r}: {error}") from error


def _check_meta_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], strict: bool) -> None:
    """Before the model's ``meta`` tensors get memory: each must be in the file with its shape (``strict``: a tied
    tensor under one of its names), so that a model built from crafted sizes is refused, not allocated."""
    names: dict[int, list[str]] = {}
    shapes: dict[int, torch.Size] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if tensor is not None and tensor.is_meta:
            names.setdefault(id(tensor), []).append(key)
            shapes[id(tensor)] = tensor.shape
    for identity, keys in names.items():
        found = [key for key in keys if key in tensors]
        for key in found:
            if tensors[key].shape != shapes[identity]:
                expected, found_shape = tuple(shapes[identity]), tuple(tensors[key].shape)
                raise ValueError(f"the model's {key} has shape {expected}, the checkpoint's {found_shape}")
        if strict and not found:
            raise ValueError(f"checkpoint and model differ: the checkpoint has no tensor {keys[0]}")


def _materialize_meta(model: nn.Module) -> None:
    """Give parameters and persistent buffers on ``meta`` uninitialised CPU storage (tied ones stay tied); the
    checkpoint fills them. A non-persistent buffer on ``meta`` cannot be recovered from any file: an error."""
    lost = [
        f"{name}.{key}" if name else key
        for name, module in model.named_modules()
        for key, buffer in module._buffers.items()
        if buffer is not None and buffer.is_meta and key in module._non_persistent_buffers_set
    ]
    if lost:
        raise ValueError(
            f"the model has buffers on the meta device that no checkpoint holds ({', '.join(lost[:3])}): "
            "build it with only its parameters on meta (e.g. accelerate.init_empty_weights()), or on a real device"
        )
    materialized: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, tensor in store.items():
                if tensor is None or not tensor.is_meta:
                    continue
                if id(tensor) not in materialized:
                    empty = torch.empty_like(tensor, device="cpu")
                    if isinstance(tensor, nn.Parameter):
                        empty = nn.Parameter(empty, requires_grad=tensor.requires_grad)
                    materialized[id(tensor)] = empty
                store[key] = materialized[id(tensor)]


def load_sparse(folder: str | Path, model: nn.Module, strict: bool = True, verify: bool = True) -> nn.Module:
    """Load a ``save_sparse`` folder into ``model`` (same architecture, freshly built, on any device or on
    ``meta``): its saved sparse layers become the modules of their layouts (``BlockSparseLinear``,
    ``SemiStructuredLinear``), every tensor is loaded, and MLPs that ran as ``SparseMLP`` (or
    ``SparseLinearActivation``) when saved do so again. Returns ``model`` (for the checkpoint of
    a bare sparse layer, the loaded layer: a module cannot replace itself).

    strict: the file and the model must hold the same tensors (tied weights count once).
    verify: check every tensor and extra file against the SHA-256 digests the JSON records (False: faster, and a
    damaged file is caught only where its contents fail validation).
    """
    config, tensors = read_tensors(folder, verify)
    device = next((t.device for t in model.parameters() if not t.is_meta), torch.device("cpu"))
    sparse_keys = set()
    for name, entry in config["layers"].items():
        try:
            current = model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"layer {name!r} of the checkpoint is not in the model") from error
        if not isinstance(current, (nn.Linear, *sparse_module_types())) or (
            (current.out_features, current.in_features) != (entry["out_features"], entry["in_features"])
        ):
            raise ValueError(
                f"layer {name!r}: the model has {current!r}, the checkpoint a "
                f"{entry['out_features']}x{entry['in_features']} linear"
            )
        # on the model's device, in the dtype of the layer it replaces (as load_state_dict casts the dense tensors)
        layer = _load_layer(name, entry, tensors).to(device=device, dtype=next(current.parameters()).dtype)
        if name:
            replace_module(model, name, layer)
        else:  # the checkpoint of a bare layer: the loaded layer is the model
            model = layer
        sparse_keys.update(_key(name, key) for key in layer.state_dict())

    _check_meta_tensors(model, tensors, strict)
    _materialize_meta(model)
    dense = {key: tensor for key, tensor in tensors.items() if key not in sparse_keys}
    result = model.load_state_dict(dense, strict=False)
    if strict:
        state = model.state_dict()
        loaded_storage = {state[key].untyped_storage().data_ptr() for key in dense if key in state}
        missing = [
            key
            for key in result.missing_keys
            if key not in sparse_keys and state[key].untyped_storage().data_ptr() not in loaded_storage
        ]
        if missing or result.unexpected_keys:
            unexpected = result.unexpected_keys[:5]
            raise ValueError(f"checkpoint and model differ: missing {missing[:5]}, unexpected {unexpected}")
    if config["fused_mlps"]:
        fuse_mlps(model)
        modules = dict(model.named_modules())
        unfused = [name for name in config["fused_mlps"] if not isinstance(modules.get(name), FUSED_MODULES)]
        if unfused:
            raise ValueError(f"the checkpoint ran these MLPs fused, the model cannot: {unfused[:5]}")
    return model
