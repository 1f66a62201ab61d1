"""Triton kernel for the weight gradient on W's pattern: ``dW = dYᵀ · X``, one ``(bn, bk)`` tile per stored tile.

Each tile is a long reduction over all M tokens but only ``bn·bk`` outputs, so there are too few tiles to fill the
GPU when M is large and the pattern sparse. The M axis is split into ``split`` chunks: program ``(chunk, tile)``
reduces its chunk in fp32 into its own slot of a ``(split, nnz, bn, bk)`` buffer, and the chunks are summed in a
fixed order afterwards. No atomics: the result is bitwise reproducible run to run, so it already satisfies
``torch.use_deterministic_algorithms(True)``.

Programs are numbered tile-fastest: the programs in flight together reduce the same chunk of M, whose rows of X and
dY stay in L2 while every tile that needs them passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparseblocks.format import BlockSparseMatrix
from sparseblocks.kernels.epilogue import accumulate_dot, dot_in_fp32, input_precision, launch_config, multiprocessors
from sparseblocks.kernels.tuning import TunedKernel, cdiv, m_bucket

# Chunks of M are multiples of this, so that every BLOCK_M in the tuning set divides them.
_CHUNK_QUANTUM = 256


@triton.jit(do_not_specialize=["M", "chunk", "M_BUCKET"])
def _sddmm_kernel(
    grad_ptr,  # (M, N): dY
    x_ptr,  # (M, K)
    row_of_block_ptr,  # (nnz,) int32
    col_ptr,  # (nnz,) int32
    out_ptr,  # (split, nnz, BN, BK)
    M,
    N,
    K,
    nnz,
    chunk,  # rows of M per split, a multiple of BLOCK_M
    stride_gm,
    stride_gn,
    stride_xm,
    stride_xk,
    M_BUCKET,  # autotuning key only
    BN: tl.constexpr,
    BK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    EVEN_N: tl.constexpr,  # N % BN == 0 and K % BK == 0: no column masks, which would stop the loads being
    EVEN_K: tl.constexpr,  # vectorised and software-pipelined
):
    pid = tl.program_id(0)
    tile = pid % nnz
    split = pid // nnz
    offs_n = tl.load(row_of_block_ptr + tile) * BN + tl.arange(0, BN)
    offs_k = tl.load(col_ptr + tile) * BK + tl.arange(0, BK)
    m_start = split * chunk
    m_end = tl.minimum(m_start + chunk, M)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    # (BLOCK_M, BN) and (BLOCK_M, BK) tiles; both pointer sets advance by BLOCK_M rows a step
    grad_ptrs = grad_ptr + offs_m[:, None].to(tl.int64) * stride_gm + offs_n[None, :] * stride_gn
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk

    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_in_range = rows[:, None] < m_end
        grad_mask = row_in_range if EVEN_N else row_in_range & (offs_n[None, :] < N)
        x_mask = row_in_range if EVEN_K else row_in_range & (offs_k[None, :] < K)
        grad_tile = tl.load(grad_ptrs, mask=grad_mask, other=0.0)
        x_tile = tl.load(x_ptrs, mask=x_mask, other=0.0)
        acc = accumulate_dot(acc, tl.trans(grad_tile), x_tile, DOT_IN_FP32, INPUT_PRECISION)
        grad_ptrs += BLOCK_M * stride_gm
        x_ptrs += BLOCK_M * stride_xm

    out_ptrs = out_ptr + (split.to(tl.int64) * nnz + tile) * (BN * BK) + tl.arange(0, BN)[:, None] * BK
    tl.store(out_ptrs + tl.arange(0, BK)[None, :], acc.to(out_ptr.dtype.element_ty))


sddmm_tuned = TunedKernel(
    _sddmm_kernel,
    [triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=stages)
     for block_m, warps, stages in [(32, 4, 3), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (128, 8, 4)]],
    key=["M_BUCKET", "N", "K", "nnz", "BN", "BK", "INPUT_PRECISION"],
    cache_results=True,
)  # fmt: skip


def default_split(m: int, nnz: int, device: torch.device) -> int:
    """Chunks of M to reduce in parallel: enough programs for about four per multiprocessor, no chunk under 256 rows."""
    wanted = cdiv(4 * multiprocessors(device), max(nnz, 1))
    return max(1, min(wanted, cdiv(m, _CHUNK_QUANTUM)))


def sddmm_triton(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    w: BlockSparseMatrix,
    split: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """The tiles of ``dYᵀ · X`` on w's pattern: grad_out ``(..., N)``, x ``(..., K)`` -> ``(nnz, bn, bk)``.

    Accumulates in fp32 and returns w's dtype; ragged-edge padding comes out zero. ``split`` (chunks of M reduced
    in parallel) defaults to :func:`default_split`; ``config`` skips the autotuner.
    """
    (n, k), (bn, bk) = w.shape, w.block_shape
    grad2, x2 = grad_out.reshape(-1, n), x.reshape(-1, k)
    m, nnz = x2.shape[0], w.nnz
    if m == 0 or nnz == 0:
        return torch.zeros_like(w.values)
    split = split or default_split(m, nnz, x.device)
    chunk = cdiv(cdiv(m, split), _CHUNK_QUANTUM) * _CHUNK_QUANTUM
    split = cdiv(m, chunk)  # no empty chunks
    # One chunk writes the result directly; several write fp32 partial sums, added in order below.
    out_dtype = w.dtype if split == 1 else torch.float32
    out = torch.empty((split, nnz, bn, bk), device=x.device, dtype=out_dtype)
    args = (
        grad2,
        x2,
        w.row_indices_of_block,
        w.col_indices,
        out,
        m,
        n,
        k,
        nnz,
        chunk,
        grad2.stride(0),
        grad2.stride(1),
        x2.stride(0),
        x2.stride(1),
        m_bucket(m),
    )
    meta = {
        "BN": bn,
        "BK": bk,
        "INPUT_PRECISION": input_precision(x.dtype),
        "DOT_IN_FP32": dot_in_fp32(x.dtype),
        "EVEN_N": n % bn == 0,
        "EVEN_K": k % bk == 0,
    }
    config = launch_config(config)
    grid = (split * nnz,)
    if config is None:
        sddmm_tuned.launch((x2.dtype, grad2.dtype, n, k, nnz, m_bucket(m)), grid, args, meta)
    else:
        _sddmm_kernel[grid](*args, **meta, **config)
    return out[0] if split == 1 else out.sum(0).to(w.dtype)
