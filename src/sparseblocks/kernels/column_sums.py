"""Triton kernel for a bias gradient where no kernel produces it on the way: ``Σ_m G[m, :]`` in fp32.

A layer without an activation has no activation-gradient kernel whose tiles could be summed, so its bias gradient
is a reduction of dY over all tokens: few columns (768 for ViT-B's fc2) and tens of thousands of rows.
``torch.sum(dim=0)`` runs this shape at a fraction of the copy bandwidth; here the rows are cut into chunks
reduced in parallel into fp32 partial sums, added in a fixed order afterwards (bitwise reproducible, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparseblocks.kernels.epilogue import multiprocessors
from sparseblocks.kernels.tuning import cdiv

BLOCK_N = 128
BLOCK_M = 64
_MIN_CHUNK = 512  # rows per program at least, so the partial sums stay a small fraction of the traffic


@triton.jit(do_not_specialize=["M", "chunk"])
def _column_sums_kernel(g_ptr, out_ptr, M, N, chunk, stride_m, stride_n, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):  # fmt: skip
    pid_n, split = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_start = split * chunk
    m_end = tl.minimum(m_start + chunk, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # one reduction across rows at the end, not per step
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        ptrs = g_ptr + offs_m[:, None].to(tl.int64) * stride_m + offs_n[None, :] * stride_n
        acc += tl.load(ptrs, mask=(offs_m[:, None] < m_end) & (offs_n[None, :] < N), other=0.0).to(tl.float32)
    tl.store(out_ptr + split.to(tl.int64) * N + offs_n, tl.sum(acc, axis=0), mask=offs_n < N)


def column_sums_triton(g: torch.Tensor, split: int | None = None) -> torch.Tensor:
    """``g`` ``(M, N)`` (any strides, any float dtype) summed over M: fp32 ``(N,)``.

    ``split`` (chunks of M reduced in parallel) defaults to about four programs per multiprocessor.
    """
    m, n = g.shape
    if m == 0:
        return g.new_zeros(n, dtype=torch.float32)
    column_blocks = cdiv(n, BLOCK_N)
    if split is None:
        chunk = max(cdiv(m * column_blocks, 4 * multiprocessors(g.device)), _MIN_CHUNK)
    else:
        chunk = cdiv(m, split)
    chunk = cdiv(chunk, BLOCK_M) * BLOCK_M
    split = cdiv(m, chunk)  # no empty chunks
    partial = torch.empty((split, n), device=g.device, dtype=torch.float32)
    _column_sums_kernel[(column_blocks, split)](g, partial, m, n, chunk, g.stride(0), g.stride(1), BLOCK_M=BLOCK_M,
                                                BLOCK_N=BLOCK_N)  # fmt: skip
    return partial[0] if split == 1 else partial.sum(0)
