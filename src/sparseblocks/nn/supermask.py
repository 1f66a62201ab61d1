"""``SupermaskLinear``: a dense linear gated tile by tile by the top-(1 - s) of trainable block scores.

superblock's Supermask: every ``(bn, bk)`` tile has a score; the forward keeps the tiles of the highest scores
and zeroes the rest; gradients reach the scores straight through the top-k, so the pattern is learnt with the
weights. ``sparsity`` can be raised during training (a ramp); :meth:`SupermaskLinear.to_linear` folds the mask
into a plain weight for conversion to ``BlockSparseLinear``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sparseblocks.format import normalize_block_size
from sparseblocks.masks import block_norms, expand_block_mask, top_blocks_mask


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor FSDP2 shards (a ``DTensor``) gathered whole, the same on every rank; a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class _TopKStraightThrough(torch.autograd.Function):
    """Forward: the 0/1 mask of the top ``keep`` fraction of scores. Backward: the gradient, unchanged."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, keep: float) -> torch.Tensor:
        return top_blocks_mask(scores, keep).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class SupermaskLinear(nn.Module):
    """``y = x · (W ⊙ M(scores))ᵀ + b`` with ``M`` the top-(1 - sparsity) tiles of ``scores`` ``(N_blocks, K_blocks)``.

    Built from an ``nn.Linear`` (sharing its weight and bias parameters); scores start at the tiles' L2 norms, so
    the first mask is the magnitude mask.
    """

    def __init__(self, linear: nn.Linear, block_size: int | Sequence[int], sparsity: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block = normalize_block_size(block_size)
        self.weight, self.bias = linear.weight, linear.bias
        norms = block_norms(linear.weight, self.block)
        self.scores = nn.Parameter((norms / norms.mean().clamp_min(1e-12)).to(linear.weight.dtype))
        self.sparsity = sparsity

    def block_mask(self) -> torch.Tensor:
        """The tiles kept now: bool ``(N_blocks, K_blocks)``."""
        return top_blocks_mask(_whole(self.scores.detach()), 1.0 - self.sparsity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = _TopKStraightThrough.apply(self.scores, 1.0 - self.sparsity)
        return F.linear(x, self.weight * expand_block_mask(mask, self.block, self.weight.shape), self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the mask folded in (zeros where tiles are pruned)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            weight = _whole(self.weight.detach())
            linear.weight.copy_(weight * expand_block_mask(self.block_mask(), self.block, self.weight.shape))
            if self.bias is not None:
                linear.bias.copy_(_whole(self.bias.detach()))
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, "
            f"sparsity={self.sparsity:.3f}"
        )
