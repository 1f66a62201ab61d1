"""Quantized block-sparse layers in models and checkpoints: the ``block-quantized`` layout
(:class:`~sparseblocks.nn.QuantizedBlockSparseLinear`: int8 or fp8 tiles, float32 scales per tile row),
:func:`quantize_model`, and :func:`quantization_errors`, the per-layer report of what quantizing costs on
calibration data.

A checkpoint entry of this layout is a ``block`` entry plus ``"quantization"`` (``"int8"``, ``"fp8"`` or
``"fp8-w8a8"``); its ``dtype`` is the bias's (the activations'), float32 without a bias. The tensors are
``values`` (int8 or float8_e4m3fn), ``scales`` (float32 ``(nnz, bn)``), ``crow_indices`` and ``col_indices``;
their dtypes are checked against the entry and their contents validated (``BlockSparseMatrix``) before any kernel
sees them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
from torch import nn

from sparseblocks.format import (
    INDEX_DTYPE,
    QUANTIZED_DTYPES,
    SCALE_DTYPE,
    STORED_INDEX_NAMES,
    VALUE_DTYPES_BY_NAME,
    BlockSparseMatrix,
    normalize_block_size,
)
from sparseblocks.integrations.layouts import BlockLayout, register_layout
from sparseblocks.nn import BlockSparseLinear, QuantizedBlockSparseLinear

QUANTIZE_KINDS = ("int8", "fp8", "fp8-w8a8")


def _tile_dtype(kind: str) -> torch.dtype:
    return QUANTIZED_DTYPES["fp8" if kind == "fp8-w8a8" else kind]


class QuantizedBlockLayout(BlockLayout):
    """Quantized tiles of ``block_size`` (:class:`~sparseblocks.nn.QuantizedBlockSparseLinear`). Made from a
    ``block`` layer by :func:`quantize_model` (or ``SparsityConfig(quantize=...)``), not from an ``nn.Linear``."""

    name, module = "block-quantized", QuantizedBlockSparseLinear
    from_linears = False
    index_dtypes: ClassVar = {"crow_indices": INDEX_DTYPE, "col_indices": INDEX_DTYPE, "scales": SCALE_DTYPE}

    def from_linear(self, linear, sparsity, block_size, mask):
        raise ValueError("quantized layers come from sparse ones: SparsityConfig(pattern='block', quantize=...)")

    def dtype(self, layer):
        return layer.bias.dtype if layer.bias is not None else torch.float32

    def config_entry(self, layer):
        return {**super().config_entry(layer), "quantization": layer.quantization}

    def values_dtype(self, entry):
        return _tile_dtype(entry["quantization"])

    def check_entry(self, name, entry):
        super().check_entry(name, entry)
        if entry.get("quantization") not in QUANTIZE_KINDS:
            raise ValueError(f"layer {name!r} needs a 'quantization' of {QUANTIZE_KINDS}")

    def tensor_shapes(self, entry):
        bn = normalize_block_size(entry["block"])[0]
        return {**super().tensor_shapes(entry), "scales": (entry["nnz"], bn)}

    def check_dtypes(self, entry, tensors, bias):
        expected = _tile_dtype(entry["quantization"])
        if tensors["values"].dtype != expected or tensors["scales"].dtype != SCALE_DTYPE:
            raise ValueError(f"{entry['quantization']} tiles need {expected} values and {SCALE_DTYPE} scales, got "
                             f"{tensors['values'].dtype} and {tensors['scales'].dtype}")  # fmt: skip
        if bias is not None and bias.dtype != VALUE_DTYPES_BY_NAME[entry["dtype"]]:
            raise ValueError(f"bias must be {entry['dtype']}, got {bias.dtype}")

    def load(self, entry, tensors, bias):
        shape = (entry["out_features"], entry["in_features"])
        matrix = BlockSparseMatrix(tensors["values"], tensors["crow_indices"], tensors["col_indices"], shape,
                                   tensors["scales"], entry["quantization"] == "fp8-w8a8")  # fmt: skip
        return QuantizedBlockSparseLinear.from_matrix(matrix, bias)

    def empty(self, entry, dtype, device="meta"):
        layer = super().empty(entry, dtype, device)
        shape = self.tensor_shapes(entry)["values"]
        layer.values = nn.Parameter(torch.empty(shape, dtype=_tile_dtype(entry["quantization"]), device=device),
                                    requires_grad=False)  # fmt: skip
        layer.fp8_activations = entry["quantization"] == "fp8-w8a8"
        return layer

    def settle(self, layer):
        buffers, shape = layer._buffers, (layer.out_features, layer.in_features)
        matrix = BlockSparseMatrix(layer.values.data, buffers["crow_indices"], buffers["col_indices"], shape,
                                   buffers["scales"], layer.fp8_activations)  # fmt: skip
        bias = layer.bias
        if bias is not None and (tuple(bias.shape) != (shape[0],) or not bias.is_floating_point()):
            raise ValueError(
                f"bias must be floating point of shape ({shape[0]},), got {bias.dtype} {tuple(bias.shape)}"
            )
        for name, index in matrix.index_tensors().items():
            layer.register_buffer(name, index, persistent=name in STORED_INDEX_NAMES)


register_layout(QuantizedBlockLayout())


def quantize_model(model: nn.Module, kind: str) -> list[str]:
    """Replace every (unquantized) :class:`~sparseblocks.nn.BlockSparseLinear` of ``model`` by its quantized
    version (``kind``: ``"int8"``, ``"fp8"`` or ``"fp8-w8a8"``), in place, each labelled with its module name for
    errors; returns the names. For inference: a backward through a quantized layer raises."""
    if kind not in QUANTIZE_KINDS:
        raise ValueError(f"quantize takes one of {QUANTIZE_KINDS}, got {kind!r}")
    names = [name for name, module in model.named_modules() if type(module) is BlockSparseLinear]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not name:
            raise ValueError("the model itself is a BlockSparseLinear: call its quantize()")
        layer = getattr(parent, child)
        try:
            setattr(parent, child, layer.quantize(kind, label=name))
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from error
    return names


def quantization_errors(
    model: nn.Module, batch: object, kind: str, run: Callable[[nn.Module, object], object] | None = None
) -> dict[str, float]:
    """What quantizing each sparse layer to ``kind`` would cost, on calibration data: ``{name: ‖x·Wqᵀ − x·Wᵀ‖ /
    ‖x·Wᵀ‖}`` in float64 over the inputs ``x`` each :class:`~sparseblocks.nn.BlockSparseLinear` of ``model`` sees
    when ``run(model, batch)`` runs (default: ``model(**batch)`` for a mapping, else ``model(batch)``), without
    gradients. The model is not changed."""
    if kind not in QUANTIZE_KINDS:
        raise ValueError(f"quantize takes one of {QUANTIZE_KINDS}, got {kind!r}")
    run = run or (lambda m, b: m(**b) if isinstance(b, Mapping) else m(b))
    layers = {name: m for name, m in model.named_modules() if type(m) is BlockSparseLinear}
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    hooks = [layer.register_forward_pre_hook(lambda m, args, name=name: inputs[name].append(args[0].detach()))
             for name, layer in layers.items()]  # fmt: skip
    try:
        with torch.no_grad():
            run(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    errors = {}
    for name, layer in layers.items():
        if not inputs[name]:
            continue
        x = torch.cat([t.reshape(-1, layer.in_features) for t in inputs[name]]).double()
        matrix = layer.matrix
        exact = x @ matrix.to_dense().double().t()
        quantized = x @ matrix.quantize(kind).to_dense().double().t()
        if kind == "fp8-w8a8":
            from sparseblocks.format import quantize_rows

            xq, scales = quantize_rows(x)
            quantized = (xq.double() * scales.double()[:, None]) @ matrix.quantize(kind).to_dense().double().t()
        errors[name] = ((quantized - exact).norm() / exact.norm().clamp_min(1e-300)).item()
    return errors
