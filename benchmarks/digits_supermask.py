"""Supermask from scratch against dense on scikit-learn's digits (accuracy experiment 3).

    PYTHONPATH=src python benchmarks/digits_supermask.py [--epochs 60]

A small ViT (4 layers, width 128, patches of 2×2) trained from scratch, dense and with Supermask on its MLPs
(block 16, sparsity ramped over the first 60% of training), 3 seeds each; test accuracy of the final model (the
Supermask models converted to BlockSparseLinear). Writes benchmarks/results/accuracy/digits.json and .md.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

from sparseblocks import CubicSchedule, Pruner, SparsityConfig
from sparseblocks.bench.results import markdown_table, new_result, write_result
from sparseblocks.recipes.vit import ViT, ViTConfig, accuracy, digits, train_classifier

OUT = Path("benchmarks/results/accuracy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # small model: one thread is as fast and leaves the other core free
    rows = []
    for seed in range(3):
        train_x, train_y, test_x, test_y = digits(seed)
        steps = args.epochs * -(-len(train_y) // 64)
        for sparsity in (0.0, 0.5, 0.8, 0.9):
            torch.manual_seed(seed)
            model = ViT(ViTConfig())
            pruner = None
            if sparsity:
                config = SparsityConfig(sparsity, args.block, targets="mlp")
                pruner = Pruner(model, config, method="supermask", schedule=CubicSchedule(0, int(0.6 * steps)))
            train_classifier(model, train_x, train_y, args.epochs, lr=args.lr, seed=seed, pruner=pruner)
            if pruner is not None:
                pruner.finalize()
            rows.append({"method": "supermask" if sparsity else "dense", "sparsity": sparsity, "block": args.block,
                         "seed": seed, "test_accuracy": accuracy(model, test_x, test_y)})  # fmt: skip
            print(rows[-1], flush=True)
    command = "PYTHONPATH=src python " + " ".join(sys.argv)
    payload = new_result("accuracy_digits", command, model="ViT 4x128, patch 2, MLP 512", epochs=args.epochs,
                         lr=args.lr, device="cpu")  # fmt: skip
    payload["rows"] = rows
    write_result(OUT / "digits.json", payload)
    table = []
    for sparsity in (0.0, 0.5, 0.8, 0.9):
        scores = [100 * r["test_accuracy"] for r in rows if r["sparsity"] == sparsity]
        method, block = ("supermask", args.block) if sparsity else ("dense", "—")
        per_seed = ", ".join(f"{s:.2f}" for s in scores)
        table.append([method, sparsity, block, f"{statistics.fmean(scores):.2f}", per_seed])
    lines = [
        f"# ViT on scikit-learn digits: Supermask from scratch vs dense (3 seeds)\n\nCommand: `{command}` (CPU).\n",
        *markdown_table(["method", "sparsity", "block", "accuracy mean", "per seed"], table),
    ]
    (OUT / "digits.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
