"""A small Vision Transformer and scikit-learn's 8×8 digits: the image model of the Supermask experiment and the demo.

Patches are embedded by a linear layer, a class token is prepended, and the encoder is ``sparseblocks.recipes.gpt``'s
pre-norm blocks with bidirectional attention; the MLPs are what the ``mlp`` preset prunes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparseblocks.recipes.gpt import Block, GPTConfig


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 8
    patch_size: int = 2
    channels: int = 1
    classes: int = 10
    layers: int = 4
    heads: int = 4
    width: int = 128
    mlp_ratio: int = 4


class ViT(nn.Module):
    """Images ``(B, channels, H, W)`` -> class logits ``(B, classes)``."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        patches = (config.image_size // config.patch_size) ** 2
        self.patch_embedding = nn.Linear(config.channels * config.patch_size**2, config.width)
        self.class_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.position_embedding = nn.Parameter(torch.randn(1, patches + 1, config.width) * 0.02)
        block_config = GPTConfig(layers=config.layers, heads=config.heads, width=config.width,
                                 mlp_ratio=config.mlp_ratio, causal=False)  # fmt: skip
        self.blocks = nn.ModuleList(Block(block_config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        batch = images.shape[0]
        patches = images.unfold(2, p, p).unfold(3, p, p)  # (B, C, H/p, W/p, p, p)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, -1, self.config.channels * p * p)
        x = torch.cat([self.class_token.expand(batch, -1, -1), self.patch_embedding(patches)], 1)
        x = x + self.position_embedding
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def digits(seed: int = 0, test_fraction: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (1,797 images of 8×8, values 0–16) scaled to [0, 1], split stratified by ``seed``:
    ``(train_images (N, 1, 8, 8), train_labels, test_images, test_labels)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    train, test = train_test_split(range(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels)
    return images[train], labels[train], images[test], labels[test]


class ClassifierTraining:
    """AdamW with a one-cycle cosine schedule over ``epochs`` of shuffled batches, a step at a time;
    ``pruner.step()`` after each update. :func:`train_classifier` drives it to the end; ``sparseblocks train vit``
    also checkpoints it between steps (:meth:`state` names every object that changes while it trains).

    images: ``(N, C, H, W)`` float32 where the model is; labels: ``(N,)`` int64 class ids.
    """

    def __init__(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, batch_size: int = 64,
        lr: float = 1e-3, seed: int = 0, pruner=None,
    ) -> None:  # fmt: skip
        self.model, self.images, self.labels, self.batch_size, self.pruner = model, images, labels, batch_size, pruner
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
        self.steps_per_epoch = -(-len(labels) // batch_size)
        self.step, self.steps = 0, epochs * self.steps_per_epoch
        self.schedule = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=lr, total_steps=self.steps, pct_start=0.1
        )
        self.order = torch.zeros(len(labels), dtype=torch.long)  # this epoch's shuffle, drawn at its first step

    def state(self) -> dict[str, object]:
        """What changes during training, by name."""
        return {"model": self.model, "optimizer": self.optimizer, "schedule": self.schedule,
                "pruner": self.pruner, "shuffle": self.generator, "order": self.order}  # fmt: skip

    def train_step(self) -> torch.Tensor:
        """One optimizer step on the next batch; returns its loss, a detached scalar tensor."""
        within = self.step % self.steps_per_epoch
        if within == 0:
            self.order.copy_(torch.randperm(len(self.labels), generator=self.generator))
        batch = self.order[within * self.batch_size : (within + 1) * self.batch_size]
        self.model.train()
        loss = nn.functional.cross_entropy(self.model(self.images[batch]), self.labels[batch], label_smoothing=0.1)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad()
        if self.pruner is not None:
            self.pruner.step()
        self.step += 1
        return loss.detach()


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    pruner=None,
) -> None:
    """AdamW with a cosine schedule over ``epochs`` of shuffled batches; ``pruner.step()`` after each update
    (:class:`ClassifierTraining` to the end); leaves the model in eval mode."""
    training = ClassifierTraining(model, images, labels, epochs, batch_size, lr, seed, pruner)
    while training.step < training.steps:
        training.train_step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` classified right."""
    return (model(images).argmax(-1) == labels).float().mean().item()
