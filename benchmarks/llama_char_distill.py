"""A small Llama-architecture causal LM on tinyshakespeare, trained dense, then pruned and recovered.

    PYTHONPATH=src python benchmarks/llama_char_distill.py dense --work /tmp/llama_char
    sparseblocks distill /tmp/llama_char/teacher --data /tmp/llama_char/train.txt --eval /tmp/llama_char/heldout.txt ...

``dense``: a character tokenizer built from the text (one token per distinct character, saved as a Hugging Face
``tokenizer.json``), a ``LlamaConfig`` (``--layers`` 4, ``--width`` 256, SwiGLU ``--intermediate`` 768, 4 heads),
trained from scratch on the first 90% of the text (``train.txt``) with the held-out loss measured on the last 10%
(``heldout.txt``) every ``--eval-every`` steps; training stops after ``--patience`` evaluations without a better
held-out loss (or at ``--steps``) and the best state is saved as ``WORK/teacher`` (a Hugging Face folder with its
tokenizer). Writes ``--result`` (schema-1 JSON, kind ``accuracy_distill``): the curve, the best step, and the
train/held-out gap at the best step (both measured on the same number of windows).

``sparse``: the runs of ``--runs`` (names of :data:`RUNS`, each a ``sparseblocks distill`` of ``WORK/teacher`` on
``train.txt`` with ``--eval heldout.txt``: the command is printed and recorded), one after the other; each run's
``distill.json`` and ``distill.png`` are copied to ``--results``/llama_char_<run>.*, and ``--results``/llama_char.md
tabulates every run found there: held-out perplexity before (the teacher) and after, their ratio, the tile sparsity.
"""

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from sparseblocks.bench.results import markdown_table, new_result, write_result

COMMON = ["--block", "32", "--targets", "mlp", "--steps", "300", "--batch-size", "16", "--seq-len", "64",
          "--lr", "1e-3", "--prune-every", "10", "--eval-every", "30", "--eval-windows", "64"]  # fmt: skip
# run name -> its own options (beside COMMON): distillation at 70 and 90%, plain fine-tuning after one-shot pruning
# (no teacher) for the same steps, and at 90% sensitivity allocation and permutation against uniform/no permutation
RUNS = {
    "distill_70": ["--sparsity", "0.7", "--method", "fisher"],
    "distill_90": ["--sparsity", "0.9", "--method", "fisher"],
    "plain_70": ["--sparsity", "0.7", "--method", "fisher", "--no-teacher", "--prune-fraction", "0"],
    "plain_90": ["--sparsity", "0.9", "--method", "fisher", "--no-teacher", "--prune-fraction", "0"],
    "distill_90_sensitivity": ["--sparsity", "0.9", "--method", "fisher", "--allocation", "sensitivity"],
    "distill_90_permute": ["--sparsity", "0.9", "--method", "fisher", "--permute"],
}


def char_tokenizer(text: str):
    """A fast tokenizer with one token per distinct character of ``text`` (and ``[UNK]``), no special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[UNK]", *sorted(set(text))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


def windows_loss(model, ids: torch.Tensor, seq_len: int, count: int, batch: int) -> float:
    """Mean next-token loss over ``count`` windows spread evenly over ``ids``."""
    starts = torch.linspace(0, len(ids) - seq_len - 1, count).long()
    losses = []
    model.eval()
    with torch.no_grad():
        for chunk in starts.split(batch):
            x = torch.stack([ids[s : s + seq_len] for s in chunk.tolist()])
            losses.append(model(input_ids=x, labels=x).loss.item() * len(chunk))
    model.train()
    return sum(losses) / count


def dense(args: argparse.Namespace) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text = Path(args.data).read_text()
    cut = int(0.9 * len(text))
    (work / "train.txt").write_text(text[:cut])
    (work / "heldout.txt").write_text(text[cut:])
    tokenizer = char_tokenizer(text)
    train = torch.tensor(tokenizer(text[:cut], add_special_tokens=False)["input_ids"])
    held = torch.tensor(tokenizer(text[cut:], add_special_tokens=False)["input_ids"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.width, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=args.seq_len, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = 100

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (args.steps - warmup))))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(args.seed)
    curve, best, best_state, waited = [], None, None, 0
    start = time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        starts = torch.randint(len(train) - args.seq_len - 1, (args.batch_size,), generator=generator)
        x = torch.stack([train[s : s + args.seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            held_loss = windows_loss(model, held, args.seq_len, args.eval_windows, args.batch_size)
            train_loss = windows_loss(model, train, args.seq_len, args.eval_windows, args.batch_size)
            curve.append({"step": step, "train_loss": train_loss, "heldout_loss": held_loss,
                          "seconds": time.perf_counter() - start})  # fmt: skip
            print(curve[-1], flush=True)
            if best is None or held_loss < best["heldout_loss"]:
                best, waited = curve[-1], 0
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
                model.save_pretrained(work / "teacher")  # the best so far: a run cut short still leaves it
                tokenizer.save_pretrained(work / "teacher")
            else:
                waited += 1
                if waited >= args.patience:
                    break
    model.load_state_dict(best_state)
    payload = new_result("accuracy_distill", "PYTHONPATH=src python " + " ".join(sys.argv))
    payload |= {"model": f"Llama {args.layers} layers, width {args.width}, SwiGLU {args.intermediate}, character "
                f"vocabulary of {len(tokenizer)}", "stage": "dense teacher",
                "settings": vars(args), "best": best, "parameters": sum(p.numel() for p in model.parameters()),
                "gap_at_best": best["heldout_loss"] - best["train_loss"],
                "heldout_perplexity_at_best": math.exp(best["heldout_loss"]), "rows": curve}  # fmt: skip
    write_result(args.result, payload)
    print(json.dumps(best))


def sparse(args: argparse.Namespace) -> None:
    from sparseblocks.cli import main as cli

    work, results = Path(args.work), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    for name in args.runs.split(","):
        argv = ["distill", str(work / "teacher"), "--data", str(work / "train.txt"), "--eval",
                str(work / "heldout.txt"), *COMMON, *RUNS[name], "--out", str(work / name)]  # fmt: skip
        print("sparseblocks " + shlex.join(argv), flush=True)
        start = time.perf_counter()
        if cli(argv) != 0:
            raise SystemExit(f"run {name} failed")
        result = json.loads((work / name / "distill.json").read_text())
        result["seconds"] = time.perf_counter() - start
        result["run"] = name
        write_result(results / f"llama_char_{name}.json", result)
        shutil.copy(work / name / "distill.png", results / f"llama_char_{name}.png")
    rows = []
    for path in sorted(results.glob("llama_char_*.json")):
        result = json.loads(path.read_text())
        if "run" not in result:
            continue
        rows.append([result["run"], f"{result['sparsity']:.3f}", result["settings"]["allocation"],
                     result["settings"]["permute"], "yes" if result["settings"]["teacher"] else "no (one-shot, "
                     "plain fine-tuning)", f"{result['before']:.4f}", f"{result['after']:.4f}",
                     f"{result['after'] / result['before']:.4f}", f"{result['seconds']:.0f}"])  # fmt: skip
    lines = ["# Character Llama on tinyshakespeare: MLPs pruned in tiles of 32, recovered\n",
             f"Teacher: `{results / 'llama_char_teacher.json'}`. Runs: `PYTHONPATH=src python benchmarks/"
             "llama_char_distill.py sparse --runs NAME` (the `sparseblocks distill` command of each is in its JSON's "
             f"env.command), common options `{shlex.join(COMMON)}`. Held-out perplexity on 64 windows of 64 "
             "characters of the last 10% of the text.\n"]  # fmt: skip
    lines += markdown_table(["run", "sparsity", "allocation", "permute", "teacher", "ppl dense", "ppl after",
                             "ratio", "seconds"], rows)  # fmt: skip
    (results / "llama_char.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("dense", "sparse"))
    parser.add_argument("--runs", default=",".join(RUNS), help=f"sparse: comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--results", default="benchmarks/results/accuracy", help="sparse: where the results go")
    parser.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    parser.add_argument("--work", default="/tmp/llama_char")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--result", default="benchmarks/results/accuracy/llama_char_teacher.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense(args) if args.stage == "dense" else sparse(args)


if __name__ == "__main__":
    main()
