"""Tensor parallelism for sparse models: Megatron's column-then-row split over tile-balanced units.

A *parallel group* is a module (an MLP, an attention) whose input every rank holds whole and whose output is a sum
over ranks: its first linears split along their outputs (**column-parallel**: a rank keeps some block rows), its
last ones along their inputs (**row-parallel**: the matching block columns; partial outputs summed by one
all-reduce). Forward: one all-reduce, after the group; backward: one, of the input's gradient. The split is made of
*units* that must stay together: a hidden block of an MLP (its row in gate and up, its column in down), a key/value
head with its query heads in attention. Units go to ranks by stored weights (tiles × tile size; a dense linear
counts every weight), heaviest first to the least loaded rank, so each rank multiplies about as many tiles, not just
as many rows (90%-sparse rows differ several-fold in tiles). Units need not be contiguous: a rank's hidden units
are any subset, the same for every linear of the group, so the group computes the same function.

:func:`parallelize_sparse` applies a plan (module-name globs -> :class:`ParallelGroup`) in place, replacing each
group's linears by the rank's parts and hooking the two collectives around the group's forward; module names and
classes stay (HF Llama's attention and the recipes' GPT count heads with ``-1``). Plans: :func:`llama_plan`,
:func:`gpt_plan`. Inference and training both work; the rank's parts are plain tensors (no DTensor).

Known limits (2026-12): one dimension of parallelism (no TP x FSDP mesh yet); no DCP of TP models (export the
model before splitting it); bias of a row-parallel linear kept on rank 0 only.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from sparseblocks.format import BlockSparseMatrix
from sparseblocks.integrations.distributed.fsdp import check_patterns
from sparseblocks.integrations.sparsify import replace_module
from sparseblocks.nn.linear import BlockSparseLinear


class PlanError(ValueError):
    """A plan this model or world size cannot take: too few units for the ranks, units across tile borders, a
    name that matches nothing."""


@dataclass(frozen=True)
class ParallelGroup:
    """column: the group's first linears, split along their outputs (``"qkv"``, or ``("qkv", 3)`` for a linear
    that stacks 3 parts, each split alike); row: its last linears, split along their inputs; units: how many units
    the split dimension holds (a function of the module; default: the hidden features over the largest tile side
    of the sparse linears, each unit a block); input_name: the keyword the input comes by when not positional."""

    column: tuple[str | tuple[str, int], ...]
    row: tuple[str, ...]
    units: Callable[[nn.Module], int] | None = None
    input_name: str = "hidden_states"
    unit_name: str = field(default="hidden block", compare=False)


def _reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    out = tensor.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


class _CopyToRanks(torch.autograd.Function):
    """The group's input: the same on every rank going forward; the ranks' input gradients summed going back."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _reduce(grad, ctx.group), None


class _SumOverRanks(torch.autograd.Function):
    """The group's output: the ranks' partial sums added going forward; the gradient passed on as it is."""

    @staticmethod
    def forward(ctx, x, group):
        return _reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def split_units(costs: list[float], world: int) -> list[list[int]]:
    """Units (by cost) dealt to ``world`` ranks: heaviest first, each to the least loaded rank (ties: the lower
    rank); each rank's units in increasing order. Raises :class:`PlanError` when a rank would get none."""
    if len(costs) < world:
        raise PlanError(f"cannot split {len(costs)} units over {world} ranks: each rank needs one at least")
    loads, held = [0.0] * world, [[] for _ in range(world)]
    for unit in sorted(range(len(costs)), key=lambda u: (-costs[u], u)):
        rank = min(range(world), key=lambda r: (loads[r], len(held[r]), r))
        loads[rank] += costs[unit]
        held[rank].append(unit)
    return [sorted(units) for units in held]


def _stored(linear: nn.Module) -> tuple[torch.Tensor, tuple[int, int]]:
    """Stored weights per cell of the linear's grid, and the cell: tiles (BlockSparseLinear) or single weights."""
    if isinstance(linear, BlockSparseLinear):
        matrix = linear.matrix
        return matrix.block_mask().double() * math.prod(matrix.block_shape), matrix.block_shape
    if isinstance(linear, nn.Linear):
        return torch.ones(linear.out_features, linear.in_features, dtype=torch.float64), (1, 1)
    raise PlanError(f"tensor parallelism splits nn.Linear and BlockSparseLinear, not {type(linear).__name__}")


def _indices(units: list[int], count: int, size: int, parts: int) -> torch.Tensor:
    """Feature indices of ``units`` along a dimension of ``size`` made of ``parts`` stacked parts of ``count``
    units each."""
    part, unit = size // parts, size // parts // count
    return torch.cat(
        [torch.arange(p * part + u * unit, p * part + (u + 1) * unit) for p in range(parts) for u in units]
    )


def _cells(indices: torch.Tensor, side: int, what: str) -> torch.Tensor:
    """The block (cell) indices ``indices`` cover, which must be whole blocks."""
    if side == 1:
        return indices
    cells = indices[::side] // side
    if indices.numel() % side or not torch.equal(indices, (cells[:, None] * side + torch.arange(side)).flatten()):
        raise PlanError(f"{what}: the split cuts through {side}-wide tiles; use fewer ranks or smaller tiles")
    return cells


def _sub_linear(linear: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None, bias: bool) -> nn.Module:
    """The part of ``linear`` at feature ``rows`` (outputs) and ``cols`` (inputs), None: all; ``bias``: keep it."""
    keep_bias = linear.bias is not None and bias
    if isinstance(linear, nn.Linear):
        weight = linear.weight.detach()
        weight = weight if rows is None else weight[rows]
        weight = weight if cols is None else weight[:, cols]
        part = nn.Linear(weight.shape[1], weight.shape[0], bias=keep_bias, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            part.weight.copy_(weight)
            if keep_bias:
                part.bias.copy_(linear.bias.detach() if rows is None else linear.bias.detach()[rows])
        return part
    matrix = linear.matrix
    (bn, bk), (grid_rows, grid_cols) = matrix.block_shape, matrix.block_grid
    block_rows = torch.arange(grid_rows) if rows is None else _cells(rows, bn, "a column-parallel split")
    block_cols = torch.arange(grid_cols) if cols is None else _cells(cols, bk, "a row-parallel split")
    tile_of = torch.full(matrix.block_grid, -1, dtype=torch.long)
    tile_of[matrix.row_indices_of_block.long().cpu(), matrix.col_indices.long().cpu()] = torch.arange(matrix.nnz)
    tiles = tile_of[block_rows][:, block_cols]  # (rows, cols) of the part, -1: no tile
    kept = tiles >= 0
    crow = torch.zeros(len(block_rows) + 1, dtype=torch.int32)
    crow[1:] = kept.sum(1).cumsum(0)
    col = kept.nonzero()[:, 1].to(torch.int32)
    source = tiles[kept].to(linear.values.device)
    shape = (
        linear.out_features if rows is None else rows.numel(),
        linear.in_features if cols is None else cols.numel(),
    )
    device = linear.values.device
    part = BlockSparseMatrix(linear.values.detach()[source].contiguous(), crow.to(device), col.to(device), shape)
    bias_part = None if not keep_bias else linear.bias.detach() if rows is None else linear.bias.detach()[rows]
    layer = BlockSparseLinear.from_matrix(part, bias_part)
    layer.values.requires_grad_(linear.values.requires_grad)
    layer.tile_source = source  # which of the whole layer's tiles each of this part's is
    return layer


def _default_units(module: nn.Module, spec: ParallelGroup) -> int:
    size = _column_parts(module, spec)[0][0].out_features // _column_parts(module, spec)[0][1]
    sides = [1]
    for linear, _ in _column_parts(module, spec):
        sides.append(linear.matrix.block_shape[0] if isinstance(linear, BlockSparseLinear) else 1)
    for name in spec.row:
        linear = module.get_submodule(name)
        sides.append(linear.matrix.block_shape[1] if isinstance(linear, BlockSparseLinear) else 1)
    side = math.lcm(*sides)
    if size % side:
        raise PlanError(f"{size} hidden features are not a whole number of {side}-wide tiles")
    return size // side


def _column_parts(module: nn.Module, spec: ParallelGroup) -> list[tuple[nn.Module, int]]:
    entries = [(entry, 1) if isinstance(entry, str) else entry for entry in spec.column]
    return [(module.get_submodule(name), parts) for name, parts in entries]


def _split_group(module: nn.Module, spec: ParallelGroup, name: str, rank: int, world: int) -> dict:
    """Replace the group's linears by this rank's parts; return what the rank holds."""
    count = (spec.units or (lambda m: _default_units(m, spec)))(module)
    costs = torch.zeros(count, dtype=torch.float64)
    column = [(entry if isinstance(entry, str) else entry[0], 1 if isinstance(entry, str) else entry[1])
              for entry in spec.column]  # fmt: skip
    for linear_name, parts in column:
        linear = module.get_submodule(linear_name)
        stored, (side, _) = _stored(linear)
        if linear.out_features % (parts * count):
            raise PlanError(f"{name}.{linear_name}: {linear.out_features} outputs do not split into {count} units")
        per_row = (stored.sum(1) / side).repeat_interleave(side)[: linear.out_features]  # a row's share
        costs += per_row.view(parts, count, -1).sum((0, 2))
    for linear_name in spec.row:
        linear = module.get_submodule(linear_name)
        stored, (_, side) = _stored(linear)
        if linear.in_features % count:
            raise PlanError(f"{name}.{linear_name}: {linear.in_features} inputs do not split into {count} units")
        costs += (stored.sum(0) / side).repeat_interleave(side)[: linear.in_features].view(count, -1).sum(1)
    try:
        held = split_units(costs.tolist(), world)
    except PlanError as error:
        raise PlanError(f"{name}: {error} ({spec.unit_name}s)") from None
    mine = held[rank]
    for linear_name, parts in column:
        linear = module.get_submodule(linear_name)
        rows = _indices(mine, count, linear.out_features, parts)
        try:
            replace_module(module, linear_name, _sub_linear(linear, rows, None, bias=True))
        except PlanError as error:
            raise PlanError(f"{name}.{linear_name}: {error}") from None
    for linear_name in spec.row:
        linear = module.get_submodule(linear_name)
        cols = _indices(mine, count, linear.in_features, 1)
        try:
            replace_module(module, linear_name, _sub_linear(linear, None, cols, bias=rank == 0))
        except PlanError as error:
            raise PlanError(f"{name}.{linear_name}: {error}") from None
    return {"units": mine, "stored_per_rank": [float(costs[units].sum()) for units in held]}


def _hook(module: nn.Module, spec: ParallelGroup, group) -> None:
    def enter(module, args, kwargs):
        if args:
            return (_CopyToRanks.apply(args[0], group), *args[1:]), kwargs
        return args, {**kwargs, spec.input_name: _CopyToRanks.apply(kwargs[spec.input_name], group)}

    def leave(module, args, kwargs, output):
        if isinstance(output, tuple):  # (output, attention weights), as HF attention returns
            return (_SumOverRanks.apply(output[0], group), *output[1:])
        return _SumOverRanks.apply(output, group)

    module.register_forward_pre_hook(enter, with_kwargs=True)
    module.register_forward_hook(leave, with_kwargs=True)


def parallelize_sparse(
    model: nn.Module, plan: Mapping[str, ParallelGroup], group: dist.ProcessGroup | None = None
) -> dict[str, dict]:
    """Split ``model`` in place for tensor parallelism over ``group`` (default: every rank) as ``plan`` says
    (module-name glob -> :class:`ParallelGroup`). Every rank calls it with the same model (checked: its buffers,
    the patterns among them, must match). Returns, per group, the units this rank holds and the stored weights of
    every rank. Raises :class:`PlanError` for a plan the model or the world size cannot take."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    check_patterns(model, group)
    matched = [(name, module, spec) for name, module in model.named_modules()
               for pattern, spec in plan.items() if fnmatch.fnmatchcase(name, pattern)]  # fmt: skip
    if not matched:
        raise PlanError(f"the plan's names {sorted(plan)} match no module of the model")
    report = {}
    for name, module, spec in matched:
        report[name] = _split_group(module, spec, name, rank, world)
        _hook(module, spec, group)
    return report


def llama_plan() -> dict[str, ParallelGroup]:
    """Hugging Face Llama (Mistral, Qwen2 alike): attention by key/value head (with its query heads), MLP by
    hidden block (``SparseMLP`` keeps these names too)."""
    return {
        "*layers.*.self_attn": ParallelGroup(("q_proj", "k_proj", "v_proj"), ("o_proj",),
                                             units=lambda m: m.k_proj.out_features // m.head_dim,
                                             unit_name="key/value head"),
        "*layers.*.mlp": ParallelGroup(("gate_proj", "up_proj"), ("down_proj",)),
    }  # fmt: skip


def gpt_plan() -> dict[str, ParallelGroup]:
    """The recipes' GPT: attention by head (``qkv`` stacks q, k and v), MLP by hidden block."""
    return {
        "blocks.*.attn": ParallelGroup((("qkv", 3),), ("proj",), units=lambda m: m.heads, input_name="x",
                                       unit_name="head"),
        "blocks.*.mlp": ParallelGroup(("fc",), ("proj",), input_name="x"),
    }  # fmt: skip
