"""A small GPT (nanoGPT's layout) and character-level text data: the model the training benchmarks and the
tinyshakespeare experiments use.

Pre-norm blocks, causal ``scaled_dot_product_attention``, a 4x GELU MLP, tied input/output embeddings.
:func:`sparsify_mlps` turns every block's MLP into ``BlockSparseLinear`` layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparseblocks.integrations.sparsify import MLPLayout, register_mlp_layout
from sparseblocks.masks import random_block_mask
from sparseblocks.nn import BlockSparseLinear


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 65
    context: int = 256
    layers: int = 6
    heads: int = 6
    width: int = 384
    mlp_ratio: int = 4
    mlp_hidden: int | None = None  # overrides mlp_ratio * width (iso-parameter baselines)
    dropout: float = 0.0
    causal: bool = True  # False: bidirectional attention (the ViT in sparseblocks.recipes.vit reuses these blocks)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.heads, self.dropout, self.causal = config.heads, config.dropout, config.causal
        self.head_dim = config.width // config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        # -1 heads: a tensor-parallel rank holds some of them (sparseblocks.integrations.distributed.gpt_plan)
        q, k, v = self.qkv(x).view(batch, length, 3, -1, self.head_dim).unbind(2)
        dropout = self.dropout if self.training else 0.0
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, None, dropout, self.causal)
        return self.proj(y.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.mlp_hidden or config.mlp_ratio * config.width
        self.fc = nn.Linear(config.width, hidden)
        self.proj = nn.Linear(hidden, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


register_mlp_layout(MLP, MLPLayout(up="fc", down="proj", activation="gelu"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(config.width), CausalSelfAttention(config)
        self.norm2, self.mlp = nn.LayerNorm(config.width), MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x)))
        return x + self.dropout(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    """Token ids ``(B, T)`` int64 -> logits ``(B, T, vocab)``; with ``targets`` also the mean cross-entropy."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.context, config.width)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight
        self.apply(self._init)
        for name, parameter in self.named_parameters():
            if name.endswith("proj.weight"):  # GPT-2's scaled init of the residual projections
                nn.init.normal_(parameter, std=0.02 / math.sqrt(2 * config.layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss


def sparsify_mlps(
    model: GPT, sparsity: float, block_size: int, generator: torch.Generator | None = None
) -> list[BlockSparseLinear]:
    """Replace each MLP's two linears by ``BlockSparseLinear`` on a random pattern (each tile kept with the same
    count per layer), keeping the dense initial values on the kept tiles; returns the new layers."""
    layers = []
    for block in model.blocks:
        for name in ("fc", "proj"):
            linear = getattr(block.mlp, name)
            grid = (-(-linear.out_features // block_size), -(-linear.in_features // block_size))
            mask = random_block_mask(grid, 1.0 - sparsity, generator)
            layer = BlockSparseLinear.from_linear(linear, block_size=block_size, mask=mask)
            setattr(block.mlp, name, layer)
            layers.append(layer)
    return layers


class CharData:
    """A text file as character ids: the first ``train_fraction`` for training, the rest for validation."""

    def __init__(self, path: str | Path, train_fraction: float = 0.9) -> None:
        text = Path(path).read_text(encoding="utf-8")
        self.chars = sorted(set(text))
        lookup = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
        split = int(train_fraction * len(ids))
        self.train, self.val = ids[:split], ids[split:]

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def batch(
        self, split: str, batch_size: int, context: int, generator: torch.Generator, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: inputs and next-character targets, both ``(batch_size, context)`` int64."""
        ids = self.train if split == "train" else self.val
        starts = torch.randint(len(ids) - context - 1, (batch_size,), generator=generator)
        windows = torch.stack([ids[s : s + context + 1] for s in starts.tolist()])
        windows = windows.to(device, non_blocking=True)
        return windows[:, :-1], windows[:, 1:]


def train(
    model: GPT,
    data: CharData,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = torch.bfloat16,
) -> list[float]:
    """AdamW on random training windows (fixed by ``seed``); returns the loss of every step.

    Runs where the model is; ``autocast_dtype`` None trains in the model's own dtype.
    """
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        tokens, targets = data.batch("train", batch_size, model.config.context, generator, device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            _, loss = model(tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
