"""Save and load sparsified models: safetensors for the tensors, JSON for what the sparse layers are. No pickle.

``save_sparse(model, folder)`` writes ``sparseblocks.safetensors`` (the whole state dict: the sparse layers' tiles
and indices, or 2:4 values and group masks, and every dense tensor, tied weights once) and ``sparseblocks.json``
(library version and, per sparse layer, its pattern, shape, dtype, bias and what its layout records: block, tile
count, density; see :mod:`sparseblocks.integrations.layouts`).
``load_sparse(folder, model)`` turns the named linears of a freshly built model into sparse layers and loads
everything. Each tensor read from disk is checked against the JSON and each matrix or 2:4 mask is validated (index
bounds, pointer monotonicity, shapes, dtypes, two of four kept) before any kernel can
see it: a crafted file gets a ``ValueError`` that says what is wrong, never an illegal memory access.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model
from torch import nn

from sparseblocks.integrations.layouts import LAYOUTS, check_entries, layer_entry, sparse_module_types
from sparseblocks.integrations.sparsify import FUSED_MODULES, fuse_mlps, replace_module, sparse_layers

WEIGHTS_FILE = "sparseblocks.safetensors"
CONFIG_FILE = "sparseblocks.json"
FORMAT_VERSION = 1


def _key(layer: str, part: str) -> str:
    """A layer's tensor in the state dict: ``layer.part``, or ``part`` for the model itself (a bare layer)."""
    return f"{layer}.{part}" if layer else part


def save_sparse(model: nn.Module, folder: str | Path) -> Path:
    """Write ``model``'s tensors and its sparse layers' description into ``folder`` (created); return the folder."""
    from sparseblocks import __version__

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = {name: layer_entry(layer) for name, layer in sparse_layers(model).items()}
    fused = [name for name, module in model.named_modules() if isinstance(module, FUSED_MODULES)]
    config = {"format": "sparseblocks", "format_version": FORMAT_VERSION, "library_version": __version__}
    (folder / CONFIG_FILE).write_text(json.dumps({**config, "layers": layers, "fused_mlps": fused}, indent=1) + "\n")
    save_model(model, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{folder / CONFIG_FILE}: not a readable sparseblocks config ({error})") from error
    if not isinstance(config, dict) or config.get("format") != "sparseblocks":
        raise ValueError(f"{folder / CONFIG_FILE}: not a sparseblocks config")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder / CONFIG_FILE}: format_version {config.get('format_version')!r} is not supported")
    check_entries(config.get("layers"), CONFIG_FILE)
    fused = config.setdefault("fused_mlps", [])
    if not isinstance(fused, list) or not all(isinstance(name, str) for name in fused):
        raise ValueError(f"{folder / CONFIG_FILE}: 'fused_mlps' must be a list of module names")
    return config


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


def load_sparse(folder: str | Path, model: nn.Module, strict: bool = True) -> nn.Module:
    """Load a ``save_sparse`` folder into ``model`` (same architecture, freshly built, on any device or on
    ``meta``): its saved sparse layers become the modules of their layouts (``BlockSparseLinear``,
    ``SemiStructuredLinear``), every tensor is loaded, and MLPs that ran as ``SparseMLP`` (or
    ``SparseLinearActivation``) when saved do so again. Returns ``model`` (for the checkpoint of
    a bare sparse layer, the loaded layer: a module cannot replace itself).

    strict: the file and the model must hold the same tensors (tied weights count once).
    """
    folder = Path(folder)
    config = _read_config(folder)
    try:
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt", device="cpu") as file:
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (OSError, SafetensorError) as error:
        raise ValueError(f"{folder / WEIGHTS_FILE}: not a readable safetensors file ({error})") from error

    _materialize_meta(model)
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
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
