"""Whether compute-sanitizer's initcheck counts a TMA (tensor-descriptor) store as a write: the row kernel writes
``y = x · wᵀ`` into ``torch.empty`` by descriptor or by pointer, then torch reads ``y``.

    compute-sanitizer --tool initcheck python benchmarks/diagnose/initcheck_tma.py descriptors   # reports reads
    compute-sanitizer --tool initcheck python benchmarks/diagnose/initcheck_tma.py pointers      # 0 errors
"""

import argparse

import torch

from sparseblocks import BlockSparseMatrix
from sparseblocks.kernels.spmm import spmm_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("loads", choices=["descriptors", "pointers"])
    descriptors = parser.parse_args().loads == "descriptors"
    w = BlockSparseMatrix.from_dense(torch.randn(256, 160, dtype=torch.bfloat16), 32).to("cuda")
    x = torch.randn(100, 160, device="cuda", dtype=torch.bfloat16)
    y = spmm_rows(x, w, descriptors=descriptors, config={"BLOCK_M": 64, "num_warps": 4, "num_stages": 2})
    print(descriptors, float(y.float().sum()))


if __name__ == "__main__":
    main()
