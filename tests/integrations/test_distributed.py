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


def _compiled_worker(rank: int, world: int) -> tuple[bool, list[float]]:
    from sparseblocks.integrations.distributed import shard_sparse_model

    model = shard_sparse_model(_sparse_gpt(), compile_units=True)
    compiled = all(getattr(block, "_compiled_call_impl", None) is not None for block in model.blocks)
    return compiled, _train(model, _tokens(world)[rank * 4 : (rank + 1) * 4])


def test_fsdp2_with_each_block_compiled_trains_like_one_process():
    """``compile_units``: every block under ``torch.compile`` (Inductor on the CPU), FSDP2's hooks outside the
    compiled blocks: the losses of three steps as one process's eager run (fp32: 1e-6 relative)."""
    world = 2
    expected = _train(_sparse_gpt(), _tokens(world))
    for compiled, losses in run_ranks(_compiled_worker, world, timeout=400.0):
        assert compiled
        assert max(abs(a - b) / abs(b) for a, b in zip(losses, expected, strict=True)) < 1e-6


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


# ---------------------------------------------------------------------------------------------- pruning


PRUNING_METHODS = ("magnitude", "activation_magnitude", "fisher", "prune_grow", "supermask")


def _prune(method: str, sharded: bool) -> dict:
    """A dense tiny GPT pruned by ``method`` to 75% of its MLP tiles (16x16) over four SGD steps, then converted:
    masks after each step, and the converted model's logits on fixed tokens."""
    from sparseblocks.integrations.distributed import shard_sparse_model
    from sparseblocks.pruning.pruner import CubicSchedule, Pruner

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, context=CONTEXT, layers=2, heads=2, width=WIDTH))
    schedule = CubicSchedule(1, 3, 1, initial=0.75 if method == "prune_grow" else 0.0)
    pruner = Pruner(model, SparsityConfig(0.75, 16, targets="mlp"), method, schedule)
    world, rank = (dist.get_world_size(), dist.get_rank()) if sharded else (1, 0)
    if sharded:
        shard_sparse_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    pruner.optimizer = optimizer
    tokens = _tokens(2, per_rank=4)
    part = tokens.chunk(world)[rank]
    masks = []
    for step in range(4):
        if "inputs" in pruner.strategy.needs and schedule.updates_at(step):
            with pruner.observe_inputs(), torch.no_grad():
                model(part[:, :-1])
        model(part[:, :-1], part[:, 1:])[1].backward()
        if "gradients" in pruner.strategy.needs:
            pruner.observe_gradients()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
        masks.append({name: mask.clone() for name, mask in pruner.masks.items()})
    pruner.finalize()
    with torch.no_grad():
        logits = model(tokens[:, :-1])[0]
    return {"masks": masks, "logits": logits}


def _swap_tiles(rank: int, world: int) -> dict:
    """A sharded sparse GPT after one AdamW step, then one MLP layer's pattern with a tile swapped
    (``set_sharded_pattern``; ``set_pattern`` points to it): its tiles, moments and pattern, whole, before and after."""
    from sparseblocks.integrations.distributed import full_tensor, set_sharded_pattern, shard_sparse_model

    model = shard_sparse_model(_sparse_gpt())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = _tokens(world).chunk(world)[rank]
    model(tokens[:, :-1], tokens[:, 1:])[1].backward()
    optimizer.step()
    layer = model.blocks[0].mlp.fc

    def whole() -> dict:
        state = optimizer.state[layer.values]
        return {"values": full_tensor(layer.values.detach()), "exp_avg": full_tensor(state["exp_avg"]),
                "exp_avg_sq": full_tensor(state["exp_avg_sq"]), "crow_indices": layer.crow_indices.clone(),
                "col_indices": layer.col_indices.clone()}  # fmt: skip

    before = whole()
    mask = _block_mask(layer).flatten().clone()
    kept, pruned = mask.nonzero()[0], (~mask).nonzero()[-1]
    mask[kept], mask[pruned] = False, True
    with pytest.raises(TypeError, match="set_sharded_pattern"):
        layer.set_pattern(mask.view_as(_block_mask(layer)), optimizer)
    set_sharded_pattern(layer, mask.view_as(_block_mask(layer)), optimizer)
    return {"before": before, "after": whole(), "mask": mask.view_as(_block_mask(layer))}


def _block_mask(layer) -> torch.Tensor:
    from sparseblocks.format import BlockSparseMatrix

    zeros = torch.zeros(layer.col_indices.numel(), *layer.values.shape[1:])
    return BlockSparseMatrix(
        zeros, layer.crow_indices, layer.col_indices, (layer.out_features, layer.in_features)
    ).block_mask()


def _pruning_worker(rank: int, world: int) -> dict:
    return {method: _prune(method, sharded=True) for method in PRUNING_METHODS}


def test_every_pruning_method_under_fsdp2_gives_every_rank_the_masks_of_one_process():
    """Scores from the gathered weights, gradients (reduced over ranks, then gathered) and input statistics (summed
    over ranks): every rank gets the masks one process gets on the whole batch, and the converted model computes
    what that process's does."""
    ranks = run_ranks(_pruning_worker, 2)
    for method in PRUNING_METHODS:
        expected = _prune(method, sharded=False)
        changed = any(not m.all() for m in expected["masks"][-1].values())
        assert changed, method  # the test prunes something
        for result in ranks:
            for step, (got, want) in enumerate(zip(result[method]["masks"], expected["masks"], strict=True)):
                for name in want:
                    assert torch.equal(got[name], want[name]), (method, step, name)
            assert relative_error(result[method]["logits"], expected["logits"]) < 1e-5, method


def test_set_sharded_pattern_keeps_surviving_tiles_and_their_optimizer_state():
    """A swap (the tile count kept) on values and Adam moments sharded over 2 ranks: every rank holds what
    ``with_pattern`` makes of the whole tensors (kept tiles moved, the new tile and its moments zero)."""
    from sparseblocks.format import BlockSparseMatrix, gather_tiles

    ranks = run_ranks(_swap_tiles, 2)
    for result in ranks:
        before, after = result["before"], result["after"]
        shape = (4 * WIDTH, WIDTH)
        matrix = BlockSparseMatrix(before["values"], before["crow_indices"], before["col_indices"], shape)
        expected, source = matrix.with_pattern(result["mask"])
        assert (source == -1).sum() == 1 and not torch.equal(after["col_indices"], before["col_indices"])
        assert torch.equal(after["col_indices"], expected.col_indices)
        for key in ("values", "exp_avg", "exp_avg_sq"):
            assert torch.equal(after[key], gather_tiles(before[key], source)), key
        assert torch.equal(after["values"], ranks[0]["after"]["values"])


# ---------------------------------------------------------------------------------------------- checkpoints


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_tokens(1)[:, :-1])[0]


def _save_worker(rank: int, world: int, path: str) -> torch.Tensor:
    from sparseblocks.integrations.distributed import save_sharded, shard_sparse_model

    model = shard_sparse_model(_sparse_gpt(seed=0))
    _train(model, _tokens(world, per_rank=1)[rank : rank + 1], steps=1)  # values no longer those of the seed
    save_sharded(model, path)
    return _logits(model)


def _load_worker(rank: int, world: int, path: str, folder: str) -> dict:
    from sparseblocks.integrations.distributed import (
        CheckpointMismatchError,
        export_sparse,
        load_patterns,
        load_sharded,
        shard_sparse_model,
    )

    wider = GPT(GPTConfig(vocab_size=VOCAB, context=CONTEXT, layers=2, heads=2, width=2 * WIDTH))
    with pytest.raises(CheckpointMismatchError, match="not a checkpoint of this model") as mismatch:
        load_patterns(wider, path)
    model = _sparse_gpt(seed=1)  # other patterns and values: the checkpoint's replace them
    load_patterns(model, path)
    shard_sparse_model(model)
    load_sharded(model, path)
    export_sparse(model, folder)
    return {"logits": _logits(model), "mismatch": str(mismatch.value)}


def test_a_checkpoint_saved_at_4_ranks_loads_at_2_and_exports_to_one_folder(tmp_path):
    """DCP at 4 ranks, read at 2 into a model of other patterns (load_patterns, shard, load_sharded): the same
    logits, bitwise; exported with save_sparse's format, it loads in one process with load_sparse; a checkpoint of
    another model is refused, naming what differs."""
    from sparseblocks import load_sparse

    path, folder = str(tmp_path / "dcp"), str(tmp_path / "exported")
    saved = run_ranks(_save_worker, 4, path)
    loaded = run_ranks(_load_worker, 2, path, folder)
    for result in loaded:
        assert torch.equal(result["logits"], saved[0]), relative_error(result["logits"], saved[0])
        assert "other shapes" in result["mismatch"] and "blocks.0.mlp.proj.bias: checkpoint (64,)" in result["mismatch"]
    single = load_sparse(folder, _sparse_gpt(seed=2)).eval()
    assert torch.equal(_logits(single), saved[0])


# ---------------------------------------------------------------------------------------------- recipe


def test_torchrun_trains_the_gpt_recipe_with_fsdp2_like_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m sparseblocks.cli train gpt ... --fsdp``: Fisher pruning to 90% in 32x32
    tiles over 20 steps; the mean training loss, the last one and the converted model's validation loss are one
    process's, and the saved model loads in one process."""
    import json
    import os
    import random
    import signal
    import subprocess
    import sys

    from distributed_ranks import free_port

    from sparseblocks.recipes.experiments import Experiment
    from sparseblocks.recipes.training import load_recipe_model, train_gpt

    text = tmp_path / "text.txt"
    generator = random.Random(0)
    text.write_text("".join(generator.choice("abcdefgh \n") for _ in range(20000)))
    settings = {"steps": 20, "layers": 2, "heads": 2, "width": 64, "context": 32, "batch_size": 8, "dropout": 0.0}
    expected = train_gpt(text, tmp_path / "one", "fisher", 0.9, 32, Experiment(**settings), progress=False)
    options = [f"--{name.replace('_', '-')}={value}" for name, value in settings.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "sparseblocks.cli", "train", "gpt", "--data", str(text), "--method", "fisher",
               "--sparsity", "0.9", "--block", "32", "--out", str(tmp_path / "fsdp"), "--fsdp", *options]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=150)
    finally:
        if process.poll() is None:  # timed out: end torchrun and its workers (their own process group)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, output[-3000:]
    row = json.loads((tmp_path / "fsdp" / "recipe.json").read_text())["result"]
    for key in ("train_loss_last", "val_loss"):
        assert abs(row[key] - expected[key]) / expected[key] < 1e-5, (key, row[key], expected[key])
    assert abs(row["train_curve"][0] - expected["train_curve"][0]) < 1e-4  # rounded to 4 decimals
    model = load_recipe_model(tmp_path / "fsdp")
    assert model.blocks[0].mlp.fc.values.shape[0] == 2  # 10% of the 8x2 tiles, rounded
