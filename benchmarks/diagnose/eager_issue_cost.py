"""CPU cost of issuing one eager inference call (GPU only): ``F.linear`` against ``spmm`` with prepared launches off
and on, at 1 and 128 tokens of GPT-2 small's MLP up projection (768 -> 3072, 90% sparse, blocks of 64, bf16), and a
one-token SwiGLU ``sparse_mlp`` at Llama-1B's shape (2048 -> 8192 -> 2048) against dense.

    PYTHONPATH=src python3 benchmarks/diagnose/eager_issue_cost.py [--calls N] [--out FILE.json]

Each figure is this process's CPU time per call (``time.process_time``) over ``--calls`` calls, the least of five
rounds, with a synchronize every 100 calls counted in (the GPU work of these calls is a few µs, so the queue stays
short and the CPU time is the cost of issuing). Outputs with prepared launches on are checked equal to those with
them off. Rows go to a result (``--out``, default ``benchmarks/results/<gpu>/eager_issue_cost.json``).
"""

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparseblocks.backend import prepared_launches
from sparseblocks.bench.harness import start_run
from sparseblocks.bench.results import write_result
from sparseblocks.bench.spmm import random_weight
from sparseblocks.ops import sparse_mlp, spmm

SYNC_EVERY = 100


def cpu_us(call, calls: int) -> float:
    """The least over five rounds of the CPU time per call of ``calls`` calls (a synchronize every
    ``SYNC_EVERY`` calls included), after a warm-up."""
    for _ in range(SYNC_EVERY):
        call()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        start = time.process_time()
        for i in range(calls):
            call()
            if i % SYNC_EVERY == SYNC_EVERY - 1:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        rounds.append((time.process_time() - start) / calls * 1e6)
    return min(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out", type=Path, help="result file (default benchmarks/results/<gpu>/eager_issue_cost.json)")
    args = parser.parse_args()
    # no result kind of its own yet: filed with the whole-model eager rows ("e2e"), "what" says which
    payload, folder = start_run("e2e", "PYTHONPATH=src python3 " + shlex.join(sys.argv), None)
    payload["what"] = "eager_issue_cost: CPU µs to issue one eager inference call"
    out = args.out or folder / "eager_issue_cost.json"
    generator, bf16 = torch.Generator().manual_seed(0), torch.bfloat16
    print(payload["env"]["gpu"], "- CPU µs per eager call (process time, sync every 100 calls included)")

    up = random_weight(3072, 768, 0.9, 64, bf16, generator)
    dense_up, bias = up.to_dense(), torch.randn(3072, device="cuda", dtype=bf16)
    llama = {name: random_weight(n, k, 0.9, 64, bf16, generator)
             for name, (n, k) in {"up": (8192, 2048), "gate": (8192, 2048), "down": (2048, 8192)}.items()}  # fmt: skip
    dense_llama = {name: w.to_dense() for name, w in llama.items()}
    swiglu = lambda x: sparse_mlp(x, llama["up"], llama["down"], llama["gate"], activation="silu")
    dense_swiglu = lambda x: F.linear(F.silu(F.linear(x, dense_llama["gate"])) * F.linear(x, dense_llama["up"]),
                                      dense_llama["down"])  # fmt: skip
    cases = []
    for m in (1, 128):
        x = torch.randn(m, 768, device="cuda", dtype=bf16)
        shape = {"op": "linear 768->3072", "tokens": m}
        cases.append(({**shape, "impl": "F.linear"}, lambda x=x: F.linear(x, dense_up, bias), None))
        cases.append(({**shape, "impl": "spmm"}, lambda x=x: spmm(x, up, bias), True))
    x = torch.randn(1, 2048, device="cuda", dtype=bf16)
    shape = {"op": "SwiGLU MLP 2048/8192", "tokens": 1}
    cases.append(({**shape, "impl": "dense"}, lambda: dense_swiglu(x), None))
    cases.append(({**shape, "impl": "sparse_mlp"}, lambda: swiglu(x), True))

    print(f"{'op':<22} {'tokens':>6} {'impl':<12} {'prepared off':>13} {'prepared on':>12}")
    with torch.inference_mode():
        for row, call, sparse in cases:
            if sparse:
                with prepared_launches(False):
                    off, reference = cpu_us(call, args.calls), call()
                with prepared_launches(True):
                    on, replayed = cpu_us(call, args.calls), call()
                if not torch.equal(reference, replayed):
                    raise AssertionError(f"{row}: a replayed call differs from the full path")
                payload["rows"].append({**row, "prepared": False, "cpu_us": round(off, 2)})
                payload["rows"].append({**row, "prepared": True, "cpu_us": round(on, 2)})
                print(f"{row['op']:<22} {row['tokens']:>6} {row['impl']:<12} {off:10.1f} µs {on:9.1f} µs")
            else:
                dense_us = cpu_us(call, args.calls)
                payload["rows"].append({**row, "cpu_us": round(dense_us, 2)})
                print(f"{row['op']:<22} {row['tokens']:>6} {row['impl']:<12} {dense_us:10.1f} µs")
    print("wrote", write_result(out, payload))


if __name__ == "__main__":
    main()
