"""``sparseblocks demo``: the whole story on whatever machine, in about a minute on two CPU cores.

A small ViT learns scikit-learn's digits twice from the same initialisation: dense, and with Supermask on its MLPs
(the superblock recipe of :mod:`sparseblocks.recipes.training`: block scores trained with the weights, sparsity ramped).
The Supermask model is converted to ``BlockSparseLinear``, checked against its masked dense twin, saved with
``save_sparse`` and loaded back. Printed: test accuracy, params and bytes of both, and on a CUDA GPU the forward
time of the converted model against its dense twin. Written to ``out``: ``demo.json`` (the numbers), ``demo.png``
(plotted from them) and ``model/`` (the converted model, :func:`sparseblocks.recipes.training.load_recipe_model`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from sparseblocks.backend import describe
from sparseblocks.bench.plots import save_figure
from sparseblocks.integrations.sparsify import densify, model_size
from sparseblocks.recipes.training import (
    ViTRecipe,
    finish_vit,
    load_image_data,
    load_recipe_model,
    run_training,
    save_recipe_model,
    vit_training,
)

# 2 layers × 128 at batch 128 and lr 5e-3 for 30 epochs reach the 4-layer, 60-epoch recipe's accuracy (~95% on
# digits) in a quarter of its time: ~17 s per model on 2 cores of a 2026 cloud CPU.
DEMO_RECIPE = ViTRecipe(epochs=30, lr=5e-3, batch_size=128, layers=2)
GPU_BATCH = 8192  # images (33 tokens each) for the GPU timing: enough work to fill an H100 with this small model


def _mlp_bytes(model: nn.Module) -> int:
    """Bytes of the blocks' MLPs: what the recipe prunes."""
    return sum(model_size(block.mlp)[1] for block in model.blocks)


def _forward_ms(model: nn.Module, images: torch.Tensor, repeats: int = 20) -> float:
    """Mean forward time in ms under bf16 autocast, by CUDA events after a warm-up (which autotunes the kernels)."""
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        for _ in range(3):
            model(images)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            model(images)
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def _relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.double() - expected.double()).norm() / expected.double().norm()).item()


def plot(results: dict, path: Path) -> None:
    """``demo.png`` from ``demo.json``'s numbers: loss curves, test accuracy, bytes (and GPU time if measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["models"]
    panels = 4 if "forward_ms" in rows["sparse"] else 3
    fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.2))
    names, colors = ("dense", "sparse"), ("tab:gray", "tab:blue")
    for name, color in zip(names, colors, strict=True):
        axes[0].plot(rows[name]["epoch_loss"], color=color, label=rows[name]["label"])
    axes[0].set(xlabel="epoch", ylabel="training loss", title="training")
    axes[0].legend(fontsize=7)
    axes[1].bar(names, [100 * rows[n]["test_accuracy"] for n in names], color=colors)
    axes[1].set(ylabel="test accuracy (%)", title="accuracy", ylim=(0, 100))
    for i, name in enumerate(names):
        accuracy = 100 * rows[name]["test_accuracy"]
        axes[1].text(i, accuracy - 8, f"{accuracy:.1f}%", ha="center", color="white")
    width = 0.38
    for i, (name, color) in enumerate(zip(names, colors, strict=True)):
        values = [rows[name]["bytes"] / 1024, rows[name]["mlp_bytes"] / 1024]
        axes[2].bar([j + (i - 0.5) * width for j in range(2)], values, width, color=color, label=name)
    axes[2].set_xticks(range(2), ["whole model", "MLPs"])
    axes[2].set(ylabel="KiB (weights + indices)", title="memory")
    axes[2].legend(fontsize=7)
    if panels == 4:
        axes[3].bar(names, [rows[n]["forward_ms"] for n in names], color=colors)
        axes[3].set(ylabel="ms", xlabel=results["gpu"], title=f"forward, {results['gpu_batch']} images, bf16")
    fig.suptitle(results["title"], fontsize=9)
    save_figure(fig, path)


def run_demo(
    sparsity: float = 0.9,
    block_size: int = 16,
    epochs: int = DEMO_RECIPE.epochs,
    out: str | Path = "sparseblocks-demo",
    seed: int = 0,
    progress: bool = True,
) -> float:
    """Train, convert, check, save and plot (see the module docstring); returns the largest relative error of the
    converted model (against its masked dense twin, and after saving and loading it): below 1e-4 when right."""
    out = Path(out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    if device == "cpu":  # products of width ≤ 512 stop scaling after a few threads (2 cores: 1.4x faster than 1)
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    try:
        data = load_image_data("digits", seed=seed)
        recipe = dataclasses.replace(DEMO_RECIPE, sparsity=sparsity, block=block_size, epochs=epochs, seed=seed)
        models, rows = {}, {}
        for name, settings in (("dense", dataclasses.replace(recipe, sparsity=0.0)), ("sparse", recipe)):
            training, pruner = vit_training(data, settings)
            losses = run_training(training, progress=progress, description=name)
            result = finish_vit(training, pruner, data)  # converts the Supermask model to BlockSparseLinear
            models[name] = training.model
            rows[name] = {
                "label": "dense" if name == "dense" else f"Supermask {sparsity:.0%}, blocks {block_size}",
                "test_accuracy": result["test_accuracy"],
                "params": result["params"][1],
                "bytes": result["bytes"][1],
                "mlp_bytes": _mlp_bytes(training.model),
                "epoch_loss": [round(x, 4) for x in losses.view(epochs, -1).mean(1).tolist()],
            }

        # The converted model computes what its masked dense twin (the same tiles in nn.Linear) computes ...
        sparse = models["sparse"]
        twin = densify(copy.deepcopy(sparse))
        images = data.test_images.to(device)
        with torch.no_grad():
            logits, twin_logits = sparse(images), twin(images)
        twin_error = _relative_error(logits, twin_logits)
        # ... and reads back from its files the same.
        save_recipe_model(sparse, out / "model", dataclasses.asdict(recipe), rows["sparse"], classes=data.classes)
        with torch.no_grad():
            reload_error = _relative_error(load_recipe_model(out / "model").to(device)(images), logits)

        results = {
            "title": f"ViT {recipe.layers}×{recipe.width} on digits, {epochs} epochs: dense vs Supermask "
            f"{sparsity:.0%} (blocks {block_size}) converted to BlockSparseLinear",
            "ops": describe(),
            "models": rows,
            "twin_error": twin_error,
            "reload_error": reload_error,
        }
        if device == "cuda":
            batch = images[torch.arange(GPU_BATCH, device=device) % len(images)]
            results.update(gpu=torch.cuda.get_device_name(), gpu_batch=GPU_BATCH)
            rows["dense"]["forward_ms"] = _forward_ms(twin, batch)  # same weights, dense nn.Linear
            rows["sparse"]["forward_ms"] = _forward_ms(sparse, batch)
        out.mkdir(parents=True, exist_ok=True)
        (out / "demo.json").write_text(json.dumps(results, indent=1) + "\n")
        plot(results, out / "demo.png")
    finally:
        torch.set_num_threads(threads)

    dense, sparse_row = rows["dense"], rows["sparse"]
    print(f"sparseblocks demo: {results['title']}")
    print(f"  ops: {results['ops']}")
    print(f"  {'':<8}{'test acc':>10}{'params':>12}{'bytes':>12}{'MLP bytes':>12}")
    for name, row in (("dense", dense), ("sparse", sparse_row)):
        print(f"  {name:<8}{row['test_accuracy']:>10.1%}{row['params']:>12,}{row['bytes']:>12,}{row['mlp_bytes']:>12,}")
    ratios = [sparse_row[k] / dense[k] for k in ("params", "bytes", "mlp_bytes")]
    print(f"  {'ratio':<8}{'':>10}{ratios[0]:>12.3f}{ratios[1]:>12.3f}{ratios[2]:>12.3f}")
    if device == "cuda":
        speedup = dense["forward_ms"] / sparse_row["forward_ms"]
        print(f"  forward, {GPU_BATCH} images, bf16, {results['gpu']}: dense {dense['forward_ms']:.3f} ms, "
              f"sparse {sparse_row['forward_ms']:.3f} ms ({speedup:.2f}x; layers this narrow leave the kernels "
              "little to skip: `sparseblocks bench spmm` times real layer shapes)")  # fmt: skip
    else:
        print("  speed: no CUDA GPU here; on one, the demo times the converted model against its dense twin")
    error = max(twin_error, reload_error)
    status = "OK" if error < 1e-4 else "MISMATCH"
    print(f"  converted vs masked dense twin: relative error {twin_error:.1e}; saved and reloaded: "
          f"{reload_error:.1e} [{status}]")  # fmt: skip
    print(f"  wrote {out / 'demo.png'}, {out / 'demo.json'} and the model in {out / 'model'}")
    return error
