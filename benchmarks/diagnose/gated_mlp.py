"""Same-run timing of a SwiGLU MLP's inference paths: dense, three ``spmm`` calls, and the gated row kernel.

    PYTHONPATH=src python3 benchmarks/diagnose/gated_mlp.py [--shapes llama_1b,llama_8b] [--tokens 8192,2048,64]
        [--sparsities 0.9,0.8] [--block 64] [--out DIR]

``unfused`` is ``sparse_mlp(..., fused=False)`` (gate with silu, up, their product, down: four launches);
``gated`` is ``sparse_mlp`` where ``dispatch.mlp_plan`` chooses ``gated_rows`` (gate, up and their product in one launch
of the row kernel, then down). Weights are rotated past the L2 as in ``sparseblocks bench mlp``. Prints a table and
writes ``DIR/gated_mlp.json`` in ``bench mlp``'s form (rows: shape, M, K, H, dtype, sparsity, block, impl —
``dense``, ``sparseblocks_unfused``, ``sparseblocks`` with the ``dispatch`` taken —, ms, floor_ms), which
``sparseblocks report`` reads as an MLP run (kind ``mlp``).
"""

import argparse
import sys
from pathlib import Path

import torch

from sparseblocks.bench.decode import weight_copies
from sparseblocks.bench.harness import measure_ceilings, start_run
from sparseblocks.bench.mlp import SHAPES, _copy, _nbytes, _time, _weights, floor_ms, mlp_paths
from sparseblocks.bench.results import write_result
from sparseblocks.bench.spmm import random_weight
from sparseblocks.dispatch import Tiles, device_facts, mlp_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="llama_1b,llama_8b")
    parser.add_argument("--tokens", default="8192,2048,64")
    parser.add_argument("--sparsities", default="0.9,0.8")
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("/tmp/gated_mlp"))
    args = parser.parse_args()
    payload, _ = start_run("mlp", "PYTHONPATH=src python3 " + " ".join(sys.argv), args.out)
    ceilings = measure_ceilings()
    payload["ceilings"] = ceilings.__dict__
    generator = torch.Generator().manual_seed(0)
    print(f"{payload['env']['gpu']}: ms per MLP call (speedup over dense)")
    with torch.inference_mode():
        for shape_name in args.shapes.split(","):
            shape = SHAPES[shape_name]
            paths = mlp_paths(shape)
            dense_one = _weights(shape, lambda n, k: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5)
            dense_sets = weight_copies(lambda one=dense_one: _copy(one), _nbytes(dense_one))
            for m in (int(t) for t in args.tokens.split(",")):
                dense_ms, _ = _time(paths["dense"], m, shape.width, dense_sets)
                base = {"shape": shape_name, "M": m, "K": shape.width, "H": shape.hidden, "dtype": "bf16"}
                payload["rows"].append({**base, "sparsity": 0.0, "block": None, "impl": "dense", "ms": dense_ms,
                                        "floor_ms": floor_ms(ceilings, shape, m, dense_one)})  # fmt: skip
                for sparsity in (float(s) for s in args.sparsities.split(",")):
                    one = _weights(shape, lambda n, k, s=sparsity: random_weight(n, k, s, args.block, torch.bfloat16,
                                                                                 generator))  # fmt: skip
                    up, down, gate = (None if one[p] is None else Tiles.of(one[p]) for p in ("up", "down", "gate"))
                    path = mlp_plan(m, up, down, gate, device_facts(one["up"].device)).value
                    sets = weight_copies(lambda one=one: _copy(one), _nbytes(one))
                    unfused_ms, _ = _time(paths["sparseblocks_unfused"], m, shape.width, sets)
                    chosen_ms, _ = _time(paths["sparseblocks"], m, shape.width, sets)
                    sparse = {**base, "sparsity": sparsity, "block": args.block,
                              "floor_ms": floor_ms(ceilings, shape, m, one)}  # fmt: skip
                    payload["rows"].append({**sparse, "impl": "sparseblocks_unfused", "ms": unfused_ms})
                    payload["rows"].append({**sparse, "impl": "sparseblocks", "dispatch": path, "ms": chosen_ms})
                    print(f"{shape_name} M={m:5} s={sparsity}: dense {dense_ms:.4f} | unfused {unfused_ms:.4f} "
                          f"({dense_ms / unfused_ms:.2f}x) | {path} {chosen_ms:.4f} ({dense_ms / chosen_ms:.2f}x)",
                          flush=True)  # fmt: skip
                    write_result(args.out / "gated_mlp.json", payload)
                    del sets


if __name__ == "__main__":
    main()
