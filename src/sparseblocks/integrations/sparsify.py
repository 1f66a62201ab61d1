"""One-line sparsification of whole models: ``sparsify(model, SparsityConfig(...))`` and ``densify(model)``.

Per-architecture knowledge is kept in small tables: :data:`PRESETS` (which linears a preset means: module-name
patterns for HF Llama/Mistral/Qwen2, BERT and sentence-transformers, HF ViT, timm ViT, torchvision ViT and
nanoGPT-style models), :data:`MLP_LAYOUTS` (which MLP modules :func:`fuse_mlps` can run as one
:class:`~sparseblocks.nn.SparseMLP`; :func:`register_mlp_layout` adds a model's own) and
:data:`LINEAR_ACTIVATION_LAYOUTS` (halves of MLPs split in two, run as one
:class:`~sparseblocks.nn.SparseLinearActivation`). Module *instances* are replaced, so a model's own forward
keeps working.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sparseblocks.integrations.layouts import LAYOUTS, get_layout, sparse_module_types, sparsify_patterns
from sparseblocks.integrations.quantized import QUANTIZE_KINDS
from sparseblocks.nn import BlockSparseLinear, SparseLinearActivation, SparseMLP
from sparseblocks.nn.linear import trainable_as

logger = logging.getLogger("sparseblocks")

# Regular expressions over full module names (``named_modules``), per preset.
PRESETS: dict[str, tuple[str, ...]] = {
    "mlp": (
        r"(^|\.)mlp\.(gate_proj|up_proj|down_proj)$",  # HF Llama, Mistral, Qwen2
        r"(^|\.)mlp\.(fc1|fc2)$",  # timm Mlp, HF ViT (transformers 5)
        r"(^|\.)mlp\.(fc|proj)$",  # nanoGPT-style models
        r"(^|\.)mlp\.(c_fc|c_proj)$",  # HF GPT-2 (Conv1D modules: see LINEAR_LIKE)
        r"(^|\.)mlp\.(0|3)$",  # torchvision MLPBlock (Linear, GELU, Dropout, Linear, Dropout)
        r"(^|\.)intermediate\.dense$",  # BERT, sentence-transformers, HF ViT (transformers 4)
        r"(^|\.)layer\.\d+\.output\.dense$",  # their second MLP linear (not attention.output.dense)
    ),
    "attention": (
        r"(^|\.)self_attn\.(q_proj|k_proj|v_proj|o_proj)$",  # HF Llama, Mistral, Qwen2
        r"(^|\.)attention\.(self|attention)\.(query|key|value)$",  # BERT, HF ViT (transformers 4)
        r"(^|\.)attention\.output\.dense$",
        r"(^|\.)attention\.(q_proj|k_proj|v_proj|o_proj)$",  # HF ViT (transformers 5)
        r"(^|\.)attn\.(qkv|proj)$",  # timm ViT, nanoGPT-style models
        r"(^|\.)attn\.(c_attn|c_proj)$",  # HF GPT-2
    ),
    # every nn.Linear but the output heads, which pruning usually leaves dense
    "all-linear": (r"^(?!(.*\.)?(lm_head|head|heads|classifier)(\.|$)).+$",),
}


@dataclass(frozen=True)
class MLPLayout:
    """Where an MLP module keeps its parts: child names of the linears, of the activation module (or a fixed
    ``activation`` its forward calls), of the dropouts after the activation and after ``down``, and of children
    that must be ``nn.Identity`` for the module to compute what ``SparseMLP`` does."""

    up: str
    down: str
    gate: str | None = None
    activation_module: str | None = None
    activation: str | None = None
    dropouts: tuple[str | None, str | None] = (None, None)
    identities: tuple[str, ...] = ()


# (package, class name) -> layout. BERT (and HF ViT before transformers 5) split their MLP over two modules
# (intermediate, output), with the residual and LayerNorm in the second: see LINEAR_ACTIVATION_LAYOUTS.
_SWIGLU = MLPLayout(up="up_proj", down="down_proj", gate="gate_proj", activation_module="act_fn")
MLP_LAYOUTS: dict[tuple[str, str], MLPLayout] = {
    ("transformers", "LlamaMLP"): _SWIGLU,
    ("transformers", "MistralMLP"): _SWIGLU,
    ("transformers", "Qwen2MLP"): _SWIGLU,
    ("transformers", "ViTMLP"): MLPLayout(up="fc1", down="fc2", activation_module="activation_fn"),  # transformers 5
    ("timm", "Mlp"): MLPLayout(
        up="fc1", down="fc2", activation_module="act", dropouts=("drop1", "drop2"), identities=("norm",)
    ),  # fmt: skip
    ("torchvision", "MLPBlock"): MLPLayout(up="0", down="3", activation_module="1", dropouts=("2", "4")),
}


def register_mlp_layout(module_class: type[nn.Module], layout: MLPLayout) -> None:
    """Let :func:`fuse_mlps` run instances of ``module_class`` (an MLP of your own model) as one
    :class:`~sparseblocks.nn.SparseMLP`, its parts found where ``layout`` says."""
    MLP_LAYOUTS[_layout_key(module_class)] = layout


def _layout_key(module_class: type) -> tuple[str, str]:
    """(top-level package, class name): how the layout tables know a module class."""
    return module_class.__module__.partition(".")[0], module_class.__name__


# (package, class name) -> (child name of the linear, of the activation): modules computing activation(linear(x)),
# which fuse_mlps runs as one SparseLinearActivation (the first half of the MLPs above that split in two)
LINEAR_ACTIVATION_LAYOUTS: dict[tuple[str, str], tuple[str, str]] = {
    ("transformers", name): ("dense", "intermediate_act_fn")
    for name in ("BertIntermediate", "RobertaIntermediate", "XLMRobertaIntermediate", "ViTIntermediate")
}


FUSED_MODULES = (SparseMLP, SparseLinearActivation)  # what fuse_mlps puts in a model


def _conv1d_as_linear(module: nn.Module) -> nn.Linear:
    """transformers' ``Conv1D`` (GPT-2) computes ``x · W + b`` with W stored ``(in, out)``: the same linear."""
    weight, bias = module.weight, module.bias
    with torch.device(weight.device):  # on meta too: no dense weight is made for a module being replaced
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None, dtype=weight.dtype)
    if not weight.is_meta:
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if bias is not None:
                linear.bias.copy_(bias)
    trainable_as((linear.weight, linear.bias), (weight, bias))
    return linear


# (package, class name) -> the nn.Linear a module of that class computes: linears stored another way, which
# sparsify targets as it does nn.Linear
LINEAR_LIKE = {("transformers", "Conv1D"): _conv1d_as_linear}


def as_linear(module: nn.Module) -> nn.Linear | None:
    """``module`` itself if it is an ``nn.Linear``, the equivalent ``nn.Linear`` for a :data:`LINEAR_LIKE` module,
    else None."""
    if isinstance(module, nn.Linear):
        return module
    convert = LINEAR_LIKE.get(_layout_key(type(module)))
    return None if convert is None else convert(module)


def __getattr__(name: str):
    # PATTERNS, kept for imports of old: the registered layouts' names, read when asked for
    if name == "PATTERNS":
        return tuple(LAYOUTS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class SparsityConfig:
    """What :func:`sparsify` does.

    sparsity: fraction of tiles pruned, one number or ``{pattern: sparsity}`` (first matching pattern wins; a
    targeted module no pattern matches is an error). block_size: 16, 32, 64, 128 or a ``(bn, bk)`` pair.
    targets / exclude: preset names (``"mlp"``, ``"attention"``, ``"all-linear"``), shell globs over module names
    (``"model.layers.*.mlp.up_proj"``) or regular expressions written ``"re:..."``. method: deprecated, and only
    ``"magnitude"`` (what :func:`sparsify` always did: the tiles of largest L2 norm); name a score with
    :class:`~sparseblocks.pruning.pruner.Pruner`'s ``method`` instead. fuse_mlp: run each MLP that
    :data:`MLP_LAYOUTS` knows as one :class:`~sparseblocks.nn.SparseMLP` (activation fused into the first product)
    once its linears are sparse, and BERT's first MLP half as one product (:func:`fuse_mlps`).
    pattern: a layout of :data:`~sparseblocks.integrations.layouts.LAYOUTS`: ``"block"`` (tiles of ``block_size``,
    :class:`~sparseblocks.nn.BlockSparseLinear`) or ``"2:4"`` (2 of every 4 weights along a row,
    :class:`~sparseblocks.nn.SemiStructuredLinear`; sparsity 0.5, block_size unused).
    quantize: None, or ``"int8"`` / ``"fp8"`` / ``"fp8-w8a8"``: the sparse layers' tiles quantized for inference
    (:class:`~sparseblocks.nn.QuantizedBlockSparseLinear`, ``block`` pattern only; see docs/quantization.md).
    """

    sparsity: float | Mapping[str, float] = 0.9
    block_size: int | tuple[int, int] = 64
    targets: str | Sequence[str] = "mlp"
    exclude: str | Sequence[str] = ()
    method: str | None = None  # deprecated: sparsify only ever ranked tiles by magnitude
    fuse_mlp: bool = False
    pattern: str = "block"
    quantize: str | None = None

    def __post_init__(self) -> None:
        if self.quantize is not None:
            if self.quantize not in QUANTIZE_KINDS:
                raise ValueError(f"quantize must be None or one of {QUANTIZE_KINDS}, got {self.quantize!r}")
            if self.pattern != "block":
                raise ValueError(f"quantize takes the block pattern only, got pattern {self.pattern!r}")
        if self.method is not None:
            if self.method != "magnitude":
                raise ValueError(f"method must be 'magnitude' (block L2 norm), got {self.method!r}")
            warnings.warn(
                "SparsityConfig.method is deprecated and will be removed: sparsify always keeps the tiles of largest "
                "magnitude; choose a score with Pruner(method=...)",
                DeprecationWarning,
                stacklevel=3,
            )
        if self.pattern not in sparsify_patterns():
            raise ValueError(
                f"pattern must be one of {sparsify_patterns()}, got {self.pattern!r}"
                + (" (quantized layers: pattern='block', quantize=...)" if self.pattern in LAYOUTS else "")
            )
        layout = get_layout(self.pattern)
        values = self.sparsity.values() if isinstance(self.sparsity, Mapping) else [self.sparsity]
        for value in values:
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"sparsity must lie in [0, 1), got {value}")
            layout.check_sparsity(float(value))
        patterns = [*_as_list(self.targets), *_as_list(self.exclude)]
        if isinstance(self.sparsity, Mapping):
            patterns += list(self.sparsity)
        for pattern in patterns:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as error:
                    raise ValueError(f"{pattern!r} is not a regular expression: {error}") from error

    def sparsity_of(self, name: str) -> float:
        if not isinstance(self.sparsity, Mapping):
            return float(self.sparsity)
        for pattern, value in self.sparsity.items():
            if _matches(name, [pattern]):
                return float(value)
        raise ValueError(f"no entry of the sparsity mapping matches module {name!r}")


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    block: tuple[int, int]
    density: float
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int


@dataclass
class SparsifyReport:
    """What :func:`sparsify` replaced; ``str()`` gives a table."""

    layers: list[LayerReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    model_bytes_before: int = 0
    model_bytes_after: int = 0

    def __str__(self) -> str:
        lines = [f"{'layer':<48} {'shape':>12} {'block':>7} {'density':>8} {'params':>17} {'bytes':>21}"]
        for r in self.layers:
            lines.append(
                f"{r.name:<48} {f'{r.shape[0]}x{r.shape[1]}':>12} {f'{r.block[0]}x{r.block[1]}':>7} "
                f"{r.density:>8.3f} {f'{r.params_before:,} -> {r.params_after:,}':>17} "
                f"{f'{r.bytes_before:,} -> {r.bytes_after:,}':>21}"
            )
        lines.append(
            f"{len(self.layers)} layers replaced; model parameters {self.model_params_before:,} -> "
            f"{self.model_params_after:,}, bytes {self.model_bytes_before:,} -> {self.model_bytes_after:,} "
            f"({self.model_bytes_after / max(self.model_bytes_before, 1):.3f}x)"
        )
        return "\n".join(lines)


def _as_list(patterns: str | Sequence[str]) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    for pattern in patterns:
        if pattern in PRESETS:
            if any(re.search(expression, name) for expression in PRESETS[pattern]):
                return True
        elif pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def model_size(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of a model: every parameter and buffer, each shared tensor counted once."""
    params = {id(p): p for p in model.parameters()}
    tensors = {**params, **{id(b): b for b in model.buffers()}}
    return sum(p.numel() for p in params.values()), sum(t.numel() * t.element_size() for t in tensors.values())


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``name`` inside ``model`` (the instance is swapped; the model's code is untouched)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def target_linears(model: nn.Module, config: SparsityConfig, linear_like: bool = False) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules that ``config`` targets, by name, in model order; warns when there are none.
    linear_like: :data:`LINEAR_LIKE` modules too (``sparsify`` converts them; a pruner scoring ``weight`` would
    read GPT-2's transposed one).

    Raises ``ValueError`` for a target that a sparse layer could not stand in for (``_check_swappable``: the model
    itself, a module under two names, a tied weight, its own forward or hooks); leaves
    ``nn.MultiheadAttention``'s ``out_proj`` out with a warning (that module reads the weight directly, so a swapped
    module would never run).
    """
    targets, exclude = _as_list(config.targets), _as_list(config.exclude)
    weight_users: dict[int, int] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            weight_users[id(parameter)] = weight_users.get(id(parameter), 0) + 1
    names: dict[int, list[str]] = {}  # a module registered under several names is swapped under one only
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    chosen = []
    for name, module in model.named_modules():
        kind_targeted = isinstance(module, nn.Linear) or (linear_like and _layout_key(type(module)) in LINEAR_LIKE)
        if not kind_targeted or not _matches(name, targets) or _matches(name, exclude):
            continue
        parent_name = name.rpartition(".")[0]
        if isinstance(model.get_submodule(parent_name) if parent_name else model, nn.MultiheadAttention):
            logger.warning("sparseblocks: %s stays dense: nn.MultiheadAttention does not call its out_proj", name)
            continue
        _check_swappable(name, module, names[id(module)], weight_users[id(module.weight)])
        chosen.append((name, module))
    if not chosen:
        message = (
            f"sparseblocks: no nn.Linear matched targets={targets} (exclude={exclude}). "
            f"Targets are presets {sorted(PRESETS)}, shell globs over module names, or 're:<regex>'."
        )
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=3)
    return chosen


def _check_swappable(name: str, module: nn.Linear, names: list[str], weight_users: int) -> None:
    """Raise ``ValueError`` unless swapping ``module`` for a sparse layer keeps the model's function: not the model
    itself, one name only, its own weight, and nothing but ``nn.Linear``'s forward (no override, no hooks)."""
    if not name:
        raise ValueError("the model itself is an nn.Linear: convert it with BlockSparseLinear.from_linear")
    if len(names) > 1:
        raise ValueError(f"{name}: the same module is also registered as {names[1]!r}; exclude it")
    if weight_users > 1:
        raise ValueError(f"{name}: its weight is shared (tied) with another module; exclude it")
    hooks = module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
    own_forward = type(module).forward is not nn.Linear.forward and _layout_key(type(module)) not in LINEAR_LIKE
    if own_forward or "forward" in module.__dict__ or hooks:
        raise ValueError(
            f"{name}: a {type(module).__name__} with its own forward or with hooks; a sparse layer would drop "
            "them: exclude it"
        )


def sparsify(
    model: nn.Module, config: SparsityConfig | None = None, masks: Mapping[str, torch.Tensor] | None = None
) -> SparsifyReport:
    """Replace the targeted ``nn.Linear`` modules of ``model`` by the sparse modules of ``config.pattern``'s layout
    (``BlockSparseLinear``; ``SemiStructuredLinear`` for 2:4) in place; return a report.

    Tiles are chosen by magnitude, or given per layer name in ``masks`` (bool block masks, or element masks
    for 2:4, as a pruner leaves them). Shapes that are not a multiple of the block are padded, never skipped. See
    :func:`target_linears` for what is refused or left dense; warns when nothing matched.
    """
    config = config or SparsityConfig()
    params_before, bytes_before = model_size(model)
    report = SparsifyReport()
    layout = get_layout(config.pattern)
    for name, linear in target_linears(model, config, linear_like=True):
        mask = masks.get(name) if masks is not None else None
        sparse = layout.from_linear(as_linear(linear), config.sparsity_of(name), config.block_size, mask)
        if config.quantize is not None:
            sparse = sparse.quantize(config.quantize, label=name)
        block, density = layout.describe(sparse)
        replace_module(model, name, sparse)
        before = [t for t in (linear.weight, linear.bias) if t is not None]
        report.layers.append(
            LayerReport(
                name=name,
                shape=(sparse.out_features, sparse.in_features),
                block=block,
                density=density,
                params_before=sum(t.numel() for t in before),
                params_after=model_size(sparse)[0],
                bytes_before=sum(t.numel() * t.element_size() for t in before),
                bytes_after=model_size(sparse)[1],
            )
        )
    if config.fuse_mlp:
        fuse_mlps(model)
    if report.layers and _is_transformers_model(model):
        from sparseblocks.integrations.hf_quantizer import attach

        attach(model, config)  # save_pretrained then writes a folder from_pretrained loads sparse
    report.model_params_before, report.model_bytes_before = params_before, bytes_before
    report.model_params_after, report.model_bytes_after = model_size(model)
    return report


def _is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (without importing transformers)."""
    return any(_layout_key(kind) == ("transformers", "PreTrainedModel") for kind in type(model).__mro__)


def _activation_name(module: nn.Module) -> str | None:
    """The name ``spmm`` knows for an activation module, or None for one it does not fuse."""
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    names = {"SiLU": "silu", "SiLUActivation": "silu", "ReLU": "relu", "GELUActivation": "gelu",
             "NewGELUActivation": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "GELUTanh": "gelu_tanh"}  # fmt: skip
    return names.get(type(module).__name__)


def _fused(module: nn.Module) -> SparseMLP | SparseLinearActivation | None:
    """``module`` as a ``SparseMLP`` (or, a linear and its activation, a ``SparseLinearActivation``) holding its own
    linears, or None where its layout is unknown, its linears not sparse or its activation not one spmm fuses."""
    kind = type(module)
    key = _layout_key(kind)
    if key in MLP_LAYOUTS:
        fused = _sparse_mlp(module, MLP_LAYOUTS[key])
    elif key in LINEAR_ACTIVATION_LAYOUTS:
        fused = _sparse_linear_activation(module, *LINEAR_ACTIVATION_LAYOUTS[key])
    else:
        return None
    if fused is not None:
        fused.train(module.training)
        fused.unfused = (module,)  # a tuple: not registered as a submodule, so state dict keys stay the same
    return fused


def _computes_with_only(module: nn.Module, layers: list[nn.Module]) -> bool:
    """Whether every parameter of ``module`` belongs to ``layers``, the only ones the fused module computes with."""
    own = {id(p) for layer in layers for p in layer.parameters()}
    return all(id(p) in own for p in module.parameters())


def _sparse_linear_activation(module: nn.Module, linear: str, activation: str) -> SparseLinearActivation | None:
    layer, name = getattr(module, linear), _activation_name(getattr(module, activation))
    if not isinstance(layer, BlockSparseLinear) or name is None or not _computes_with_only(module, [layer]):
        return None
    return SparseLinearActivation(layer, name, linear)


def _sparse_mlp(module: nn.Module, layout: MLPLayout) -> SparseMLP | None:
    kind = type(module)
    roles = {role: getattr(layout, role) for role in ("up", "down", "gate") if getattr(layout, role) is not None}
    layers = {role: module.get_submodule(name) for role, name in roles.items()}
    if not all(isinstance(layer, BlockSparseLinear) for layer in layers.values()):
        return None
    if not all(isinstance(module.get_submodule(name), nn.Identity) for name in layout.identities):
        return None
    activation = layout.activation or _activation_name(module.get_submodule(layout.activation_module))
    if activation is None:
        logger.info("sparseblocks: %s stays unfused: its activation is not one spmm fuses", kind.__name__)
        return None
    if not _computes_with_only(module, list(layers.values())):
        return None
    dropout = tuple(0.0 if name is None else module.get_submodule(name).p for name in layout.dropouts)
    return SparseMLP(activation=activation, dropout=dropout, names=roles, **layers)


def fuse_mlps(model: nn.Module) -> int:
    """Replace, in place, every MLP module of a :data:`MLP_LAYOUTS` layout whose linears are all
    ``BlockSparseLinear`` by a :class:`~sparseblocks.nn.SparseMLP` holding the same linears, and every module of a
    :data:`LINEAR_ACTIVATION_LAYOUTS` layout (BERT's intermediate) by a
    :class:`~sparseblocks.nn.SparseLinearActivation`; returns how many. ``model`` itself is never replaced (there
    is nothing to put it in): pass the model that contains the MLP."""
    fused = 0
    for name, module in list(model.named_modules()):
        sparse = _fused(module) if name else None
        if sparse is not None:
            replace_module(model, name, sparse)
            fused += 1
    return fused


def densify(model: nn.Module) -> nn.Module:
    """Undo :func:`sparsify` in place: fused MLPs become their original modules again and every
    sparse layer of a registered layout an equivalent dense ``nn.Linear`` (zeros where pruned).
    A fused MLP built directly, not by :func:`fuse_mlps`, has no original to go back to: a ``ValueError``, and
    nothing changes."""
    fused = {name: module for name, module in model.named_modules() if isinstance(module, FUSED_MODULES)}
    if orphans := [name for name, module in fused.items() if not hasattr(module, "unfused")]:
        raise ValueError(
            f"{orphans[0]!r} was built as a fused MLP, not by fuse_mlps: there is no dense module to restore"
        )
    for name, module in fused.items():
        original = module.unfused[0]
        for child, layer in module.named_children():  # the linears may have moved or been retrained
            setattr(original, child, layer)
        # kept out of the model, the original missed every .train() / .eval() since fuse_mlps: its dropouts too
        original.train(module.training)
        replace_module(model, name, original)
    for name, module in list(model.named_modules()):
        if isinstance(module, sparse_module_types()):
            replace_module(model, name, module.to_linear().train(module.training))
    if _is_transformers_model(model):
        from sparseblocks.integrations.hf_quantizer import detach

        detach(model)
    return model


def sparse_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The sparse linears of a model (modules of every registered layout: ``BlockSparseLinear``,
    ``SemiStructuredLinear``), by name."""
    types = sparse_module_types()
    return {name: m for name, m in model.named_modules() if isinstance(m, types)}
