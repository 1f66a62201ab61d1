"""FSDP2 over sparse models on gloo ranks (CPU): the same training as one process, patterns checked, pruning with
identical masks on every rank, distributed checkpoints across world sizes. Each test starts its own processes and
ends them (``distributed_ranks.run_ranks``)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_ranks import run_ranks

from conftest import relative_error
from sparseblocks import SparsityConfig, sparsify
from sparseblocks.recipes.gpt import GPT, GPTConfig

WIDTH, VOCAB, CONTEXT = 64, 17, 8


def _sparse_gpt(seed: int = 0) -> GPT:
    """A tiny GPT with every kind of sparse layer: 2:4 attention (``SemiStructuredLinear``), MLPs fused into
    ``SparseMLP`` of ``BlockSparseLinear`` (50%, 16x16 tiles)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=VOCAB, context=CONTEXT, layers=2, heads=2, width=WIDTH))
    sparsify(model, SparsityConfig(0.5, pattern="2:4", targets="attention"))
    sparsify(model, SparsityConfig(0.5, 16, targets="mlp", fuse_mlp=True))
    return model


def _tokens(world: int, per_rank: int = 4) -> torch.Tensor:
    return torch.randint(VOCAB, (world * per_rank, CONTEXT + 1), generator=torch.Generator().manual_seed(1))


def _train(model, tokens, steps: int = 3, gradients: dict | None = None) -> list[float]:
    """SGD steps on ``tokens`` (this rank's part; not Adam, which turns the rounding noise of a zero gradient, as
    the key bias has, into steps of full size); the loss of each step averaged over the ranks. ``gradients``
    receives the whole gradients of the first step."""
    from sparseblocks.integrations.distributed.tensors import full_tensor

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for step in range(steps):
        loss = model(tokens[:, :-1], tokens[:, 1:])[1]
        loss.backward()
        if step == 0 and gradients is not None:
            gradients.update({name: full_tensor(p.grad).clone() for name, p in model.named_parameters()})
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        losses.append(mean.item())
    return losses


def _whole_state(model) -> dict[str, torch.Tensor]:
    from sparseblocks.integrations.distributed.tensors import full_tensor

    return {name: full_tensor(p.detach()).clone() for name, p in model.named_parameters()}


def _fsdp_worker(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor import DTensor, Shard

    from sparseblocks.integrations.distributed import shard_sparse_model

    tokens = _tokens(world)[rank * 4 : (rank + 1) * 4]
    model = shard_sparse_model(_sparse_gpt())
    values = model.blocks[0].mlp.fc.values
    placed = isinstance(values, DTensor) and values.placements == (Shard(0),)
    buffers_plain = not any(isinstance(b, DTensor) for b in model.buffers())
    gradients = {}
    losses = _train(model, tokens, gradients=gradients)
    result = {"losses": losses, "gradients": gradients, "state": _whole_state(model), "placed": placed,
              "buffers_plain": buffers_plain}  # fmt: skip
    checkpointed = shard_sparse_model(_sparse_gpt(), checkpoint_activations=True)
    result["checkpointed_losses"] = _train(checkpointed, tokens)
    mixed = shard_sparse_model(_sparse_gpt(), mp_policy=MixedPrecisionPolicy(torch.bfloat16, torch.float32))
    result["mixed_losses"] = _train(mixed, tokens)
    result["mixed_values_dtype"] = mixed.blocks[0].mlp.fc.values.dtype
    return result


def test_fsdp2_trains_a_sparse_model_like_one_process():
    """Values sharded along the tiles, patterns replicated; the gradients and the losses of three steps as one
    process on the whole batch (fp32: 1e-6 relative), and the parameters after them; activation checkpointing
    gives the same losses; bf16 parameters with fp32 reduction train close to them."""
    world = 2
    ranks = run_ranks(_fsdp_worker, world)
    model, gradients = _sparse_gpt(), {}
    expected = _train(model, _tokens(world), gradients=gradients)
    for result in ranks:
        assert result["placed"] and result["buffers_plain"]
        assert max(abs(a - b) / abs(b) for a, b in zip(result["losses"], expected, strict=True)) < 1e-6
        assert result["checkpointed_losses"] == result["losses"]
        assert max(abs(a - b) / abs(b) for a, b in zip(result["mixed_losses"], expected, strict=True)) < 2e-2
        assert result["mixed_values_dtype"] == torch.float32  # the shards stay fp32
        for name, parameter in model.named_parameters():
            assert relative_error(result["gradients"][name], gradients[name]) < 1e-6, name
            assert relative_error(result["state"][name], parameter.detach()) < 1e-6, name
    for name in ranks[0]["state"]:
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name


def _mismatch_worker(rank: int, world: int) -> str:
    from sparseblocks.integrations.distributed import PatternMismatchError, shard_sparse_model

    model = _sparse_gpt()
    if rank == world - 1:  # another pattern on the last rank
        layer = model.blocks[1].mlp.proj
        layer.set_pattern(~layer.matrix.block_mask() | torch.eye(*layer.matrix.block_grid, dtype=torch.bool))
    with pytest.raises(PatternMismatchError) as error:
        shard_sparse_model(model)
    return str(error.value)


def test_a_pattern_that_differs_between_ranks_is_refused_naming_layer_and_rank():
    messages = run_ranks(_mismatch_worker, 2)
    for message in messages:  # every rank raises (none waits on the others)
        assert "layer blocks.1.mlp.proj" in message and "rank 1" in message, message
