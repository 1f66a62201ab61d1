"""LoRA adapters over sparse layers with PEFT: ``y = sparse(x) + B·A·x · scaling``, the sparse base frozen.

::

    from peft import get_peft_model
    from sparseblocks.integrations.lora import load_sparse_adapter, merge_onto_pattern, sparse_lora_config

    model = get_peft_model(sparse_model, sparse_lora_config(r=8, target_modules=["up_proj", "down_proj"]))
    ...  # train (Trainer or a loop): only the adapters learn
    model.save_pretrained("adapter/")            # a plain PEFT adapter folder
    model = load_sparse_adapter(sparse_model, "adapter/")

The adapters attach through PEFT's custom-module mechanism (``LoraConfig._register_custom_module``, experimental
in PEFT 0.21: its docs say it may change), which :func:`sparse_lora_config` and :func:`load_sparse_adapter` call for
:class:`~sparseblocks.nn.BlockSparseLinear`. Not for 2:4 layers: PEFT's module replacement reads a ``weight``
attribute as a tensor, and :class:`~sparseblocks.nn.SemiStructuredLinear`'s ``weight`` is a method (PEFT then says
the module type is not supported). The registration is
not saved in ``adapter_config.json``, so a plain ``PeftModel.from_pretrained`` cannot rebuild the adapters: load
them with :func:`load_sparse_adapter`.

Merging: the product ``B·A`` is dense, and adding it to a sparse weight would change the pattern, so ``merge`` /
``merge_and_unload`` raise ``ValueError``. :func:`merge_onto_pattern` merges anyway, keeping only the part of the
delta on the kept tiles: the pattern stays, and the merged model differs from the adapted one by
the delta on the pruned tiles.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from sparseblocks.format import BlockSparseMatrix
from sparseblocks.nn import BlockSparseLinear

_REFUSAL = (
    "a LoRA delta is dense; adding it to a sparse layer would change its pattern. Keep the adapter unmerged, or "
    "call sparseblocks.integrations.lora.merge_onto_pattern(model) to keep only the delta on the kept tiles"
)


def _on_pattern(layer: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """The tiles of a dense ``(N, K)`` delta that ``layer``'s pattern keeps, shaped like its ``values``."""
    matrix = layer.matrix
    return BlockSparseMatrix.from_dense(
        delta.to(layer.values.dtype), matrix.block_shape, mask=matrix.block_mask()
    ).values


class SparseLoraLinear(LoraLinear):
    """PEFT's LoRA layer over a sparse layer: the forward is PEFT's (the base layer's output plus the adapters');
    merging refuses unless :attr:`project_on_merge` is set (see the module docstring)."""

    project_on_merge = False

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        return base_layer.values.device, base_layer.values.dtype  # PEFT reads ``weight``, which a sparse layer lacks

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if not self.project_on_merge:
            raise ValueError(_REFUSAL)
        from peft.tuners.tuners_utils import check_adapters_to_merge

        base = self.get_base_layer()
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A or adapter in self.lora_variant or self.lora_bias[adapter]:
                if adapter in self.lora_A:
                    raise ValueError(f"adapter {adapter!r}: only plain LoRA (no DoRA or other variant, no lora_bias) "
                                     "merges onto a sparse pattern")  # fmt: skip
                continue
            merged = base.values.data + _on_pattern(base, self.get_delta_weight(adapter))
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            base.values.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            base.values.data -= _on_pattern(base, self.get_delta_weight(adapter))

    def __repr__(self) -> str:
        return "sparse_lora." + super().__repr__()


SPARSE_LORA_LAYERS = {BlockSparseLinear: SparseLoraLinear}


def register(config: LoraConfig) -> LoraConfig:
    """``config`` with :class:`SparseLoraLinear` registered for the sparse layers (PEFT's custom modules)."""
    config._register_custom_module(SPARSE_LORA_LAYERS)
    return config


def sparse_lora_config(**kwargs) -> LoraConfig:
    """``LoraConfig(**kwargs)`` that can target sparse layers (``target_modules`` as PEFT takes them)."""
    return register(LoraConfig(**kwargs))


def load_sparse_adapter(model: nn.Module, folder: str, **kwargs) -> PeftModel:
    """``PeftModel.from_pretrained(model, folder, **kwargs)`` for an adapter saved over sparse layers."""
    config = register(LoraConfig.from_pretrained(folder))
    return PeftModel.from_pretrained(model, folder, config=config, **kwargs)


def merge_onto_pattern(model: PeftModel, adapter_names: list[str] | None = None) -> nn.Module:
    """``model.merge_and_unload()`` for adapters over sparse layers: each delta projected onto its layer's pattern
    (the delta on pruned tiles is dropped: the result approximates the adapted model). Returns the base model."""
    for module in model.modules():
        if isinstance(module, SparseLoraLinear):
            module.project_on_merge = True
    return model.merge_and_unload(adapter_names=adapter_names)
