"""Time the forward kernels under each launch config on a few telling cases (GPU only).

    PYTHONPATH=src python3 benchmarks/tune/spmm.py [--kernels rows,tma] [--dtype fp32 --fp32-precision tf32x3]
        [--out FILE.json]

Prints, per case, dense cuBLAS time and each kernel's best configs as speedups over it (same run), so the
autotuner's config sets and the choice between kernels come from measurements. ``rows``: the pointer-load row
kernel (``kernels/spmm.py``); ``tma``: the same work split with tensor descriptors (``kernels/spmm_tma.py``,
what ``spmm`` runs for large products where the inputs allow: ``dispatch.row_loads``). Dense is cuBLAS in the
same dtype (fp32: IEEE, TF32 off). Every config's time goes to a ``tune_spmm`` result (``--out``, default
``benchmarks/results/<gpu>/tune_spmm.json``). Notes of what was learnt go to benchmarks/notes/.
"""

import argparse
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from sparseblocks.backend import FP32_PRECISIONS, fp32_precision
from sparseblocks.bench.harness import input_sets, start_run, time_ms
from sparseblocks.bench.results import write_result
from sparseblocks.bench.spmm import DTYPES, SHAPES, Case, sparse_weight
from sparseblocks.dispatch import descriptors_fit
from sparseblocks.kernels.spmm import spmm_rows, spmm_tuned
from sparseblocks.kernels.spmm_tma import spmm_tma_tuned

CASES = [("llama_1b_up", 0.9, 64), ("llama_1b_down", 0.9, 64), ("vit_b_fc1", 0.9, 64), ("vit_b_fc2", 0.9, 64),
         ("vit_b_fc1", 0.9, 32), ("llama_1b_up", 0.9, 128), ("llama_1b_up", 0.5, 64), ("vit_b_fc2", 0.9, 16),
         ("llama_1b_up", 0.9, 16)]  # fmt: skip


def _launch_configs(kernel) -> list[tuple[int, int, int]]:
    """A tuned kernel's configs as (BLOCK_M, num_warps, num_stages): the set its autotuner picks from."""
    return [(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in kernel.configs]


KERNELS = {
    "rows": (lambda x, w, config: spmm_rows(x, w, descriptors=False, config=config), _launch_configs(spmm_tuned)),
    "tma": (lambda x, w, config: spmm_rows(x, w, descriptors=True, config=config), _launch_configs(spmm_tma_tuned)),
}


def tune_case(shape: str, sparsity: float, block: int, kernels: list[str], dtype_name: str, out: list[dict]) -> None:
    """Time every config of ``kernels`` on one case; a row per config (or its error) into ``out``."""
    m, k, n = SHAPES[shape]
    dtype = DTYPES[dtype_name]
    w = sparse_weight(Case(shape, m, k, n, dtype_name, sparsity, block), dtype)
    xs = input_sets(lambda: torch.randn(m, k, device="cuda", dtype=dtype), m * k * dtype.itemsize)
    dense = w.to_dense()
    dense_ms, _ = time_ms(lambda x: F.linear(x, dense), xs)
    reference = F.linear(xs[0], dense).float()
    print(f"{shape} s={sparsity} b={block}: dense {dense_ms * 1e3:.0f} us", flush=True)
    base = {"shape": shape, "sparsity": sparsity, "block": block, "dtype": dtype_name, "dense_ms": dense_ms}
    if "tma" in kernels and not descriptors_fit(xs[0], w, "forward"):  # the descriptor kernel would refuse them
        print("  tma: the descriptor kernel does not take these inputs (IEEE fp32?); skipped")
        kernels = [name for name in kernels if name != "tma"]
    for name in kernels:
        kernel, configs = KERNELS[name]
        results = []
        for block_m, warps, stages in configs:
            config = {"BLOCK_M": block_m, "num_warps": warps, "num_stages": stages}
            try:
                error = (kernel(xs[0], w, config).float() - reference).abs().max().item()
                ms, _ = time_ms(lambda x, config=config, kernel=kernel: kernel(x, w, config), xs)
            except Exception as failure:  # e.g. out of shared memory
                print(f"  {name} {config}: {type(failure).__name__}: {str(failure)[:120]}")
                out.append({**base, "kernel": name, **config, "ms": None,
                            "error": f"{type(failure).__name__}: {str(failure)[:200]}"})  # fmt: skip
                continue
            out.append({**base, "kernel": name, **config, "ms": ms, "max_error": error})
            results.append((ms, f"M{block_m}/w{warps}/s{stages}", error))
        if not results:
            continue
        results.sort()
        best = ", ".join(f"{label} {dense_ms / ms:.2f}x" for ms, label, _ in results[:4])
        print(f"  {name:>4}: best {best} | worst {dense_ms / results[-1][0]:.2f}x | "
              f"max error {max(r[2] for r in results):.3g}", flush=True)  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default="rows,tma")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--fp32-precision", choices=FP32_PRECISIONS, default="ieee", help="our kernels' fp32 products")
    parser.add_argument("--cases", type=int, default=len(CASES), help="the first N cases only")
    parser.add_argument("--out", type=Path, help="result file (default benchmarks/results/<gpu>/tune_spmm.json)")
    args = parser.parse_args()
    payload, folder = start_run("tune_spmm", "PYTHONPATH=src python3 " + shlex.join(sys.argv), None)
    payload["fp32_precision"] = args.fp32_precision
    torch.backends.cuda.matmul.allow_tf32 = False
    print(torch.cuda.get_device_name(), args.dtype, args.fp32_precision)
    with fp32_precision(args.fp32_precision):
        for case in CASES[: args.cases]:
            tune_case(*case, args.kernels.split(","), args.dtype, payload["rows"])
            write_result(args.out or folder / "tune_spmm.json", payload)
