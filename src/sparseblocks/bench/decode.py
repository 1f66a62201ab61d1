"""``sparseblocks bench decode``: ``Y = X·Wᵀ`` at 1–64 tokens, where the time is the weight stream.

In one run: dense ``F.linear`` (cuBLAS), PyTorch's BSR ``F.linear`` and ``sparseblocks.ops.spmm``, each timed as
CUDA-graph replays, beside the bandwidth floor (weights + indices + activations at the measured copy speed).
Shapes: the MLP projections of Llama-3.2-1B and Llama-3.1-8B.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from sparseblocks.bench.harness import input_sets, measure_ceilings, start_run, time_ms, write_json
from sparseblocks.bench.spmm import Case, implementations, sparse_weight

# name -> (K, N)
SHAPES = {
    "llama_1b_up": (2048, 8192),
    "llama_1b_down": (8192, 2048),
    "llama_8b_up": (4096, 14336),
    "llama_8b_down": (14336, 4096),
}
TOKENS = (1, 4, 16, 64)
SPARSITIES = (0.5, 0.8, 0.9, 0.95)
BLOCKS = (32, 64, 128)


def run(quick: bool, out_dir: Path | None, name: str, command: str) -> dict:
    """Time every (shape, tokens, sparsity, block); write ``<name>.json`` and a Markdown table; return the payload."""
    payload, folder = start_run("decode", command, out_dir)
    ceilings = measure_ceilings()
    payload["ceilings"] = ceilings.__dict__
    tokens, sparsities = ((1, 16), (0.5, 0.9)) if quick else (TOKENS, SPARSITIES)
    blocks = (64,) if quick else BLOCKS
    for (shape, (k, n)), m in itertools.product(SHAPES.items(), tokens):
        xs = input_sets(lambda m=m, k=k: torch.randn(m, k, device="cuda", dtype=torch.bfloat16), m * k * 2)
        base = {"shape": shape, "M": m, "K": k, "N": n, "dtype": "bf16"}
        dense_us = None
        for sparsity, block in itertools.product(sparsities, blocks):
            w = sparse_weight(Case(shape, m, k, n, "bf16", sparsity, block), torch.bfloat16)
            paths, dense_path = implementations(w)
            paths.pop("stk", None)  # stk needs M to be a multiple of 128
            if dense_us is None:
                dense_us = 1e3 * time_ms(dense_path, xs)[0]
                floor = 1e6 * 2 * (n * k + m * (n + k)) / ceilings.copy_bytes_per_s
                payload["rows"].append({**base, "sparsity": 0.0, "block": None, "impl": "dense", "us": dense_us,
                                        "floor_us": floor})  # fmt: skip
            floor = 1e6 * (w.nbytes + 2 * m * (n + k)) / ceilings.copy_bytes_per_s
            summary = []
            for impl, fn in paths.items():
                us = 1e3 * time_ms(fn, xs)[0]
                payload["rows"].append({**base, "sparsity": sparsity, "block": block, "impl": impl, "us": us,
                                        "floor_us": floor})  # fmt: skip
                summary.append(f"{impl} {us:6.1f} us {dense_us / us:5.2f}x")
            print(f"{shape:<14} M={m:<3} s={sparsity:.2f} b={block:<3} dense {dense_us:6.1f} us | "
                  f"{' | '.join(summary)} | floor {floor:5.1f} us ({dense_us / floor:.1f}x)", flush=True)  # fmt: skip
        write_json(folder / f"{name}.json", payload)
    _write_table(folder / f"{name}.json")
    return payload


def _write_table(json_path: Path) -> Path:
    """``<stem>.md``: per case, the speedup over dense of each path and of the floor, and our share of the floor."""
    import json

    payload = json.loads(Path(json_path).read_text())
    rows = payload["rows"]
    dense = {(r["shape"], r["M"]): r["us"] for r in rows if r["impl"] == "dense"}
    lines = [
        f"# decode spmm on {payload['gpu']}\n",
        f"CUDA-graph replays, same run (torch {payload['torch']}, triton {payload['triton']}, commit "
        f"{payload['commit']}). Command: `{payload['command']}`\n",
        "| shape | M | sparsity | block | dense µs | sparseblocks µs | speedup | torch_bsr | floor | of floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    case = lambda r: (r["shape"], r["M"], r["sparsity"], r["block"])
    bsr = {case(r): r["us"] for r in rows if r["impl"] == "torch_bsr"}
    for r in (r for r in rows if r["impl"] == "sparseblocks"):
        base = dense[(r["shape"], r["M"])]
        bsr_cell = f"{base / bsr[case(r)]:.2f}x" if case(r) in bsr else "—"
        lines.append(
            f"| {r['shape']} | {r['M']} | {r['sparsity']} | {r['block']} | {base:.1f} | {r['us']:.1f} | "
            f"{base / r['us']:.2f}x | {bsr_cell} | {base / r['floor_us']:.2f}x | {r['floor_us'] / r['us']:.0%} |"
        )
    path = Path(json_path).with_suffix(".md")
    path.write_text("\n".join(lines) + "\n")
    return path
