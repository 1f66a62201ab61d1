"""``sparseblocks bench mlp``: whole transformer MLPs, from one decode token to a full prefill batch.

In one run, for each MLP shape, token count, sparsity and block: dense cuBLAS linears (eager, and the MLP under
``torch.compile``), PyTorch's BSR ``F.linear``, our three-product path (``sparse_mlp(fused=False)``: each product
through ``spmm``, which takes its decode kernel at few tokens) and the fused kernel (one launch, hidden activation
on chip). The ``sparseblocks`` rows time ``sparse_mlp`` as a model calls it (``dispatch`` names the path it took
at that commit: one of the two, or at one token a gated MLP's hidden activation in one launch). Each path is
timed as CUDA-graph replays cycling over enough copies of its weights and inputs to overflow the L2 (a model's
weights are read once per token, never warm). With quantized tiles (``quantize``) also the dense fp8 baseline
(``dense_fp8``: every matrix in fp8, the activations quantized per token before each product,
:mod:`sparseblocks.bench.baselines`).

Floors: the MLP's flops at the measured matmul rate (bf16; fp8 for ``dense_fp8``) or its bytes at the measured copy
speed, whichever is longer; the bytes are x, y and the weights (values and indices, or scales) once — the hidden
activation stays on chip.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sparseblocks import reference
from sparseblocks.bench.baselines import FP8_NOTE, FP8Weight, dense_fp8_runs, fp8_cells, fp8_header, fp8_linear
from sparseblocks.bench.decode import clone_matrix, weight_copies
from sparseblocks.bench.harness import Ceilings, measure_ceilings, start_run, time_ms
from sparseblocks.bench.plots import mlp_plot
from sparseblocks.bench.results import markdown_table, ratio_cell, read_result, versions, write_result
from sparseblocks.bench.spmm import random_weight
from sparseblocks.dispatch import Tiles, device_facts, mlp_plan, recompute_factor
from sparseblocks.format import BlockSparseMatrix, MLPWeights
from sparseblocks.kernels.fused_mlp import fused_mlp_triton
from sparseblocks.ops import sparse_mlp


@dataclass(frozen=True)
class MLPShape:
    width: int  # K = N
    hidden: int  # H
    gated: bool  # SwiGLU (gate, up, down; no biases) or GELU (fc1, fc2, with biases)
    tokens: tuple[int, ...]

    @property
    def activation(self) -> str:
        return "silu" if self.gated else "gelu"

    def matrices(self) -> dict[str, tuple[int, int]]:
        """Weight name -> (rows, columns)."""
        up, down = (self.hidden, self.width), (self.width, self.hidden)
        return {"up": up, "down": down, "gate": up} if self.gated else {"up": up, "down": down}


SHAPES = {
    "vit_b": MLPShape(768, 3072, gated=False, tokens=(256 * 197,)),  # 256 images of 197 tokens
    "llama_1b": MLPShape(2048, 8192, gated=True, tokens=(1, 4, 16, 64, 8192)),
    "llama_8b": MLPShape(4096, 14336, gated=True, tokens=(1, 4, 16, 64, 8192)),
}
SPARSITIES = (0.5, 0.8, 0.9, 0.95)
BLOCKS = (32, 64, 128)
# The fused kernel is not timed past this recompute factor: at 3.2 it already took twice the unfused path's time
# (Llama-1B, 8192 tokens, 90%/b64), and at 32 (Llama-8B, 50%/b64) thirty times.
FUSED_MAX_RECOMPUTE = 4.0

Weights = dict[str, torch.Tensor | BlockSparseMatrix | FP8Weight | None]  # up, down, gate, up_bias, down_bias


def _mlp_weights(w: Weights) -> MLPWeights:
    """One case's weights as the ops take them (no gate bias)."""
    return MLPWeights(w["up"], w["down"], w["gate"], w["up_bias"], w["down_bias"])


def _dense_product(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None):
    return reference.ACTIVATIONS[activation](F.linear(x, w, bias))  # F.linear also takes a BSR weight


def mlp_paths(shape: MLPShape) -> dict[str, Callable[[torch.Tensor, Weights], torch.Tensor]]:
    """impl -> fn(x, weights), each the whole MLP of ``shape``."""
    act = shape.activation

    def dense(x, w):
        return reference.mlp(x, _mlp_weights(w), act, product=_dense_product)

    def ours(fused: bool):
        return lambda x, w: sparse_mlp(x, w["up"], w["down"], w["gate"], w["up_bias"], w["down_bias"],
                                       activation=act, fused=fused)  # fmt: skip

    return {
        "dense": dense,
        "dense_compiled": torch.compile(dense),
        "dense_fp8": lambda x, w: reference.mlp(x, _mlp_weights(w), act, product=fp8_linear),
        "torch_bsr": dense,
        "sparseblocks_unfused": ours(False),
        "sparseblocks": ours(True),
        # the kernel itself, whatever sparse_mlp would dispatch to
        "sparseblocks_fused": lambda x, w: fused_mlp_triton(x, _mlp_weights(w), act),
    }


def _weights(shape: MLPShape, make: Callable[[int, int], torch.Tensor | BlockSparseMatrix]) -> Weights:
    """The MLP's weights made by ``make(rows, columns)``; zero biases for the GELU form."""
    weights = {"gate": None, "up_bias": None, "down_bias": None}
    for name, (rows, columns) in shape.matrices().items():
        weights[name] = make(rows, columns)
        if not shape.gated and name != "gate":
            weights[f"{name}_bias"] = torch.zeros(rows, device="cuda", dtype=torch.bfloat16)
    return weights


def _copy(weights: Weights) -> Weights:
    """The same weights in new memory, competing for the L2 like another layer's."""
    return {k: clone_matrix(w) if isinstance(w, BlockSparseMatrix) else w if w is None else w.clone()
            for k, w in weights.items()}  # fmt: skip


def _nbytes(weights: Weights) -> int:
    return sum(w.nbytes for w in weights.values() if w is not None)


def floor_ms(
    ceilings: Ceilings, shape: MLPShape, m: int, weights: Weights, dtype: torch.dtype = torch.bfloat16
) -> float:
    """Flops of the stored weights at the rate of ``dtype``'s products, or x + y + weight bytes at the copy speed."""
    stored = sum(w.nnz * math.prod(w.block_shape) if isinstance(w, BlockSparseMatrix) else math.prod(w.shape)
                 for name, w in weights.items() if name in shape.matrices())  # fmt: skip
    activations = 2 * 2 * m * shape.width
    return ceilings.floor_ms(2 * m * stored, activations + _nbytes(weights), dtype)


def _time(fn: Callable, m: int, width: int, weight_sets: list[Weights]) -> tuple[float, str]:
    """Milliseconds per call of ``fn(x, weights)``, cycling over the weight sets with a fresh x for each."""
    inputs = [(torch.randn(m, width, device="cuda", dtype=torch.bfloat16), w) for w in weight_sets]
    return time_ms(lambda pair: fn(*pair), inputs)


def run(
    quick: bool,
    shapes: tuple[str, ...],
    out_dir: Path | None,
    name: str,
    command: str,
    quantize: tuple[str, ...] = (),
    tokens: tuple[int, ...] = (),
    sparsities: tuple[float, ...] = (),
    blocks: tuple[int, ...] = (),
) -> dict:
    """Time every (shape, tokens, sparsity, block, impl); write ``<name>.json`` and ``<name>.md``. ``quantize``: also
    ours on the tiles quantized as each of these kinds (``int8``, ``fp8``, ``fp8-w8a8``), rows
    ``sparseblocks_<kind>`` with their own bytes and floor, and the dense fp8 baseline (``dense_fp8``). ``tokens``,
    ``sparsities``, ``blocks``: the grid where not empty (the same tokens for every shape), else the full one or the
    ``quick`` one."""
    payload, folder = start_run("mlp", command, out_dir)
    ceilings = measure_ceilings()
    payload["ceilings"] = ceilings.__dict__
    sparsities = sparsities or ((0.5, 0.9) if quick else SPARSITIES)
    blocks = blocks or ((64,) if quick else BLOCKS)
    time_fp8 = dense_fp8_runs(bool(quantize), torch.device("cuda"))
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for shape_name in shapes:
            shape = SHAPES[shape_name]
            quick_tokens = tuple(dict.fromkeys((shape.tokens[0], shape.tokens[-1])))
            paths = mlp_paths(shape)
            dense_one = _weights(shape, lambda n, k: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5)
            dense_sets = weight_copies(lambda one=dense_one: _copy(one), _nbytes(dense_one))
            fp8_sets = []
            if time_fp8:
                fp8_one = {k: FP8Weight.quantize(w) if k in shape.matrices() else w for k, w in dense_one.items()}
                fp8_sets = weight_copies(lambda one=fp8_one: _copy(one), _nbytes(fp8_one))
            for m in tokens or (quick_tokens if quick else shape.tokens):
                base = {"shape": shape_name, "M": m, "K": shape.width, "H": shape.hidden, "dtype": "bf16"}
                dense_floor = floor_ms(ceilings, shape, m, dense_one)
                baselines = [("dense", dense_sets, dense_floor), ("dense_compiled", dense_sets, dense_floor)]
                if fp8_sets:
                    fp8_floor = floor_ms(ceilings, shape, m, fp8_one, torch.float8_e4m3fn)
                    baselines.append(("dense_fp8", fp8_sets, fp8_floor))
                dense_ms = {}
                for impl, weight_sets, floor in baselines:
                    dense_ms[impl], timer = _time(paths[impl], m, shape.width, weight_sets)
                    payload["rows"].append({**base, "sparsity": 0.0, "block": None, "impl": impl, "ms": dense_ms[impl],
                                            "floor_ms": floor, "timer": timer,
                                            "bytes": _nbytes(weight_sets[0])})  # fmt: skip
                print(f"{shape_name} M={m}: " + ", ".join(f"{impl} {ms:.4f} ms" for impl, ms in dense_ms.items())
                      + f", floor {dense_floor:.4f} ms", flush=True)  # fmt: skip
                for sparsity, block in itertools.product(sparsities, blocks):
                    one = _weights(shape, lambda n, k, s=sparsity, b=block: random_weight(n, k, s, b, torch.bfloat16,
                                                                                         generator))  # fmt: skip
                    ours = weight_copies(lambda one=one: _copy(one), _nbytes(one))
                    bsr = [{k: v.to_torch_bsr() if isinstance(v, BlockSparseMatrix) else v for k, v in w.items()}
                           for w in ours]  # fmt: skip
                    floor = floor_ms(ceilings, shape, m, one)
                    measured = {}
                    impls = [("torch_bsr", bsr), ("sparseblocks_unfused", ours), ("sparseblocks", ours)]
                    if recompute_factor(Tiles.of(one["down"])) <= FUSED_MAX_RECOMPUTE:
                        impls.append(("sparseblocks_fused", ours))
                    floors = {}
                    for kind in quantize:
                        impl = f"sparseblocks_{kind.replace('-', '_')}"
                        copies = [{k: v.quantize(kind) if isinstance(v, BlockSparseMatrix) else v for k, v in w.items()}
                                  for w in ours]  # fmt: skip
                        impls.append((impl, copies))
                        floors[impl] = floor_ms(ceilings, shape, m, copies[0]), _nbytes(copies[0])
                    gate = Tiles.of(one["gate"]) if one["gate"] is not None else None
                    up, down = Tiles.of(one["up"]), Tiles.of(one["down"])
                    dispatch = mlp_plan(m, up, down, gate, device_facts(one["up"].device)).value
                    for impl, weight_sets in impls:
                        measured[impl], timer = _time(paths.get(impl, paths["sparseblocks"]), m, shape.width,
                                                      weight_sets)  # fmt: skip
                        path = {"dispatch": dispatch} if impl == "sparseblocks" else {}
                        own = {"floor_ms": floors[impl][0], "bytes": floors[impl][1]} if impl in floors else {}
                        payload["rows"].append({**base, "sparsity": sparsity, "block": block, "impl": impl,
                                                "ms": measured[impl], "floor_ms": floor, "timer": timer,
                                                **path, **own})  # fmt: skip
                    print(f"  s={sparsity:.2f} b={block:<3} " + " | ".join(
                        f"{impl} {ms:.4f} ms {dense_ms['dense'] / ms:5.2f}x" for impl, ms in measured.items())
                        + f" | floor {dense_ms['dense'] / floor:5.2f}x", flush=True)  # fmt: skip
                    del ours, bsr
                write_result(folder / f"{name}.json", payload)
            del dense_sets, fp8_sets
            torch.cuda.empty_cache()
    write_table(folder / f"{name}.json")
    mlp_plot(folder / f"{name}.json")
    return payload


def write_table(json_path: Path) -> Path:
    """``<stem>.md``: per case, each path's speedup over the eager dense MLP, and ours against the floor; where the
    run timed quantized tiles, their speedups, the dense fp8 baseline's, and dense fp8's time over each of ours."""
    payload = read_result(json_path)
    env, rows = payload["env"], payload["rows"]
    key = lambda r: (r["shape"], r["M"], r["sparsity"], r["block"])
    ms = {(r["impl"], key(r)): r["ms"] for r in rows}
    dense = {(r["shape"], r["M"]): r["ms"] for r in rows if r["impl"] == "dense"}
    compiled = {(r["shape"], r["M"]): r["ms"] for r in rows if r["impl"] == "dense_compiled"}
    dense_fp8 = {(r["shape"], r["M"]): r["ms"] for r in rows if r["impl"] == "dense_fp8"}
    paths = ("torch_bsr", "sparseblocks_unfused", "sparseblocks_fused")
    quantized = sorted({r["impl"] for r in rows if r["impl"].startswith("sparseblocks_") and r["impl"] not in paths})
    versus = ["sparseblocks", *quantized] if dense_fp8 else []  # what is compared with dense fp8
    table = []
    for r in (r for r in rows if r["impl"] == "sparseblocks"):
        base = dense[r["shape"], r["M"]]
        cells = [ratio_cell(base, compiled[r["shape"], r["M"]])]
        cells += [ratio_cell(base, ms.get((impl, key(r)))) for impl in paths]
        extra = [ratio_cell(base, ms.get((impl, key(r)))) for impl in quantized]
        if dense_fp8:
            extra += fp8_cells(base, dense_fp8.get((r["shape"], r["M"])), [ms.get((i, key(r))) for i in versus])
        table.append([r["shape"], r["M"], r["sparsity"], r["block"], f"{base:.4f}", *cells,
                      f"**{base / r['ms']:.2f}x**", r["dispatch"], *extra, f"{base / r['floor_ms']:.2f}x",
                      f"{r['floor_ms'] / r['ms']:.0%}"])  # fmt: skip
    lines = [
        f"# Block-sparse MLPs on {env['gpu']}\n",
        f"bf16, CUDA-graph replays over L2-overflowing weight copies, one run ({versions(env)}). "
        f"Command: `{env['command']}`\n",
        "Speedups are over the eager dense MLP (cuBLAS linears). `sparseblocks` is what `sparse_mlp` dispatches "
        "to (`dispatch`); `of floor` is the floor's time over that path's. The fused kernel is not timed where it "
        f"recomputes each hidden tile more than {FUSED_MAX_RECOMPUTE:g} times (—).\n",
        *([FP8_NOTE] if dense_fp8 else []),
        *markdown_table(["shape", "M", "sparsity", "block", "dense ms", "compiled", "torch_bsr", "unfused", "fused",
                         "sparseblocks", "dispatch", *quantized, *(fp8_header(versus) if dense_fp8 else []), "floor",
                         "of floor"], table),
    ]  # fmt: skip
    path = Path(json_path).with_suffix(".md")
    path.write_text("\n".join(lines) + "\n")
    return path
