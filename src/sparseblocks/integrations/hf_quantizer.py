"""Sparse models as ordinary Hugging Face folders: ``from_pretrained`` / ``save_pretrained`` through a registered
``quant_method: "sparseblocks"`` (transformers' quantizer hooks), no ``trust_remote_code``.

::

    import sparseblocks.integrations.hf_quantizer  # registers the method (sparseblocks.integrations.huggingface too)
    model = AutoModelForCausalLM.from_pretrained("dense/")
    sparsify(model, SparsityConfig(0.9, 32, "mlp"))      # records a SparseBlocksConfig on a transformers model
    model.save_pretrained("sparse/")                     # safetensors (values + indices) + config.json
    model = AutoModelForCausalLM.from_pretrained("sparse/", dtype=torch.bfloat16, device_map="cpu")

Loading: before any weight is read, each layer the config names (``layers``: the entries of
:func:`~sparseblocks.integrations.layouts.layer_entry`) is checked (:func:`check_entries`; the module must be a
linear of that shape) along with the tensors the checkpoint headers announce (names, shapes, dtypes), and the
linear is replaced by the empty sparse module of its layout on the meta device, so no dense weight is ever
materialised. transformers then fills the stored tensors; :meth:`Layout.settle` validates them (index bounds,
monotone pointers, 2:4 groups) and derives the transposed index before the model is returned, so a crafted folder
gets a ``ValueError`` before any kernel runs. MLPs saved fused are fused again.

Saving: ``save_pretrained`` asks the quantizer for the state dict; it refreshes the config's layer entries from the
model first, so training, ``fuse_mlps`` or more ``sparsify`` calls after loading are recorded.

Not supported (yet): ``from_pretrained(dense, quantization_config=SparseBlocksConfig(...))`` (sparsifying while
loading: use :func:`~sparseblocks.sparsify` after loading); ``quantization`` other than None (int8/fp8 tiles).
Without importing this module first, transformers does not know the method, warns, and loads the linears randomly
initialised: import ``sparseblocks.integrations.hf_quantizer`` (or ``sparseblocks.integrations.huggingface``)
before ``from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from safetensors import safe_open
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from sparseblocks.format import VALUE_DTYPES_BY_NAME
from sparseblocks.integrations.layouts import LAYOUTS, check_entries, layer_entry
from sparseblocks.integrations.sparsify import (
    FUSED_MODULES,
    SparsityConfig,
    as_linear,
    densify,
    fuse_mlps,
    replace_module,
    sparse_layers,
)

METHOD = "sparseblocks"
FORMAT_VERSION = 1
# safetensors' dtype names, for the header check
_HEADER_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                  torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8", torch.float8_e4m3fn: "F8_E4M3"}  # fmt: skip


@register_quantization_config(METHOD)
class SparseBlocksConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a sparse folder.

    layers: ``{module name: entry}``, one :func:`~sparseblocks.integrations.layouts.layer_entry` per sparse layer
    (what loading builds). sparsity / block_size / targets / exclude / pattern: the
    :class:`~sparseblocks.SparsityConfig` that made the model (a record: loading reads ``layers``).
    quantization: None (tiles in the model's dtype); the field for int8/fp8 tiles later. fused_mlps: modules that
    ran as one ``SparseMLP`` when saved. command: the command line that made the folder (for the model card).
    """

    def __init__(
        self,
        layers: Mapping[str, dict] | None = None,
        sparsity: float | Mapping[str, float] | None = None,
        block_size: int | list[int] | None = None,
        targets: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        pattern: str = "block",
        quantization: str | None = None,
        fused_mlps: list[str] | None = None,
        command: str | None = None,
        format_version: int = FORMAT_VERSION,
        library_version: str | None = None,
        **kwargs,
    ) -> None:
        from sparseblocks import __version__

        self.quant_method = METHOD
        self.layers = check_entries(dict(layers or {}), "quantization_config")
        self.sparsity, self.block_size, self.targets, self.exclude = sparsity, block_size, targets, exclude
        self.pattern, self.quantization, self.fused_mlps, self.command = (
            pattern,
            quantization,
            fused_mlps or [],
            command,
        )
        self.format_version, self.library_version = format_version, library_version or __version__
        if format_version != FORMAT_VERSION:
            raise ValueError(f"quantization_config: sparseblocks format_version {format_version!r} is not supported")
        if quantization is not None:
            raise ValueError(
                f"quantization_config: quantization {quantization!r} is not supported yet (only None: tiles stored "
                "in the model's dtype)"
            )
        if not isinstance(self.fused_mlps, list) or not all(isinstance(name, str) for name in self.fused_mlps):
            raise ValueError("quantization_config: 'fused_mlps' must be a list of module names")

    @classmethod
    def from_sparsity_config(cls, config: SparsityConfig, command: str | None = None) -> SparseBlocksConfig:
        def plain(value):  # JSON-ready
            return value if isinstance(value, str | int | float) else (dict(value) if isinstance(value, Mapping)
                                                                       else list(value))  # fmt: skip

        return cls(
            sparsity=plain(config.sparsity),
            block_size=plain(config.block_size),
            targets=plain(config.targets),
            exclude=plain(config.exclude),
            pattern=config.pattern,
            command=command,
        )


def _resolve(model: nn.Module, name: str) -> str:
    """The module name in ``model`` of a layer saved as ``name`` by a model with or without the base model's prefix
    (a folder saved from ``BertForMaskedLM`` loads into ``BertModel``, as transformers renames its keys)."""
    names = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    for candidate in (name, name.removeprefix(f"{prefix}."), f"{prefix}.{name}"):
        if candidate in names:
            return candidate
    raise ValueError(f"quantization_config: layer {name!r} is not a module of {type(model).__name__}")


def _headers(files: Iterable[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, safetensors dtype)}`` of the checkpoint's tensors, from the headers alone."""
    found = {}
    for path in files:
        if not str(path).endswith(".safetensors"):
            raise ValueError(f"{path}: a sparseblocks folder holds safetensors weights only")
        with safe_open(str(path), framework="pt", device="cpu") as file:
            for key in file.keys():  # noqa: SIM118 (safe_open is no dict)
                part = file.get_slice(key)
                found[key] = (tuple(part.get_shape()), part.get_dtype())
    return found


def _renamed(model: nn.Module, headers: dict, quantizer: HfQuantizer) -> dict:
    """``headers`` under the names transformers loads them as: the model's key renamings (ViT's checkpoints keep
    ``encoder.layer.0.intermediate.dense`` for ``layers.0.mlp.fc1``) and base-model prefixes applied."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model, None, quantizer)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state, prefix = model.state_dict(), getattr(model, "base_model_prefix", None)
    return {rename_source_key(key, renamings, converters, prefix, state)[0]: value for key, value in headers.items()}


def _check_tensors(saved: str, name: str, entry: dict, headers: dict) -> None:
    """Every tensor of the layer is in the checkpoint with the shape and dtype its entry implies."""
    layout = LAYOUTS[entry["pattern"]]
    value_dtype = _HEADER_DTYPES[VALUE_DTYPES_BY_NAME[entry["dtype"]]]
    tiles_dtype = _HEADER_DTYPES[layout.values_dtype(entry)]  # the entry's dtype, or a quantized layout's
    expected = {part: (shape, tiles_dtype if part == "values" else _HEADER_DTYPES[layout.index_dtypes[part]])
                for part, shape in layout.tensor_shapes(entry).items()}  # fmt: skip
    if entry["bias"]:
        expected["bias"] = ((entry["out_features"],), value_dtype)
    for part, (shape, dtype) in expected.items():
        found = headers.get(f"{name}.{part}")
        if found is None:
            raise ValueError(f"layer {saved!r}: the checkpoint has no tensor {saved}.{part}")
        if found != (shape, dtype):
            raise ValueError(f"layer {saved!r}: {part} is {found[1]} {found[0]} in the checkpoint, its entry implies "
                             f"{dtype} {shape}")  # fmt: skip


def _skipping_sparse_parents(initialize):
    """transformers' weight initialisation, except for modules that hold a sparse layer and whose own tensors all
    came from the checkpoint: some models' ``_init_weights`` read a child linear's ``.weight`` there (GPT-2's MLP and
    attention rescale ``c_proj.weight``), which a sparse layer does not have; its tensors came from the checkpoint
    anyway (checked before loading)."""
    sparse = tuple(layout.module for layout in LAYOUTS.values())

    def guarded(module, *args, **kwargs):
        loaded = all(
            getattr(t, "_is_hf_initialized", False) for t in (*module.parameters(False), *module.buffers(False))
        )
        if loaded and any(isinstance(child, sparse) for child in module.children()):
            return None
        return initialize(module, *args, **kwargs)

    return guarded


@register_quantizer(METHOD)
class SparseBlocksQuantizer(HfQuantizer):
    """Builds the sparse modules before the weights load and validates them after (see the module docstring)."""

    requires_calibration = True  # folders made by sparsify / prune; from_pretrained does not sparsify a dense one
    quantization_config: SparseBlocksConfig

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        config = self.quantization_config
        self._names = {}
        for saved, entry in config.layers.items():
            name = _resolve(model, saved)
            current = model.get_submodule(name)
            linear = as_linear(current)
            if linear is None or (linear.out_features, linear.in_features) != (entry["out_features"],
                                                                               entry["in_features"]):  # fmt: skip
                raise ValueError(
                    f"layer {saved!r}: the model has {current!r}, the config a "
                    f"{entry['out_features']}x{entry['in_features']} linear"
                )
            weight = linear.weight
            replace_module(model, name, LAYOUTS[entry["pattern"]].empty(entry, weight.dtype, weight.device))
            self._names[saved] = name
        headers = _renamed(model, _headers(checkpoint_files or []), self)
        for saved, name in self._names.items():
            _check_tensors(saved, name, config.layers[saved], headers)
        for module in model.modules():
            if hasattr(module, "_initialize_weights"):  # each PreTrainedModel, the model and its sub-models
                module._initialize_weights = _skipping_sparse_parents(module._initialize_weights)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        for module in model.modules():
            module.__dict__.pop("_initialize_weights", None)
        for saved, name in self._names.items():
            layer = model.get_submodule(name)
            meta = [key for key, tensor in layer.state_dict().items() if tensor.is_meta]
            if meta:
                raise ValueError(f"layer {saved!r}: {meta} were not loaded")
            try:
                LAYOUTS[config.layers[saved]["pattern"]].settle(layer)
            except ValueError as error:
                raise ValueError(f"layer {saved!r}: {error}") from error
        if config.fused_mlps:
            fuse_mlps(model)
            modules = dict(model.named_modules())
            unfused = [name for name in config.fused_mlps if not isinstance(modules.get(_resolve(model, name)),
                                                                            FUSED_MODULES)]  # fmt: skip
            if unfused:
                raise ValueError(f"the checkpoint ran these MLPs fused, the model cannot: {unfused[:5]}")
        return model

    def refresh(self, model: nn.Module) -> SparseBlocksConfig:
        """The config's layer entries and fused MLPs read again from ``model``; put back on ``model.config``."""
        config = self.quantization_config
        config.layers = {name: layer_entry(layer) for name, layer in sparse_layers(model).items()}
        config.fused_mlps = [name for name, module in model.named_modules() if isinstance(module, FUSED_MODULES)]
        model.config.quantization_config = config
        return config

    def get_state_dict_and_metadata(self, model):
        self.refresh(model)  # save_pretrained writes config.json after this
        return None, {}

    def _dequantize(self, model, dtype=None):
        return densify(model)

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # Trainer fine-tunes the kept tiles of a sparse model directly (the pattern stays fixed)
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def attach(model: nn.Module, config: SparsityConfig | None = None, command: str | None = None) -> SparseBlocksConfig:
    """Mark a transformers model holding sparse layers (made by :func:`~sparseblocks.sparsify` in this process) as a
    ``sparseblocks`` model, so that ``save_pretrained`` writes the config ``from_pretrained`` reads; ``config`` and
    ``command`` are recorded. :func:`~sparseblocks.sparsify` calls it on transformers models."""
    quantizer = getattr(model, "hf_quantizer", None)
    if not isinstance(quantizer, SparseBlocksQuantizer):
        quantizer = SparseBlocksQuantizer(SparseBlocksConfig(), pre_quantized=True)
        model.hf_quantizer, model.is_quantized, model.quantization_method = quantizer, True, METHOD
    recorded = quantizer.quantization_config
    if config is not None:
        fresh = SparseBlocksConfig.from_sparsity_config(config)
        for field in ("sparsity", "block_size", "targets", "exclude", "pattern"):
            setattr(recorded, field, getattr(fresh, field))
    if command is not None:
        recorded.command = command
    return quantizer.refresh(model)


def detach(model: nn.Module) -> None:
    """Undo :func:`attach` (after :func:`~sparseblocks.densify`: the model is dense again)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if isinstance(quantizer, SparseBlocksQuantizer):
        quantizer.remove_quantization_config(model)
