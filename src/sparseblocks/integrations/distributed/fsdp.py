"""FSDP2 over block-sparse models: tile values sharded, patterns replicated and checked.

``BlockSparseLinear.values`` ``(nnz, bn, bk)`` is a parameter like any other: ``fully_shard`` splits it along its
first dimension, the tiles (``Shard(0)``; the last rank's part is shorter when nnz does not divide). The pattern
(``crow_indices``, ``col_indices`` and the index derived from them: transposed index, row and column orders) and
``SemiStructuredLinear.groups`` are buffers: FSDP2 leaves them whole on every rank, and every kernel reads them
there, so they must be the same on every rank. :func:`shard_sparse_model` checks that (a digest of every buffer,
all-gathered) before it shards: a model built from another seed on one rank is refused, naming the buffer and
the rank, instead of training silently on different patterns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from sparseblocks.format import INDEX_NAMES, BlockSparseMatrix, gather_tiles
from sparseblocks.integrations.distributed.tensors import full_tensor, is_sharded, write_full


class PatternMismatchError(ValueError):
    """A buffer (a tile pattern, a 2:4 mask, any other buffer) differs between ranks."""


def buffer_digests(model: nn.Module) -> dict[str, str]:
    """SHA-256 of every buffer of ``model`` (bytes, dtype and shape), by name: what must be equal on every rank."""
    digests = {}
    for name, buffer in model.named_buffers():
        digest = hashlib.sha256(f"{buffer.dtype} {tuple(buffer.shape)}".encode())
        digest.update(buffer.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digests[name] = digest.hexdigest()
    return digests


def check_patterns(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Raise :class:`PatternMismatchError` (on every rank, so none waits) unless every buffer of ``model`` is the
    same on every rank of ``group``: one all-gather of digests."""
    mine = buffer_digests(model)
    everyone: list[dict[str, str] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    reference = everyone[0]
    for rank, digests in enumerate(everyone):
        if digests.keys() != reference.keys():
            extra = sorted(digests.keys() ^ reference.keys())
            raise PatternMismatchError(f"rank {rank} and rank 0 hold different buffers: {extra[:5]}")
        differing = [name for name in reference if digests[name] != reference[name]]
        if differing:
            layer, _, buffer = differing[0].rpartition(".")
            raise PatternMismatchError(
                f"layer {layer or '(model)'}: buffer {buffer} differs on rank {rank} from rank 0 "
                f"({len(differing)} buffers differ); build the model from the same seed or pattern on every rank"
            )


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules held in an ``nn.ModuleList`` (a transformer's layers), the default units of sharding."""
    return [child for module in model.modules() if isinstance(module, nn.ModuleList) for child in module]


def shard_sparse_model(
    model: nn.Module,
    mesh=None,
    units: Callable[[nn.Module], Sequence[nn.Module]] = transformer_blocks,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
    checkpoint_activations: bool = False,
    compile_units: bool = False,
) -> nn.Module:
    """``fully_shard`` every unit of ``model`` (default: its transformer blocks), then the model itself, after
    checking that its patterns are the same on every rank (:func:`check_patterns`). Returns ``model``, sharded in
    place.

    mesh: a one-dimensional ``DeviceMesh`` (default: every rank, on the current CUDA device or the CPU).
    mp_policy: FSDP2's mixed precision, e.g. ``MixedPrecisionPolicy(torch.bfloat16, torch.float32)``: bf16
    parameters in forward and backward, fp32 gradient reduction and fp32 shards. checkpoint_activations: each unit
    recomputes its activations in the backward. compile_units: ``torch.compile`` each unit (graph breaks at FSDP2's
    hooks stay outside the compiled units).
    """
    from torch.distributed.device_mesh import init_device_mesh

    if any(is_sharded(parameter) for parameter in model.parameters()):
        raise ValueError("the model is sharded already (its parameters are DTensors)")
    if mesh is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device, (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise ValueError(f"shard_sparse_model takes a one-dimensional mesh (data parallel), got {mesh.ndim} dims")
    check_patterns(model, mesh.get_group())
    options = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    for unit in units(model):
        if checkpoint_activations:
            from torch.distributed._composable import checkpoint

            checkpoint(unit)
        if compile_units:
            unit.compile()
        fully_shard(unit, **options)
    fully_shard(model, **options)
    return model


@torch.no_grad()
def set_sharded_pattern(layer: nn.Module, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    """``BlockSparseLinear.set_pattern`` for a layer whose ``values`` FSDP2 shards: tiles kept by both patterns keep
    their values and optimizer state, new ones start at zero. The tile count must stay the same (FSDP2 sized the
    shards once), as prune-and-grow's swaps keep it; ``mask`` must be the same on every rank (a collective)."""
    values = layer.values
    shape = (layer.out_features, layer.in_features)
    indices = {name: layer._buffers[name] for name in INDEX_NAMES}
    matrix = BlockSparseMatrix.from_parts(full_tensor(values.detach()), shape, indices)
    pattern, source = matrix.with_pattern(mask)
    if pattern.values.shape != values.shape:
        raise ValueError(
            f"under FSDP2 a pattern change must keep the tile count ({values.shape[0]}), the new pattern has "
            f"{pattern.values.shape[0]} tiles: swap tiles (prune-and-grow), or convert and shard the model anew"
        )
    write_full(values, pattern.values)
    values.grad = None
    for name, index in pattern.index_tensors().items():
        setattr(layer, name, index)
    if optimizer is None or values not in optimizer.state:
        return
    state = optimizer.state[values]
    tensors = [value for value in state.values() if isinstance(value, torch.Tensor) and value.dim()]
    if not all(value.shape[0] == values.shape[0] for value in tensors):
        state.clear()  # as set_pattern does: state that cannot follow the tiles starts afresh
        return
    for value in tensors:
        write_full(value, gather_tiles(full_tensor(value), source))
