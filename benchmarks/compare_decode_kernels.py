"""Same-run A/B of two versions of the decode kernel at 1, 4 and 16 tokens (CUDA graphs, weights rotated past the L2).

git show <commit>:src/sparseblocks/kernels/decode.py > /tmp/old_decode.py
PYTHONPATH=src python3 benchmarks/compare_decode_kernels.py /tmp/old_decode.py
"""

import argparse
import importlib.util
import itertools

import torch
import torch.nn.functional as F

from sparseblocks.bench.decode import MODELS, _shapes, clone_matrix, dense_weights, time_us, weight_copies
from sparseblocks.bench.spmm import random_weight
from sparseblocks.kernels import decode as current


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="path of the other kernels/decode.py")
    spec = importlib.util.spec_from_file_location("old_decode", parser.parse_args().old)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    generator = torch.Generator().manual_seed(0)
    print(torch.cuda.get_device_name())
    for model, case in itertools.product(MODELS, ("up", "down")):
        ((n, k),) = _shapes(model, case).values()
        dense_sets = weight_copies(lambda n=n, k=k: dense_weights({"w": (n, k)}), 2 * n * k)
        for m in (1, 4, 16):
            dense = time_us(lambda x, w: F.linear(x, w["w"]), m, k, dense_sets)
            # 50% at every block: where #5's "never slower than dense" is still missed
            for sparsity, block in [(0.5, 32), (0.5, 64), (0.5, 128), (0.9, 32), (0.9, 64), (0.95, 64)]:
                one = random_weight(n, k, sparsity, block, torch.bfloat16, generator)
                sets = weight_copies(lambda one=one: {"w": clone_matrix(one)}, one.nbytes)
                times = [time_us(lambda x, w, kernel=kernel: kernel.spmm_decode_triton(x, w["w"]), m, k, sets)
                         for kernel in (old, current)]  # fmt: skip
                old_us, new_us = times
                print(f"{model}_{case:<5} M={m} s={sparsity} b={block:<3} dense {dense:6.1f} us | "
                      f"old {old_us:6.1f} us {dense / old_us:5.2f}x | new {new_us:6.1f} us {dense / new_us:5.2f}x",
                      flush=True)  # fmt: skip
    for key, config in current.decode_tuned.autotuner.cache.items():  # what the few-token kernel's autotuner picked
        print(f"{key[:5]}: {config}")


if __name__ == "__main__":
    main()
