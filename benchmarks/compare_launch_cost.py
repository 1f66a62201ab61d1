"""Same-run A/B of what issuing our kernels costs: two source trees through the same CPU-bound workloads.

    git archive <commit> src | tar -x -C /tmp/old
    PYTHONPATH=src python3 benchmarks/compare_launch_cost.py /tmp/old/src src --parts pieces,prefill --out DIR

Each workload runs in a fresh process per tree, old first: the launch pieces (``launch_overhead.py``), Llama-3.2-1B's
eager prefill (``llama_step.py``), the GPT-2-small training step (``bench train --sections train_step``) and
ViT-B/16 eager inference at 1, 32 and 256 images (``bench e2e``); JSON results go to ``DIR/<part>_<tree #>``.
"""

import argparse
import os
import subprocess
import sys

BENCH = [sys.executable, "-m", "sparseblocks.cli", "bench"]
PARTS = {
    "pieces": lambda out: [sys.executable, "benchmarks/launch_overhead.py"],
    "prefill": lambda out: [sys.executable, "benchmarks/llama_step.py", "--model", "llama-3.2-1b"],
    "train_step": lambda out: [*BENCH, "train", "--sections", "train_step", "--models", "gpt2_small", "--out", out],
    "vit_eager": lambda out: [*BENCH, "e2e", "--model", "vit_b_16", "--modes", "eager", "--batches", "1,32,256",
                              "--dtypes", "bf16", "--sparsities", "0.9", "--blocks", "64", "--targets", "mlp",
                              "--impls", "sparseblocks", "--out", out],
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs=2, help="the two src folders (old, new)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    parser.add_argument("--out", default="/tmp/launch_cost")
    args = parser.parse_args()
    for part in args.parts.split(","):
        for number, tree in enumerate(args.trees):
            print(f"===== {part}, tree {number}: {tree}", flush=True)
            out = os.path.join(args.out, f"{part}_{number}")
            env = {**os.environ, "PYTHONPATH": tree}
            subprocess.run(PARTS[part](out), env=env, check=False)


if __name__ == "__main__":
    main()
