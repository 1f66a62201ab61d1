"""``sparseblocks bench decode``: 1–64 tokens through Llama MLP weights, where the time is the weight stream.

In one run: dense (cuBLAS), PyTorch's BSR ``F.linear`` and ``sparseblocks.ops.spmm`` (the decode kernel, and the
row kernel it replaces at few tokens), each timed as CUDA-graph replays, beside the bandwidth floor (weights +
indices + activations at the measured copy speed). With quantized tiles (``quantize``) also the dense fp8 baseline
(``dense_fp8``: every matrix in fp8, the activations quantized per token before each product,
:mod:`sparseblocks.bench.baselines`). Cases: each MLP projection of Llama-3.2-1B and Llama-3.1-8B, and
each whole SwiGLU MLP (``down(silu(gate(x)) ⊙ up(x))``: ours through ``ops.sparse_mlp``, which at one token
computes the gated hidden activation in one launch; the other paths as three products and an elementwise one).

A model's weights are read once per token, so none is in L2 when its layer runs: every path cycles through
enough copies of its weights (and inputs) to overflow the L2, and no call reads warm weights.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from sparseblocks.bench.baselines import FP8_NOTE, FP8Weight, dense_fp8_runs, fp8_cells, fp8_header, fp8_linear
from sparseblocks.bench.harness import L2_FLUSH_BYTES, measure_ceilings, start_run, time_ms
from sparseblocks.bench.results import markdown_table, ratio_cell, read_result, versions, write_result
from sparseblocks.bench.spmm import random_weight
from sparseblocks.dispatch import force_plan
from sparseblocks.format import BlockSparseMatrix
from sparseblocks.ops import sparse_mlp, spmm

# Llama (hidden, intermediate) sizes
MODELS = {"llama_1b": (2048, 8192), "llama_8b": (4096, 14336)}
# case -> the projections it runs, as (K, N) per model
CASES = ("up", "down", "mlp")
SHAPES = tuple(f"{model}_{case}" for model, case in itertools.product(MODELS, CASES))  # the rows' "shape"
TOKENS = (1, 4, 16, 64)
SPARSITIES = (0.5, 0.8, 0.9, 0.95)
BLOCKS = (32, 64, 128)

Weights = dict[str, torch.Tensor | BlockSparseMatrix]  # projection name -> weight


def _shapes(model: str, case: str) -> dict[str, tuple[int, int]]:
    """Projection name -> (N, K) for one case."""
    hidden, inner = MODELS[model]
    up, down = (inner, hidden), (hidden, inner)
    return {"gate": up, "up": up, "down": down} if case == "mlp" else {case: up if case == "up" else down}


def weight_copies(one: Callable[[], Weights], nbytes: int) -> list[Weights]:
    """Enough independent weight sets that cycling through them overflows the L2 (2 to 64)."""
    return [one() for _ in range(min(64, max(2, math.ceil(L2_FLUSH_BYTES / nbytes))))]


def clone_matrix(w: BlockSparseMatrix) -> BlockSparseMatrix:
    """A copy in new memory (values and index), so it competes for the L2 like another layer's weight."""
    index = {name: t.clone() for name, t in w.index_tensors().items()}
    return BlockSparseMatrix.from_parts(w.values.clone(), w.shape, index)


def _mlp(linear: Callable[[torch.Tensor, object, str | None], torch.Tensor]) -> Callable:
    """``down(silu(gate(x)) ⊙ up(x))`` built from ``linear(x, weight, activation)``."""
    return lambda x, w: linear(linear(x, w["gate"], "silu") * linear(x, w["up"], None), w["down"], None)


def _dense_linear(x: torch.Tensor, weight: torch.Tensor, activation: str | None) -> torch.Tensor:
    y = F.linear(x, weight)
    return F.silu(y) if activation == "silu" else y


def _row_kernel_spmm(x: torch.Tensor, w: BlockSparseMatrix, activation: str | None) -> torch.Tensor:
    """``spmm`` through the row kernel (pointer loads, as it reads at these sizes) instead of the decode kernels."""
    with force_plan(forward="rows"):
        return spmm(x, w, activation=activation)


def _paths(case: str) -> dict[str, Callable[[torch.Tensor, Weights], torch.Tensor]]:
    """impl -> fn(x, weights); each impl keys its own weight copies (dense, torch_bsr, or BlockSparseMatrix)."""
    linears = {
        "dense": _dense_linear,
        "torch_bsr": _dense_linear,  # F.linear dispatches on the BSR layout
        "sparseblocks": lambda x, w, act: spmm(x, w, activation=act),
        "sparseblocks_rows": _row_kernel_spmm,
        "dense_fp8": lambda x, w, act: fp8_linear(x, w, activation=act),
    }
    if case == "mlp":
        paths = {impl: _mlp(linear) for impl, linear in linears.items()}
        paths["sparseblocks"] = lambda x, w: sparse_mlp(x, w["up"], w["down"], w["gate"], activation="silu")
        return paths
    return {impl: (lambda x, w, linear=linear: linear(x, w[case], None)) for impl, linear in linears.items()}


def time_us(fn: Callable, m: int, in_features: int, weight_sets: list[Weights]) -> float:
    """Microseconds per call of ``fn(x, weights)``, cycling over the weight sets with a fresh x for each."""
    inputs = [(torch.randn(m, in_features, device="cuda", dtype=torch.bfloat16), w) for w in weight_sets]
    return 1e3 * time_ms(lambda pair: fn(*pair), inputs)[0]


def dense_weights(shapes: dict[str, tuple[int, int]]) -> Weights:
    return {p: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k) for p, (n, k) in shapes.items()}


def run(
    quick: bool,
    out_dir: Path | None,
    name: str,
    command: str,
    quantize: tuple[str, ...] = (),
    shape_names: tuple[str, ...] = SHAPES,
    tokens: tuple[int, ...] = (),
    sparsities: tuple[float, ...] = (),
    blocks: tuple[int, ...] = (),
) -> dict:
    """Time every (shape, tokens, sparsity, block); write ``<name>.json`` and a Markdown table. ``quantize``: also
    ours on the tiles quantized as each of these kinds (``int8``, ``fp8``, ``fp8-w8a8``), rows
    ``sparseblocks_<kind>`` with their own bytes and floor, and the dense fp8 baseline (``dense_fp8``).
    ``shape_names`` (of :data:`SHAPES`), ``tokens``, ``sparsities``, ``blocks``: the grid where not empty, else the
    full one or the ``quick`` one."""
    payload, folder = start_run("decode", command, out_dir)
    ceilings = measure_ceilings()
    payload["ceilings"] = ceilings.__dict__
    tokens = tokens or ((1, 16) if quick else TOKENS)
    sparsities = sparsities or ((0.5, 0.9) if quick else SPARSITIES)
    blocks = blocks or ((64,) if quick else BLOCKS)
    time_fp8 = dense_fp8_runs(bool(quantize), torch.device("cuda"))
    generator = torch.Generator().manual_seed(0)
    for model, case in itertools.product(MODELS, CASES):
        if f"{model}_{case}" not in shape_names:
            continue
        shapes = _shapes(model, case)
        in_features = next(iter(shapes.values()))[1]
        dense_bytes = sum(2 * n * k for n, k in shapes.values())
        dense_sets = weight_copies(lambda shapes=shapes: dense_weights(shapes), dense_bytes)
        fp8_sets = []  # dense fp8 copies of their own: at half the bytes, it takes more of them to overflow the L2
        if time_fp8:
            fp8_weights = lambda shapes=shapes: {p: FP8Weight.quantize(w) for p, w in dense_weights(shapes).items()}
            fp8_sets = weight_copies(fp8_weights, dense_bytes // 2)
        sparse_sets = {}
        for sparsity, block in itertools.product(sparsities, blocks):
            one = {p: random_weight(n, k, sparsity, block, torch.bfloat16, generator) for p, (n, k) in shapes.items()}
            nbytes = sum(w.nbytes for w in one.values())
            ours = weight_copies(lambda one=one: {p: clone_matrix(w) for p, w in one.items()}, nbytes)
            bsr = [{p: w.to_torch_bsr() for p, w in weights.items()} for weights in ours]
            quantized = {}  # impl -> (its weight copies, its bytes)
            for kind in quantize:
                copies = [{p: w.quantize(kind) for p, w in weights.items()} for weights in ours]
                quantized[f"sparseblocks_{kind.replace('-', '_')}"] = copies, sum(w.nbytes for w in copies[0].values())
            sparse_sets[sparsity, block] = ours, bsr, nbytes, quantized
        paths = _paths(case)
        for m in tokens:
            base = {"shape": f"{model}_{case}", "M": m, "K": in_features, "dtype": "bf16"}
            activations = 2 * m * sum(n + k for n, k in shapes.values())
            dense_us = time_us(paths["dense"], m, in_features, dense_sets)
            dense_floor = 1e6 * (dense_bytes + activations) / ceilings.copy_bytes_per_s
            payload["rows"].append({**base, "sparsity": 0.0, "block": None, "impl": "dense", "us": dense_us,
                                    "floor_us": dense_floor})  # fmt: skip
            baseline = ""
            if fp8_sets:
                fp8_us = time_us(paths["dense_fp8"], m, in_features, fp8_sets)
                fp8_bytes = sum(w.nbytes for w in fp8_sets[0].values())  # fp8 weights and their scales
                payload["rows"].append({**base, "sparsity": 0.0, "block": None, "impl": "dense_fp8", "us": fp8_us,
                                        "floor_us": 1e6 * (fp8_bytes + activations) / ceilings.copy_bytes_per_s,
                                        "bytes": fp8_bytes})  # fmt: skip
                baseline = f" dense_fp8 {fp8_us:6.1f} us |"
            for (sparsity, block), (ours, bsr, nbytes, quantized) in sparse_sets.items():
                floor = 1e6 * (nbytes + activations) / ceilings.copy_bytes_per_s
                summary = []
                runs = [("sparseblocks", ours, nbytes), ("sparseblocks_rows", ours, nbytes), ("torch_bsr", bsr, nbytes)]
                runs += [(impl, copies, size) for impl, (copies, size) in quantized.items()]
                for impl, weight_sets, size in runs:
                    us = time_us(paths.get(impl, paths["sparseblocks"]), m, in_features, weight_sets)
                    payload["rows"].append({**base, "sparsity": sparsity, "block": block, "impl": impl, "us": us,
                                            "floor_us": 1e6 * (size + activations) / ceilings.copy_bytes_per_s,
                                            "bytes": size})  # fmt: skip
                    summary.append(f"{impl} {us:6.1f} us {dense_us / us:5.2f}x")
                print(f"{base['shape']:<13} M={m:<3} s={sparsity:.2f} b={block:<3} dense {dense_us:6.1f} us |"
                      f"{baseline} {' | '.join(summary)} | floor {floor:5.1f} us ({dense_us / floor:.1f}x)",
                      flush=True)  # fmt: skip
            write_result(folder / f"{name}.json", payload)
        del dense_sets, fp8_sets, sparse_sets
    _write_table(folder / f"{name}.json")
    return payload


def _write_table(json_path: Path) -> Path:
    """``<stem>.md``: per case, the speedup over dense of each path and of the floor, and our share of the floor;
    where the run timed the dense fp8 baseline, its speedup over dense and dense fp8's time over each of ours."""
    payload = read_result(json_path)
    env, rows = payload["env"], payload["rows"]
    dense = {(r["shape"], r["M"]): r["us"] for r in rows if r["impl"] == "dense"}
    dense_fp8 = {(r["shape"], r["M"]): r["us"] for r in rows if r["impl"] == "dense_fp8"}
    case = lambda r: (r["shape"], r["M"], r["sparsity"], r["block"])
    compared = ["sparseblocks_rows", "torch_bsr"]
    compared += sorted({r["impl"] for r in rows if r["impl"].startswith("sparseblocks_") and r["impl"] not in compared})
    quantized = compared[2:]
    versus = ["sparseblocks", *quantized] if dense_fp8 else []  # what is compared with dense fp8
    others = {(r["impl"], case(r)): r["us"] for r in rows}
    table = []
    for r in (r for r in rows if r["impl"] == "sparseblocks"):
        base = dense[(r["shape"], r["M"])]
        cells = [ratio_cell(base, others.get((impl, case(r)))) for impl in compared]
        if dense_fp8:
            cells += fp8_cells(base, dense_fp8.get((r["shape"], r["M"])), [others.get((i, case(r))) for i in versus])
        table.append([r["shape"], r["M"], r["sparsity"], r["block"], f"{base:.1f}", f"{r['us']:.1f}",
                      f"{base / r['us']:.2f}x", *cells, f"{base / r['floor_us']:.2f}x",
                      f"{r['floor_us'] / r['us']:.0%}"])  # fmt: skip
    lines = [
        f"# decode on {env['gpu']}\n",
        f"CUDA-graph replays over L2-overflowing weight copies, same run ({versions(env)}). "
        f"Command: `{env['command']}`\n",
        "`sparseblocks` is `spmm` as it dispatched at that commit; `rows kernel` is spmm's row-per-program kernel.\n",
        *([FP8_NOTE] if dense_fp8 else []),
        *markdown_table(["case", "M", "sparsity", "block", "dense µs", "sparseblocks µs", "speedup", "rows kernel",
                         "torch_bsr", *quantized, *(fp8_header(versus) if dense_fp8 else []), "floor", "of floor"],
                         table),
    ]  # fmt: skip
    path = Path(json_path).with_suffix(".md")
    path.write_text("\n".join(lines) + "\n")
    return path
