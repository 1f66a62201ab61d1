"""Reordering an MLP's hidden units before its tiles are chosen (the idea of Shfl-BW, Huang et al. 2022).

An MLP ``down(act(up(x)) [* gate(x)])`` computes the same function under any order of its hidden units, as long as
the rows of ``up`` (and ``gate``, and their biases) and the columns of ``down`` move together. A block mask keeps or
drops tiles of ``(bn, bk)`` weights: the hidden units that share a row of tiles of ``up`` (and a column of tiles of
``down``) are ``bn`` consecutive units. Grouping units whose saliency lies in the same input-column blocks (and
output-row blocks of ``down``) lets the tiles kept hold more of the saliency at the same sparsity.

:func:`search_order` alternates (a k-means-like search whose objective is the saliency kept): given the groups of
``b`` units, each layer keeps its top tiles (the mask ``choose`` would pick at ``sparsity``); given those masks,
every unit moves to the group whose kept tiles cover most of its own saliency, groups held at ``b`` units (greedy,
units in order of their best gain). It starts from the present order and from units sorted by their dominant
block, and returns the best order seen: never one that keeps less than the present order.

:func:`permute_mlps` finds the MLPs of a model (:data:`MLP_PAIRS`), searches each order from per-weight saliencies
and applies it in place (exact up to fp32 rounding: the same sums in another order). Only ``nn.Linear`` modules
(GPT-2's ``Conv1D`` converted first). Square tiles only (``bn == bk``: the same units group ``up``'s rows and
``down``'s columns).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparseblocks.masks import blocks_to_keep

# (suffixes of the linears whose rows are the hidden units, suffix of the one whose columns are), sharing a prefix
MLP_PAIRS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("mlp.up_proj", "mlp.gate_proj"), "mlp.down_proj"),  # HF Llama, Mistral, Qwen2
    (("mlp.c_fc",), "mlp.c_proj"),  # HF GPT-2 (as nn.Linear)
    (("mlp.fc1",), "mlp.fc2"),  # ViT, timm
    (("intermediate.dense",), "output.dense"),  # BERT, RoBERTa, sentence-transformers
)


@dataclass
class HiddenUnits:
    """One MLP's linears: ``inputs`` (their rows are the hidden units) and ``output`` (its columns are)."""

    inputs: list[str]
    output: str


def mlp_hidden_units(model: nn.Module) -> list[HiddenUnits]:
    """Every MLP of :data:`MLP_PAIRS` in ``model`` whose linears are all ``nn.Linear`` of matching sizes."""
    modules = dict(model.named_modules())
    found = []
    for name in modules:
        for inputs, output in MLP_PAIRS:
            if not (name == inputs[0] or name.endswith("." + inputs[0])):
                continue
            prefix = name[: len(name) - len(inputs[0])]
            names = [prefix + suffix for suffix in inputs if prefix + suffix in modules]
            down = modules.get(prefix + output)
            linears = [modules[n] for n in names]
            if not isinstance(down, nn.Linear) or not all(isinstance(m, nn.Linear) for m in linears):
                continue
            if all(m.out_features == down.in_features for m in linears):
                found.append(HiddenUnits(names, prefix + output))
    return found


def unit_profiles(units: HiddenUnits, saliency: dict[str, torch.Tensor], block: int) -> dict[str, torch.Tensor]:
    """Per linear with a saliency, each hidden unit's saliency summed over that linear's tiles along the other
    dimension: ``(hidden, blocks)``."""
    profiles = {}
    for name in units.inputs:
        if name in saliency:
            s = saliency[name]  # (hidden, K)
            profiles[name] = _pad(s, 1, block).reshape(s.shape[0], -1, block).sum(-1)
    if units.output in saliency:
        s = saliency[units.output]  # (N, hidden)
        profiles[units.output] = _pad(s, 0, block).reshape(-1, block, s.shape[1]).sum(1).t()
    return profiles


def _pad(x: torch.Tensor, dim: int, block: int) -> torch.Tensor:
    extra = -x.shape[dim] % block
    if not extra:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim)


def _group_sums(profile: torch.Tensor, groups: torch.Tensor, count: int) -> torch.Tensor:
    """``(count, blocks)``: the tiles' saliency when unit i sits in group ``groups[i]``."""
    return torch.zeros(count, profile.shape[1], dtype=profile.dtype).index_add_(0, groups, profile)


def kept_saliency(profiles: dict[str, torch.Tensor], groups: torch.Tensor, sparsity: float) -> float:
    """The fraction of the saliency in the tiles each layer keeps (its top ``1 - sparsity``) with units grouped by
    ``groups``."""
    count = int(groups.max()) + 1
    kept = total = 0.0
    for profile in profiles.values():
        tiles = _group_sums(profile, groups, count).flatten()
        keep = blocks_to_keep(tiles.numel(), 1.0 - sparsity)
        kept += tiles.topk(keep).values.sum().item()
        total += tiles.sum().item()
    return kept / total if total > 0 else 1.0


def _masks(profiles: dict[str, torch.Tensor], groups: torch.Tensor, count: int, sparsity: float) -> torch.Tensor:
    """The kept tiles of every layer, side by side: ``(count, all blocks)``."""
    masks = []
    for profile in profiles.values():
        tiles = _group_sums(profile, groups, count)
        keep = blocks_to_keep(tiles.numel(), 1.0 - sparsity)
        mask = torch.zeros(tiles.numel(), dtype=profile.dtype)
        mask[tiles.flatten().topk(keep).indices] = 1.0
        masks.append(mask.view_as(tiles))
    return torch.cat(masks, 1)


def _balanced_assignment(gain: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Each unit (row of ``gain``) to a group (column) with room left, greedily: units with the largest best gain
    choose first."""
    room = sizes.clone()
    groups = torch.empty(gain.shape[0], dtype=torch.long)
    for unit in gain.max(1).values.argsort(descending=True).tolist():
        choice = gain[unit].masked_fill(room == 0, float("-inf")).argmax()
        groups[unit] = choice
        room[choice] -= 1
    return groups


def search_order(profiles: dict[str, torch.Tensor], block: int, sparsity: float, iterations: int = 8) -> torch.Tensor:
    """A permutation of the hidden units (``new_order``: unit ``new_order[i]`` goes to position i) that keeps at
    least as much saliency at ``sparsity`` as the present order (see the module docstring)."""
    hidden = next(iter(profiles.values())).shape[0]
    count = -(-hidden // block)
    sizes = torch.bincount(torch.arange(hidden) // block, minlength=count)
    joined = torch.cat(list(profiles.values()), 1).double()  # (hidden, all blocks)
    profiles = {name: p.double() for name, p in profiles.items()}
    identity = torch.arange(hidden) // block
    best, best_kept = identity, kept_saliency(profiles, identity, sparsity)
    dominant = torch.empty(hidden, dtype=torch.long)
    dominant[(joined / joined.sum(0).clamp_min(1e-30)).argmax(1).argsort(stable=True)] = torch.arange(hidden)
    for start in (identity, dominant // block):
        groups = start
        for _ in range(iterations):
            gain = joined @ _masks(profiles, groups, count, sparsity).t()  # (hidden, count)
            moved = _balanced_assignment(gain, sizes)
            kept = kept_saliency(profiles, moved, sparsity)
            if kept > best_kept:
                best, best_kept = moved, kept
            if torch.equal(moved, groups):
                break
            groups = moved
    return best.argsort(stable=True)


@torch.no_grad()
def apply_order(model: nn.Module, units: HiddenUnits, order: torch.Tensor) -> None:
    """Move the hidden units of one MLP to ``order`` (rows of the inputs and their biases, columns of the output)."""
    for name in units.inputs:
        linear = model.get_submodule(name)
        linear.weight.copy_(linear.weight[order.to(linear.weight.device)])
        if linear.bias is not None:
            linear.bias.copy_(linear.bias[order.to(linear.bias.device)])
    down = model.get_submodule(units.output)
    down.weight.copy_(down.weight[:, order.to(down.weight.device)])


def permute_tensor(name: str, units: HiddenUnits, order: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """A per-weight statistic of linear ``name`` (``(N, K)``, or an input norm ``(K,)``) in the new order."""
    order = order.to(tensor.device)
    if name in units.inputs:
        return tensor[order] if tensor.dim() == 2 else tensor  # an input norm of up is over the model's features
    return tensor[:, order] if tensor.dim() == 2 else tensor[order]


@dataclass
class PermutationReport:
    """Per MLP (its output linear's name): the fraction of saliency kept at each sparsity, before and after."""

    kept_before: dict[str, dict[float, float]]
    kept_after: dict[str, dict[float, float]]

    def summary(self, sparsity: float) -> tuple[float, float]:
        """Mean kept fraction over the MLPs at ``sparsity``: (present order, permuted)."""
        before = [kept[sparsity] for kept in self.kept_before.values()]
        after = [kept[sparsity] for kept in self.kept_after.values()]
        return sum(before) / len(before), sum(after) / len(after)


def permute_mlps(
    model: nn.Module,
    saliency: dict[str, torch.Tensor],
    block: int | tuple[int, int],
    sparsity: float,
    report_at: tuple[float, ...] = (0.5, 0.7, 0.9),
) -> tuple[dict[str, tuple[HiddenUnits, torch.Tensor]], PermutationReport]:
    """Search and apply an order for every MLP of ``model`` one of whose linears has a per-weight ``saliency``
    (``(N, K)``, e.g. w² or w²·F), for tiles of ``block`` at ``sparsity``. Returns ``{output name: (units,
    order)}`` (to move statistics along with :func:`permute_tensor`) and the saliency kept before and after at
    ``report_at`` sparsities (and ``sparsity``)."""
    if isinstance(block, tuple):
        if block[0] != block[1]:
            raise ValueError(f"permutation needs square tiles (the same units group rows and columns), got {block}")
        block = block[0]
    orders, before, after = {}, {}, {}
    levels = sorted({*report_at, sparsity})
    for units in mlp_hidden_units(model):
        profiles = unit_profiles(units, {k: v.detach().float().cpu() for k, v in saliency.items()}, block)
        if not profiles:
            continue
        order = search_order(profiles, block, sparsity)
        identity = torch.arange(order.numel()) // block
        moved = torch.empty_like(order)
        moved[order] = torch.arange(order.numel())  # the new position of each unit
        before[units.output] = {s: kept_saliency(profiles, identity, s) for s in levels}
        after[units.output] = {s: kept_saliency(profiles, moved // block, s) for s in levels}
        apply_order(model, units, order)
        orders[units.output] = (units, order)
    return orders, PermutationReport(before, after)
