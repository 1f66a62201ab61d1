"""Many processes: FSDP2 sharding of sparse models (:mod:`.fsdp`), tensor parallelism over tile-balanced splits
(:mod:`.tensor_parallel`), distributed checkpoints (:mod:`.checkpoint`). See ``docs/distributed.md``.

Names are imported on first use: the sparse layers and the pruner read sharded tensors through :mod:`.tensors`
without loading ``torch.distributed.checkpoint`` or the rest.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "checkpoint": ("CheckpointMismatchError", "export_sparse", "load_patterns", "load_sharded", "save_sharded",
                   "whole_parameters"),
    "fsdp": ("PatternMismatchError", "check_patterns", "set_sharded_pattern", "shard_sparse_model",
             "transformer_blocks"),
    "tensors": ("full_tensor", "is_sharded", "placed_like", "write_full"),
    "tensor_parallel": ("ParallelGroup", "PlanError", "gpt_plan", "llama_plan", "parallelize_sparse",
                        "split_units"),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
