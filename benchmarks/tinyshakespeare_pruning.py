"""Every pruning method on a character GPT trained on tinyshakespeare (accuracy experiment 1).

    PYTHONPATH=src python3 benchmarks/tinyshakespeare_pruning.py [--steps 3000] [--data FILE] [--shard I/N]
        [--time-budget SECONDS]

Runs the grid of ``sparseblocks.recipes.experiments`` (dense, iso-parameter dense, and magnitude, activation-aware
magnitude, Supermask, gradual magnitude, prune-and-grow and Fisher at MLP sparsity 0.5/0.8/0.9/0.95 with block 32, and
blocks 16/64 at 0.9). Rows already in the result file are skipped, so an interrupted run resumes. Writes
benchmarks/results/accuracy/tinyshakespeare.json, .md and .png.

The small model leaves a GPU mostly waiting for kernel launches, so several workers share one: N workers started
together with ``--shard I/N`` split the grid points no result file holds yet, each writing
``tinyshakespeare.shardIofN.json``; a run without ``--shard`` takes the shards' rows as done, runs what is left and
writes the merged result.
"""

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from sparseblocks.bench.plots import save_figure
from sparseblocks.bench.results import markdown_table, new_result, read_result, write_result
from sparseblocks.recipes.experiments import Experiment, grid, run
from sparseblocks.recipes.gpt import CharData


def report(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    payload = read_result(path)
    rows = payload["rows"]
    lines = [
        f"# Pruning methods on tinyshakespeare\n\nCommand: `{payload['env']['command']}` on {payload['device']}; "
        f"settings {payload['experiment']}.\n",
        f"Rows merged from {len(payload.get('merged_from', []))} shard workers' files (their commands: the JSON's "
        "`merged_from`).\n",
        *markdown_table(["method", "sparsity", "block", "val loss"],
                        ([r["method"], r["sparsity"], r["block"], f"{r['val_loss']:.4f}"] for r in rows)),
    ]  # fmt: skip
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in sorted({r["method"] for r in rows if r["method"] != "dense"}):
        mine = [r for r in rows if r["method"] == method and r["block"] in (32, None)]
        points = sorted((r["sparsity"], r["val_loss"]) for r in mine)
        ax.plot(*zip(*points, strict=True), "-o", label=method, ms=3)
    dense = [r["val_loss"] for r in rows if r["method"] == "dense"]
    if dense:
        ax.axhline(dense[0], color="black", lw=0.8, ls="--", label="dense")
    ax.set_xlabel("MLP sparsity (block 32)")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=7)
    save_figure(fig, path.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    parser.add_argument("--steps", type=int, default=Experiment.steps)
    for name in ("layers", "heads", "width", "context", "batch_size"):  # a smaller model for a CPU pilot
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(Experiment, name))
    for name in ("dropout", "beta2"):
        parser.add_argument(f"--{name}", type=float, default=getattr(Experiment, name))
    parser.add_argument("--out", default="benchmarks/results/accuracy/tinyshakespeare.json")
    parser.add_argument("--shard", default=None, help="I/N: this worker's share of the grid")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: start no run that the longest run so far would carry past it")  # fmt: skip
    args = parser.parse_args()
    experiment = Experiment(steps=args.steps, layers=args.layers, heads=args.heads, width=args.width,
                            context=args.context, batch_size=args.batch_size, dropout=args.dropout,
                            beta2=args.beta2)  # fmt: skip
    data = CharData(args.data)
    path = Path(args.out)
    all_runs = grid((0.5, 0.8, 0.9, 0.95), (32,), extra_blocks=(16, 64))
    shard_files = sorted(path.parent.glob(f"{path.stem}.shard*.json"))
    if args.shard:
        index, count = (int(part) for part in args.shard.split("/"))
        path = path.with_name(f"{path.stem}.shard{index}of{count}.json")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    payload = new_result("accuracy_tinyshakespeare", "python " + " ".join(sys.argv), device=device,
                         experiment=asdict(experiment))  # fmt: skip
    done = []  # rows of this experiment in any file: a worker skips what another shard (of any count) ran
    devices, merged_commands = set(), set()
    for source in dict.fromkeys([path, *shard_files]):
        previous = json.loads(source.read_text()) if source.exists() else {}
        if previous.get("experiment") == payload["experiment"]:
            done += previous["rows"]
            if source == path or not args.shard:
                payload["rows"] += [r for r in previous["rows"] if r not in payload["rows"]]
                devices.add(previous["device"])
                if source != path:
                    merged_commands.add(previous["env"]["command"])
    done = {(r["method"], r["sparsity"], r["block"]) for r in done}
    runs = [point for point in all_runs if point not in done]
    if args.shard:  # workers started together split what is left
        runs = runs[index::count]
    started, longest = time.monotonic(), 0.0
    for method, sparsity, block in runs:
        if args.time_budget is not None and time.monotonic() - started + longest > args.time_budget:
            break
        began = time.monotonic()
        payload["rows"].append(run(method, sparsity, block, data, experiment))
        longest = max(longest, time.monotonic() - began)
        print(payload["rows"][-1], flush=True)
        write_result(path, payload)
    if runs:
        devices.add(device)
    payload["device"] = ", ".join(sorted(devices))
    if not args.shard:
        payload["merged_from"] = sorted(merged_commands)
        payload["rows"].sort(key=lambda r: all_runs.index((r["method"], r["sparsity"], r["block"])))
        write_result(path, payload)
        report(path)


if __name__ == "__main__":
    main()
