"""Distributed checkpoints of sharded sparse models (``torch.distributed.checkpoint``), and export to the
single-folder format of :func:`~sparseblocks.integrations.checkpoint.save_sparse`.

Each rank writes its shards of the tile values (and of every other sharded parameter); the patterns, replicated,
are written once. A checkpoint loads at another world size (written at 4 ranks, read at 2): DCP reads each rank's
new shards from whatever files hold them. Loading is two steps, because FSDP2 sizes a layer's shards from its tile
count: :func:`load_patterns` gives the unsharded model the checkpoint's patterns (and checks that the checkpoint
is of this model), then the model is sharded, then :func:`load_sharded` reads the values::

    load_patterns(model, path)           # every rank, before fully_shard
    shard_sparse_model(model, mesh)
    load_sharded(model, path)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from sparseblocks.format import STORED_INDEX_NAMES, BlockSparseMatrix
from sparseblocks.integrations.checkpoint import save_sparse
from sparseblocks.integrations.distributed.tensors import full_tensor, is_sharded
from sparseblocks.nn.linear import BlockSparseLinear


class CheckpointMismatchError(ValueError):
    """A distributed checkpoint that is not of this model (other tensors, other shapes)."""


def save_sharded(model: nn.Module, path: str | Path) -> None:
    """Write ``model``'s state (sharded or not) as a distributed checkpoint in the folder ``path``; every rank
    calls it."""
    dcp.save(get_model_state_dict(model), checkpoint_id=str(path))


def _checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    return {
        key: tuple(entry.size)
        for key, entry in metadata.state_dict_metadata.items()
        if isinstance(entry, TensorStorageMetadata)
    }


def _check_against(model_shapes: dict[str, tuple[int, ...]], saved: dict[str, tuple[int, ...]], path) -> None:
    """Raise :class:`CheckpointMismatchError` naming what differs between the model and the checkpoint."""
    missing, unexpected = sorted(model_shapes.keys() - saved.keys()), sorted(saved.keys() - model_shapes.keys())
    shapes = [f"{key}: checkpoint {saved[key]}, model {model_shapes[key]}"
              for key in sorted(model_shapes.keys() & saved.keys()) if saved[key] != model_shapes[key]]  # fmt: skip
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                 f"other shapes: {shapes[:5]}" if shapes else ""]  # fmt: skip
        raise CheckpointMismatchError(
            f"{path} is not a checkpoint of this model: {'; '.join(part for part in parts if part)}"
        )


def _pattern_keys(model: nn.Module) -> dict[str, BlockSparseLinear]:
    return {f"{name}.{part}": layer for name, layer in model.named_modules() if isinstance(layer, BlockSparseLinear)
            for part in ("values", *STORED_INDEX_NAMES)}  # fmt: skip


def load_patterns(model: nn.Module, path: str | Path) -> None:
    """Give every ``BlockSparseLinear`` of the unsharded ``model`` the tile pattern saved in ``path`` (values left
    for :func:`load_sharded`), after checking that the checkpoint holds this model's tensors in its shapes (the
    tile count aside); raises :class:`CheckpointMismatchError` otherwise. Every rank calls it."""
    if any(is_sharded(parameter) for parameter in model.parameters()):
        raise ValueError("load_patterns needs the model before sharding (FSDP2 sizes the shards from the patterns)")
    saved = _checkpoint_shapes(path)
    pattern_keys = _pattern_keys(model)
    ours = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    comparable = {key: shape for key, shape in ours.items() if not key.endswith((".values", ".col_indices"))
                  or key not in pattern_keys}  # fmt: skip
    _check_against(comparable, {key: saved[key] for key in saved if key in comparable or key not in ours}, path)
    indices = {key: torch.empty(saved[key], dtype=torch.int32) for key in pattern_keys if key.endswith("_indices")}
    dcp.load(indices, checkpoint_id=str(path))
    for name, layer in model.named_modules():
        if not isinstance(layer, BlockSparseLinear):
            continue
        tiles = saved[f"{name}.values"]
        if tiles[1:] != tuple(layer.values.shape[1:]):
            ours = tuple(layer.values.shape[1:])
            raise CheckpointMismatchError(f"{path}: {name} has tiles {tiles[1:]}, the model {ours}")
        values = torch.zeros(tiles, dtype=layer.values.dtype)
        shape = (layer.out_features, layer.in_features)
        crow, col = (indices[f"{name}.{part}"] for part in STORED_INDEX_NAMES)
        try:
            saved_pattern = BlockSparseMatrix(values, crow, col, shape)
        except ValueError as error:
            raise CheckpointMismatchError(f"{path}: the pattern of {name} is not valid ({error})") from error
        layer.set_pattern(saved_pattern.block_mask().to(layer.values.device))


def load_sharded(model: nn.Module, path: str | Path) -> None:
    """Read a :func:`save_sharded` checkpoint into ``model`` (sharded at any world size, or not): every rank calls
    it. Raises :class:`CheckpointMismatchError` when the checkpoint holds other tensors or shapes (a pattern of
    another tile count: call :func:`load_patterns` before sharding)."""
    state = get_model_state_dict(model)
    _check_against({key: tuple(tensor.shape) for key, tensor in state.items()}, _checkpoint_shapes(path), path)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state)


@contextlib.contextmanager
def whole_parameters(model: nn.Module) -> Iterator[None]:
    """Within the block, every sharded parameter of ``model`` is replaced by its whole tensor (gathered; tied
    parameters stay tied; each its own storage, as safetensors wants); restored after. A collective: every rank
    enters it. Reads only: writes are lost."""
    swapped, whole = [], {}
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None and is_sharded(parameter):
                if id(parameter) not in whole:
                    whole[id(parameter)] = nn.Parameter(
                        full_tensor(parameter.detach()).clone(), parameter.requires_grad
                    )
                swapped.append((module, name, parameter))
                module._parameters[name] = whole[id(parameter)]
    try:
        yield
    finally:
        for module, name, parameter in swapped:
            module._parameters[name] = parameter


def export_sparse(model: nn.Module, folder: str | Path, extra_files: Mapping[str, bytes | str] | None = None) -> None:
    """Write a sharded ``model`` to ``folder`` in the single-folder format (``save_sparse``: loads in one process
    with ``load_sparse``). Every rank calls it; rank 0 writes. Every rank holds the whole model while it runs."""
    with whole_parameters(model):
        if dist.get_rank() == 0:
            save_sparse(model, folder, extra_files)
    dist.barrier()
