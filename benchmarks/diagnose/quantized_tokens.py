"""Quantized tiles against bf16 tiles at every token count: one Llama up projection at 90%/b64, M from 1 to 8192,
ours on bf16, int8, fp8 and fp8 × fp8 tiles (each as ``spmm`` dispatches it) beside dense bf16 and dense fp8 × fp8.

    PYTHONPATH=src python3 benchmarks/diagnose/quantized_tokens.py [--models llama_1b,llama_8b] [--out FILE.json]

Each path is timed as CUDA-graph replays over L2-overflowing weight copies (``bench decode``'s timer). The table
marks every token count where a quantized path is slower than ours on bf16 tiles of the same pattern: the cases
the dispatch must not leave slower.
"""

import argparse
import shlex
import sys
from pathlib import Path

import torch

from sparseblocks import dispatch
from sparseblocks.bench.baselines import FP8Weight, fp8_linear
from sparseblocks.bench.decode import MODELS, clone_matrix, dense_weights, time_us, weight_copies
from sparseblocks.bench.harness import start_run
from sparseblocks.bench.results import markdown_table, write_result
from sparseblocks.bench.spmm import random_weight
from sparseblocks.ops import spmm

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
KINDS = ("int8", "fp8", "fp8-w8a8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama_1b,llama_8b")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--out", type=Path, help="result file (default benchmarks/results/<gpu>/quantized_tokens.json)")
    args = parser.parse_args()
    payload, folder = start_run("quantized_tokens", "PYTHONPATH=src python3 " + shlex.join(sys.argv), None)
    out = args.out or folder / "quantized_tokens.json"
    generator = torch.Generator().manual_seed(0)
    device = dispatch.device_facts(torch.device("cuda"))
    for model in args.models.split(","):
        k, n = MODELS[model]  # the up projection: (hidden -> intermediate)
        one = random_weight(n, k, args.sparsity, args.block, torch.bfloat16, generator)
        weights = {"sparseblocks": weight_copies(lambda one=one: {"w": clone_matrix(one)}, one.nbytes)}
        for kind in KINDS:
            weights[f"sparseblocks_{kind.replace('-', '_')}"] = [{"w": s["w"].quantize(kind)}
                                                                 for s in weights["sparseblocks"]]  # fmt: skip
        weights["dense"] = weight_copies(lambda n=n, k=k: dense_weights({"w": (n, k)}), 2 * n * k)
        weights["dense_fp8"] = [{"w": FP8Weight.quantize(s["w"])} for s in weights["dense"]]
        paths = {impl: (lambda x, s: spmm(x, s["w"])) for impl in weights if impl.startswith("sparseblocks")}
        paths["dense"] = lambda x, s: torch.nn.functional.linear(x, s["w"])
        paths["dense_fp8"] = lambda x, s: fp8_linear(x, s["w"])
        for m in TOKENS:
            times = {impl: time_us(paths[impl], m, k, sets) for impl, sets in weights.items()}
            for impl, us in times.items():
                plan = _plan(m, k, weights[impl][0]["w"], device) if impl.startswith("sparseblocks") else None
                payload["rows"].append({"shape": f"{model}_up", "M": m, "K": k, "N": n, "sparsity": args.sparsity,
                                        "block": args.block, "impl": impl, "us": us, "plan": plan})  # fmt: skip
            print(f"{model} M={m:<5} " + " | ".join(f"{i} {us:8.1f}" for i, us in times.items()), flush=True)
            write_result(out, payload)
        del weights
        torch.cuda.empty_cache()
    write_table(out)


def _plan(m: int, k: int, w, device: dispatch.Device) -> str:
    """The forward plan ``spmm`` takes for ``m`` tokens (W8A8 tiles: their products too)."""
    x2 = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
    plan = dispatch.forward_plan(m, dispatch.Tiles.of(w), device, lambda: dispatch.descriptors_fit(x2, w, "forward"))
    return plan.value


def write_table(path: Path) -> None:
    """``<stem>.md``: µs per path and each quantized path's speed over ours on bf16 tiles (slower ones marked)."""
    from sparseblocks.bench.results import read_result, versions

    payload = read_result(path)
    rows = payload["rows"]
    us = {(r["shape"], r["M"], r["impl"]): r["us"] for r in rows}
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    quantized = [i for i in impls if i.startswith("sparseblocks_")]
    table = []
    for shape, m in dict.fromkeys((r["shape"], r["M"]) for r in rows):
        bf16 = us[shape, m, "sparseblocks"]
        ratios = [bf16 / us[shape, m, q] for q in quantized]
        table.append([shape, m, *(f"{us[shape, m, i]:.1f}" for i in impls),
                      *(f"{r:.2f}x" + (" **slower**" if r < 1 else "") for r in ratios)])  # fmt: skip
    env = payload["env"]
    lines = [f"# Quantized tiles at every token count on {env['gpu']}\n",
             f"µs per call, CUDA-graph replays over L2-overflowing copies, one run ({versions(env)}). "
             f"Command: `{env['command']}`. Ratios: ours on bf16 tiles over each quantized path (> 1: faster).\n",
             *markdown_table(["shape", "M", *(f"{i} µs" for i in impls), *(f"{q[13:]} vs bf16" for q in quantized)],
                             table)]  # fmt: skip
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
