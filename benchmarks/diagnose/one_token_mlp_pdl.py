"""Same-run A/B of a whole Llama SwiGLU MLP at one token: three products and an elementwise kernel (four launches),
against the one-token path of ``sparse_mlp`` (two launches), with and without programmatic dependent launch (PDL);
and each projection alone with and without PDL (back-to-back replays of one kernel: PDL's most favourable case).

PYTHONPATH=src python3 benchmarks/diagnose/one_token_mlp_pdl.py [--out FILE.json]

Prints a line per case and writes every time as a row of a ``one_token_mlp`` result (``--out``, default
``benchmarks/results/<gpu>/one_token_mlp_pdl.json``).
"""

import argparse
import itertools
import shlex
import sys
from pathlib import Path

import torch

from sparseblocks.bench.decode import (
    MODELS,
    _dense_linear,
    _mlp,
    _shapes,
    clone_matrix,
    dense_weights,
    time_us,
    weight_copies,
)
from sparseblocks.bench.harness import start_run
from sparseblocks.bench.results import write_result
from sparseblocks.bench.spmm import random_weight
from sparseblocks.kernels import one_token
from sparseblocks.ops import sparse_mlp, spmm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, help="result file (default benchmarks/results/<gpu>/one_token_mlp_pdl.json)"
    )
    args = parser.parse_args()
    payload, folder = start_run("one_token_mlp", "PYTHONPATH=src python3 " + shlex.join(sys.argv), None)
    out = args.out or folder / "one_token_mlp_pdl.json"
    default = one_token.PROGRAMMATIC_LAUNCH
    generator = torch.Generator().manual_seed(0)
    print(torch.cuda.get_device_name())
    four_launches = _mlp(lambda x, w, act: spmm(x, w, activation=act))
    two_launches = lambda x, w: sparse_mlp(x, w["up"], w["down"], w["gate"], activation="silu")
    for model in MODELS:
        shapes = _shapes(model, "mlp")
        k = shapes["up"][1]
        dense_sets = weight_copies(lambda s=shapes: dense_weights(s), sum(2 * n * k for n, k in shapes.values()))
        dense = time_us(_mlp(_dense_linear), 1, k, dense_sets)
        for sparsity, block in itertools.product((0.5, 0.9, 0.95), (32, 64)):
            one = {p: random_weight(n, k, sparsity, block, torch.bfloat16, generator) for p, (n, k) in shapes.items()}
            sets = weight_copies(lambda one=one: {p: clone_matrix(w) for p, w in one.items()},
                                 sum(w.nbytes for w in one.values()))  # fmt: skip
            times = {"4 launches": time_us(four_launches, 1, k, sets)}
            for pdl in (False, True):
                one_token.PROGRAMMATIC_LAUNCH = pdl
                times[f"2 launches{', PDL' if pdl else ''}"] = time_us(two_launches, 1, k, sets)
            one_token.PROGRAMMATIC_LAUNCH = default
            cells = " | ".join(f"{name} {us:5.1f} us {dense / us:5.2f}x" for name, us in times.items())
            print(f"{model}_mlp M=1 s={sparsity} b={block:<3} dense {dense:6.1f} us | {cells}", flush=True)
            base = {"shape": f"{model}_mlp", "M": 1, "sparsity": sparsity, "block": block, "dense_us": dense}
            payload["rows"] += [{**base, "variant": name, "us": us} for name, us in times.items()]
            write_result(out, payload)
    for model, case in itertools.product(MODELS, ("up", "down")):
        ((n, k),) = _shapes(model, case).values()
        dense = time_us(lambda x, w: _dense_linear(x, w["w"], None), 1, k,
                        weight_copies(lambda n=n, k=k: dense_weights({"w": (n, k)}), 2 * n * k))  # fmt: skip
        one = random_weight(n, k, 0.9, 64, torch.bfloat16, generator)
        sets = weight_copies(lambda one=one: {"w": clone_matrix(one)}, one.nbytes)
        times = {}
        for dependent in (0, 1):  # the kernel alone, plainly and as a programmatic dependent launch
            alone = lambda x, w, d=dependent: one_token.spmm_one_token(x, w["w"], dependent=d)
            times[f"PDL {'on' if dependent else 'off'}"] = time_us(alone, 1, k, sets)
        cells = " | ".join(f"{name} {us:5.1f} us {dense / us:5.2f}x" for name, us in times.items())
        print(f"{model}_{case:<5} M=1 s=0.9 b=64  dense {dense:6.1f} us | {cells}", flush=True)
        base = {"shape": f"{model}_{case}", "M": 1, "sparsity": 0.9, "block": 64, "dense_us": dense}
        payload["rows"] += [{**base, "variant": name, "us": us} for name, us in times.items()]
        write_result(out, payload)


if __name__ == "__main__":
    main()
