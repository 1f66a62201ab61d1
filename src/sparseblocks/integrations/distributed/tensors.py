"""Sharded tensors as the rest of the library sees them: whole on every rank when read, written shard by shard.

FSDP2 (``fully_shard``) turns a module's parameters into ``DTensor`` shards; code written for plain tensors (scores,
masks, pattern changes) reads :func:`full_tensor` (an all-gather: every rank gets the same bits, so every rank
computes the same masks) and writes through :func:`placed_like` (the rank's own part of a tensor every rank holds
whole: no communication) or :func:`write_full` (the same, copied into a shard in place, where FSDP2 reads it at its
next all-gather). Plain tensors pass through all three unchanged, so one code path serves one process and many.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate


def is_sharded(tensor: torch.Tensor | None) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter, gradient or optimizer state of a sharded module)."""
    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective: every rank of the tensor's mesh must call it); a plain tensor
    is returned as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def placed_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` (the same on every rank, ``like``'s global shape) placed as ``like`` is: a ``DTensor`` holding this
    rank's part when ``like`` is one (no communication), ``whole`` otherwise."""
    if not isinstance(like, DTensor):
        return whole
    if tuple(whole.shape) != tuple(like.shape):
        raise ValueError(f"cannot place a tensor of shape {tuple(whole.shape)} like one of {tuple(like.shape)}")
    mesh = like.device_mesh
    replicated = DTensor.from_local(whole.to(like.device), mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, like.placements)


@torch.no_grad()
def write_full(target: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy ``whole`` into ``target`` in place, only this rank's part when ``target`` is a ``DTensor`` (its local
    storage is what FSDP2 all-gathers, so the next forward sees the write)."""
    if isinstance(target, DTensor):
        target.to_local().copy_(placed_like(whole, target).to_local())
    else:
        target.copy_(whole)


def process_group_of(tensor: torch.Tensor):
    """The process group a ``DTensor`` is sharded over (one-dimensional meshes), or None for a plain tensor."""
    if not isinstance(tensor, DTensor):
        return None
    return tensor.device_mesh.get_group()
