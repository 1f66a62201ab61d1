"""Sparse weight layouts: what ``SparsityConfig.pattern`` names, one :class:`Layout` per pattern in :data:`LAYOUTS`.

A layout says how a pruned ``nn.Linear`` becomes a sparse module (:meth:`Layout.from_linear`), at what granularity
a pruner scores and masks it (:meth:`Layout.mask_block`, :meth:`Layout.select`), what a checkpoint's JSON entry
holds for it (:meth:`Layout.config_entry`, :meth:`Layout.check_entry`) and how its tensors are checked and loaded
(:meth:`Layout.tensor_shapes`, :meth:`Layout.load`), and, for loaders that fill a module's tensors in place
(``transformers``' ``from_pretrained``), its empty module and the check after filling (:meth:`Layout.empty`,
:meth:`Layout.settle`). :func:`check_entries` checks a file's entries before anything is read. ``sparsify``,
``densify``, ``save_sparse``, ``load_sparse`` and the ``Pruner`` ask the layout and never name a pattern, so a new
layout (e.g. int8/fp8-quantized tiles: its module, its ``values`` and ``scales`` tensors, its dtype check) is one
module with a :class:`Layout` subclass and a call of :func:`register_layout`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn

from sparseblocks.format import (
    INDEX_DTYPE,
    STORED_INDEX_NAMES,
    VALUE_DTYPES_BY_NAME,
    BlockSparseMatrix,
    normalize_block_size,
)
from sparseblocks.masks import n_of_m_mask, top_blocks_mask
from sparseblocks.nn import BlockSparseLinear, SemiStructuredLinear
from sparseblocks.nn.semi_structured import GROUP, KEPT, check_groups

DEFAULT = "block"  # the pattern of checkpoint entries that name none (every file before 2:4 existed)


class Layout:
    """One sparse layout. Subclasses set :attr:`name` and :attr:`module` and implement the hooks below.

    Every sparse module a layout builds has ``out_features``, ``in_features``, ``bias`` (or None) and ``to_linear()``.
    """

    name: str
    module: type[nn.Module]  # the sparse layer it builds (how sparse_layers, densify and save_sparse find them)
    free_masks = True  # the pruner may keep any tiles at any density; False (2:4): one score per layer picks them
    from_linears = True  # a pattern SparsityConfig takes (built from an nn.Linear); False: made from sparse layers
    integer_fields: tuple[str, ...] = ()  # checkpoint entry fields (besides the shape) that are integers >= 0
    index_dtypes: ClassVar[Mapping[str, torch.dtype]] = {}  # the stored tensors besides values, by part: their dtypes

    def check_sparsity(self, sparsity: float) -> None:
        """Raise ``ValueError`` for a sparsity this layout cannot hold."""

    def mask_block(self, block_size: int | Sequence[int]) -> tuple[int, int]:
        """The ``(bn, bk)`` cells a pruner scores and masks (a config's ``block_size`` may not apply)."""
        raise NotImplementedError

    def select(self, scores: torch.Tensor, keep: float) -> torch.Tensor:
        """The bool mask of the cells to keep from ``scores`` (same shape; higher = keep), ``keep`` a fraction."""
        raise NotImplementedError

    def from_linear(
        self, linear: nn.Linear, sparsity: float, block_size: int | Sequence[int], mask: torch.Tensor | None
    ) -> nn.Module:
        """The sparse module standing in for ``linear``: the cells of ``mask`` (as :meth:`select` gives it), or
        chosen by magnitude at ``sparsity`` when None."""
        raise NotImplementedError

    def describe(self, layer: nn.Module) -> tuple[tuple[int, int], float]:
        """``(block, density)`` of a module it built, for the sparsify report."""
        raise NotImplementedError

    def dtype(self, layer: nn.Module) -> torch.dtype:
        """The dtype a checkpoint records for the layer (its floating-point weights)."""
        return layer.values.dtype

    def values_dtype(self, entry: Mapping) -> torch.dtype:
        """The dtype of the stored ``values`` an entry implies (its ``dtype``; a quantized layout's int8 or fp8)."""
        return VALUE_DTYPES_BY_NAME[entry["dtype"]]

    def config_entry(self, layer: nn.Module) -> dict:
        """What a checkpoint's JSON says about the layer beyond pattern, shape, dtype and bias."""
        raise NotImplementedError

    def check_entry(self, name: str, entry: Mapping) -> None:
        """Raise ``ValueError`` for a JSON entry of layer ``name`` this layout cannot load (the shape, dtype, bias
        and :attr:`integer_fields` are checked already)."""

    def tensor_shapes(self, entry: Mapping) -> dict[str, tuple[int, ...]]:
        """The layer's tensors in the weights file (bias aside), by part name, with the shapes ``entry`` implies."""
        raise NotImplementedError

    def check_dtypes(self, entry: Mapping, tensors: Mapping[str, torch.Tensor], bias: torch.Tensor | None) -> None:
        """Raise ``ValueError`` unless the tensors have the dtypes the entry names (here: ``values`` and bias in
        ``entry["dtype"]``; a quantized layout checks its integer values and float scales instead)."""
        values = tensors["values"]
        if values.dtype != VALUE_DTYPES_BY_NAME[entry["dtype"]] or (bias is not None and bias.dtype != values.dtype):
            dtypes = f"{values.dtype}" + ("" if bias is None else f" and {bias.dtype}")
            raise ValueError(f"values and bias must be floating point {entry['dtype']}, got {dtypes}")

    def load(self, entry: Mapping, tensors: Mapping[str, torch.Tensor], bias: torch.Tensor | None) -> nn.Module:
        """The module from checked-shape tensors; validates their contents (``ValueError``) before any kernel runs."""
        raise NotImplementedError

    def empty(self, entry: Mapping, dtype: torch.dtype, device: torch.device | str = "meta") -> nn.Module:
        """The module of ``entry`` with uninitialised stored tensors (:meth:`tensor_shapes`; ``values`` and bias in
        ``dtype``, the rest in :attr:`index_dtypes`), for a loader that fills them in place; nothing is computed, so
        ``device`` may be ``meta``. :meth:`settle` must run on it before it is used."""
        layer = self.module.__new__(self.module)  # no __init__: it would validate tensors that hold nothing yet
        nn.Module.__init__(layer)
        layer.out_features, layer.in_features = entry["out_features"], entry["in_features"]
        for part, shape in self.tensor_shapes(entry).items():
            if part == "values":
                layer.values = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
            else:
                layer.register_buffer(part, torch.empty(shape, dtype=self.index_dtypes[part], device=device))
        bias = torch.empty(entry["out_features"], dtype=dtype, device=device) if entry["bias"] else None
        layer.bias = None if bias is None else nn.Parameter(bias)
        return layer

    def settle(self, layer: nn.Module) -> None:
        """Validate, in place, the tensors a loader put into an :meth:`empty` module (``ValueError`` naming what is
        wrong: nothing read from outside reaches a kernel unchecked) and derive what is not stored. Subclasses
        check their own tensors after this (the bias)."""
        n, bias, dtype = layer.out_features, layer.bias, layer.values.dtype
        if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != dtype):
            raise ValueError(f"bias must be {dtype} of shape ({n},), got {bias.dtype} {tuple(bias.shape)}")


class BlockLayout(Layout):
    """Tiles of ``block_size`` (:class:`~sparseblocks.nn.BlockSparseLinear`, BSR storage)."""

    name, module = "block", BlockSparseLinear
    integer_fields = ("nnz",)
    index_dtypes: ClassVar = {"crow_indices": INDEX_DTYPE, "col_indices": INDEX_DTYPE}

    def mask_block(self, block_size):
        return normalize_block_size(block_size)

    def select(self, scores, keep):
        return top_blocks_mask(scores, keep)

    def from_linear(self, linear, sparsity, block_size, mask):
        return BlockSparseLinear.from_linear(linear, sparsity, block_size, mask)

    def describe(self, layer):
        return layer.matrix.block_shape, layer.matrix.density

    def config_entry(self, layer):
        matrix = layer.matrix
        return {"block": list(matrix.block_shape), "nnz": matrix.nnz, "density": matrix.density}

    def check_entry(self, name, entry):
        normalize_block_size(entry.get("block"))

    def tensor_shapes(self, entry):
        n, (bn, bk) = entry["out_features"], normalize_block_size(entry["block"])
        return {"values": (entry["nnz"], bn, bk), "crow_indices": (-(-n // bn) + 1,), "col_indices": (entry["nnz"],)}

    def load(self, entry, tensors, bias):
        shape = (entry["out_features"], entry["in_features"])
        matrix = BlockSparseMatrix(tensors["values"], tensors["crow_indices"], tensors["col_indices"], shape)
        return BlockSparseLinear.from_matrix(matrix, bias)

    def settle(self, layer):
        buffers = layer._buffers
        shape = (layer.out_features, layer.in_features)
        super().settle(layer)
        matrix = BlockSparseMatrix(layer.values.data, buffers["crow_indices"], buffers["col_indices"], shape)
        for name, index in matrix.index_tensors().items():  # the derived ones are not in any file
            layer.register_buffer(name, index, persistent=name in STORED_INDEX_NAMES)


class TwoOfFourLayout(Layout):
    """2 of every 4 weights along a row (:class:`~sparseblocks.nn.SemiStructuredLinear`); sparsity 0.5 only."""

    name, module = "2:4", SemiStructuredLinear
    free_masks = False  # the pattern fixes the density: masks are chosen per weight, per layer
    index_dtypes: ClassVar = {"groups": torch.uint8}

    def check_sparsity(self, sparsity):
        if sparsity != 1.0 - KEPT / GROUP:
            raise ValueError(f"2:4 keeps 2 of every 4 weights: sparsity must be 0.5, got {sparsity}")

    def mask_block(self, block_size):
        return (1, 1)  # scores and masks are per weight

    def select(self, scores, keep):
        return n_of_m_mask(scores, KEPT, GROUP)

    def from_linear(self, linear, sparsity, block_size, mask):
        return SemiStructuredLinear.from_linear(linear, mask)

    def describe(self, layer):
        return (1, GROUP), KEPT / GROUP

    def config_entry(self, layer):
        return {"density": KEPT / GROUP}

    def check_entry(self, name, entry):
        if entry["in_features"] % GROUP:
            raise ValueError(f"2:4 layer {name!r} needs in_features divisible by {GROUP}")

    def tensor_shapes(self, entry):
        n, k = entry["out_features"], entry["in_features"]
        return {"values": (n, k * KEPT // GROUP), "groups": (n, k // GROUP)}

    def load(self, entry, tensors, bias):
        return SemiStructuredLinear(tensors["values"], tensors["groups"], bias)

    def empty(self, entry, dtype, device="meta"):
        layer = super().empty(entry, dtype, device)
        layer._compressed = None
        return layer

    def settle(self, layer):
        n, k = layer.out_features, layer.in_features
        if layer.values.dtype not in VALUE_DTYPES_BY_NAME.values() or layer.values.shape != (n, k * KEPT // GROUP):
            raise ValueError(f"values must be floating point ({n}, {k * KEPT // GROUP}), got {layer.values.dtype} "
                             f"{tuple(layer.values.shape)}")  # fmt: skip
        super().settle(layer)
        check_groups(layer.groups, (n, k))


LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> Layout:
    """Make ``layout`` a pattern that ``SparsityConfig``, the pruner, ``sparsify`` and checkpoints accept."""
    if layout.name in LAYOUTS:
        raise ValueError(f"a layout named {layout.name!r} is registered already")
    LAYOUTS[layout.name] = layout
    return layout


def sparsify_patterns() -> tuple[str, ...]:
    """The layouts ``SparsityConfig.pattern`` (and the CLI's ``--pattern``) may name: those built from an
    ``nn.Linear`` (a quantized layout is made from sparse layers instead: ``SparsityConfig(quantize=...)``)."""
    return tuple(name for name, layout in LAYOUTS.items() if layout.from_linears)


def get_layout(pattern: str) -> Layout:
    """The layout of ``pattern``; ``ValueError`` naming the known ones otherwise."""
    if not isinstance(pattern, str) or pattern not in LAYOUTS:
        raise ValueError(f"pattern must be one of {tuple(LAYOUTS)}, got {pattern!r}")
    return LAYOUTS[pattern]


def sparse_module_types() -> tuple[type[nn.Module], ...]:
    """The module classes of every registered layout (what counts as a sparse layer)."""
    return tuple(layout.module for layout in LAYOUTS.values())


def layout_of(layer: nn.Module) -> Layout:
    """The layout that built ``layer`` (its own class first, so a subclass module may have a layout of its own)."""
    for layout in LAYOUTS.values():
        if type(layer) is layout.module:
            return layout
    for layout in LAYOUTS.values():
        if isinstance(layer, layout.module):
            return layout
    raise ValueError(f"{type(layer).__name__} is no module of a registered layout {tuple(LAYOUTS)}")


def layer_entry(layer: nn.Module) -> dict:
    """What a file records about a sparse layer: shape, pattern (``block`` layers name none, as in the files written
    before 2:4 existed), what its layout adds (block, tile count, density), dtype and bias."""
    layout = layout_of(layer)
    entry = {"out_features": layer.out_features, "in_features": layer.in_features}
    if layout.name != DEFAULT:
        entry["pattern"] = layout.name
    dtype = str(layout.dtype(layer)).removeprefix("torch.")
    return {**entry, **layout.config_entry(layer), "dtype": dtype, "bias": layer.bias is not None}


def check_entries(layers: object, source: str) -> dict[str, dict]:
    """Check a file's layer entries (``{name: entry}``, as ``save_sparse`` and ``save_pretrained`` write them)
    before any tensor is read: a known pattern, non-negative integer sizes, a boolean bias, a known dtype and what
    the layout checks; entries without a pattern are ``block`` (set in place). ``ValueError`` naming ``source``."""
    if not isinstance(layers, dict):
        raise ValueError(f"{source}: 'layers' must be a mapping")
    for name, entry in layers.items():
        pattern = entry.setdefault("pattern", DEFAULT) if isinstance(entry, dict) else None
        if not isinstance(pattern, str) or pattern not in LAYOUTS:
            raise ValueError(f"{source}: layer {name!r} needs a mapping with a pattern of {tuple(LAYOUTS)}")
        layout = LAYOUTS[pattern]
        fields = ("out_features", "in_features", *layout.integer_fields)
        if any(not isinstance(entry.get(f), int) or entry[f] < 0 for f in fields):
            raise ValueError(f"{source}: layer {name!r} needs non-negative integers {fields}")
        if not isinstance(entry.get("bias"), bool):
            raise ValueError(f"{source}: layer {name!r} needs a boolean 'bias'")
        if entry.get("dtype") not in VALUE_DTYPES_BY_NAME:
            raise ValueError(f"{source}: layer {name!r} needs a 'dtype' of {sorted(VALUE_DTYPES_BY_NAME)}")
        try:
            layout.check_entry(name, entry)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from error
    return layers


register_layout(BlockLayout())
register_layout(TwoOfFourLayout())
