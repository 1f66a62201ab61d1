"""Triton forward kernel: ``Y = act(X · Wᵀ + b)`` with W a ``BlockSparseMatrix`` (dense · sparseᵀ -> dense).

One program computes a ``(BLOCK_M, bn)`` tile of Y: one M tile of X against one block row of W, looping over
that row's stored tiles. Programs are numbered block-row-fastest, so the programs on the GPU at one time all
read the same few M tiles of X, which stay in L2; block rows are visited heaviest first (``row_order``), so the
longest programs start in the first wave instead of trailing the last one.

Known limits (2026-11):
* The Triton interpreter multiplies bf16 ``tl.dot`` operands wrongly (triton-lang/triton#11584), so under
  ``TRITON_INTERPRET=1`` bf16 tiles are upcast to fp32 before the dot (exact: bf16 -> fp32 loses nothing).
* ``tl.make_block_ptr`` is avoided (removed in Triton 3.9); loads are plain pointer arithmetic with masks, which
  is also what handles ragged M, N and K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparseblocks.backend import triton_interpreting
from sparseblocks.format import BlockSparseMatrix

ACTIVATION_CODES = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}


@triton.jit
def apply_activation(z, ACTIVATION: tl.constexpr):
    """Epilogue activation on an fp32 tile; codes as in ``ACTIVATION_CODES``."""
    if ACTIVATION == 1:
        z = tl.maximum(z, 0.0)
    elif ACTIVATION == 2:
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == 3:
        # tanh(u) = 2·sigmoid(2u) − 1, written with sigmoid so it needs no libdevice call
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        z = 0.5 * z * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    elif ACTIVATION == 4:
        z = z * tl.sigmoid(z)
    return z


@triton.jit(do_not_specialize=["M", "M_BUCKET", "DENSITY_BUCKET"])
def _spmm_fwd_kernel(
    # pointers
    x_ptr,  # (M, K)
    values_ptr,  # (nnz, BN, BK)
    crow_ptr,  # (N_blocks + 1,) int32
    col_ptr,  # (nnz,) int32
    row_order_ptr,  # (N_blocks,) int32
    bias_ptr,  # (N,) or unused
    y_ptr,  # (M, N)
    # sizes
    M,
    N,
    K,
    n_block_rows,
    # strides
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yn,
    # autotuning keys only (shape bucket, density bucket)
    M_BUCKET,
    DENSITY_BUCKET,
    # meta-parameters
    BN: tl.constexpr,
    BK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BK == 0: no column mask on X, so its loads stay 16 bytes wide
):
    pid = tl.program_id(0)
    pid_m = pid // n_block_rows
    block_row = tl.load(row_order_ptr + pid % n_block_rows)
    start = tl.load(crow_ptr + block_row)
    end = tl.load(crow_ptr + block_row + 1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = block_row * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # (BLOCK_M, 1)
    row_in_range = offs_m[:, None] < M
    # pointers to the row's first stored tile (BN, BK) and its column index; both advance by one tile a step
    w_ptrs = values_ptr + start.to(tl.int64) * (BN * BK) + tl.arange(0, BN)[:, None] * BK + offs_k[None, :]
    col_ptrs = col_ptr + start

    acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
    for _ in range(start, end):
        k_index = tl.load(col_ptrs) * BK + offs_k
        if EVEN_K:
            x_tile = tl.load(x_rows + k_index[None, :] * stride_xk, mask=row_in_range, other=0.0)
        else:
            x_mask = row_in_range & (k_index[None, :] < K)
            x_tile = tl.load(x_rows + k_index[None, :] * stride_xk, mask=x_mask, other=0.0)
        w_tile = tl.load(w_ptrs)
        if DOT_IN_FP32:
            x_tile, w_tile = x_tile.to(tl.float32), w_tile.to(tl.float32)
        acc = tl.dot(x_tile, tl.trans(w_tile), acc, input_precision=INPUT_PRECISION)
        w_ptrs += BN * BK
        col_ptrs += 1

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    acc = apply_activation(acc, ACTIVATION)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_in_range & (offs_n[None, :] < N))


def _prune_configs(configs, named_args, **kwargs):
    """Drop M tiles far larger than M itself (they only multiply padding)."""
    largest_useful = max(64, triton.next_power_of_2(named_args["M"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= largest_useful]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]


TUNING_CONFIGS = [
    triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=stages)
    for block_m, warps, stages in [
        (64, 4, 3),
        (64, 4, 4),
        (128, 4, 2),
        (128, 4, 3),
        (128, 8, 2),
        (256, 4, 3),
        (256, 8, 4),
    ]
]
_spmm_fwd_tuned = triton.autotune(
    configs=TUNING_CONFIGS,
    key=["M_BUCKET", "N", "K", "BN", "BK", "DENSITY_BUCKET", "HAS_BIAS", "ACTIVATION", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_configs},
    cache_results=True,
)(_spmm_fwd_kernel)

# The interpreter runs one fixed, small config: tuning there would only time Python.
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "num_warps": 4, "num_stages": 1}


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision for fp32 inputs follows ``torch.backends.cuda.matmul.allow_tf32``, as dense does."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def spmm_triton(
    x: torch.Tensor,
    w: BlockSparseMatrix,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Launch the forward kernel: x ``(..., K)`` -> ``(..., N)``; inputs are checked by ``ops.spmm``.

    ``config`` (``BLOCK_M``, ``num_warps``, ``num_stages``) skips the autotuner: for tuning scripts.
    """
    (n, k), (bn, bk), (n_block_rows, _) = w.shape, w.block_shape, w.block_grid
    x2 = x.reshape(-1, k)  # a view whenever the strides allow; the kernel takes any strides
    m = x2.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    args = (
        x2,
        w.values,
        w.crow_indices,
        w.col_indices,
        w.row_order,
        bias if bias is not None else y,  # never read without HAS_BIAS
        y,
        m,
        n,
        k,
        n_block_rows,
        x2.stride(0),
        x2.stride(1),
        y.stride(0),
        y.stride(1),
        min(triton.next_power_of_2(m), 1 << 16),
        round(w.density * 20),
    )
    meta = {
        "BN": bn,
        "BK": bk,
        "HAS_BIAS": bias is not None,
        "ACTIVATION": ACTIVATION_CODES[activation],
        "INPUT_PRECISION": input_precision(x.dtype),
        "DOT_IN_FP32": triton_interpreting() and x.dtype == torch.bfloat16,
        "EVEN_K": k % bk == 0,
    }
    if config is None and triton_interpreting():
        config = _INTERPRETER_CONFIG
    if config is None:
        grid = lambda chosen: (triton.cdiv(m, chosen["BLOCK_M"]) * n_block_rows,)
        _spmm_fwd_tuned[grid](*args, **meta)
    else:
        grid = (triton.cdiv(m, config["BLOCK_M"]) * n_block_rows,)
        _spmm_fwd_kernel[grid](*args, **meta, **config)
    return y.reshape(*x.shape[:-1], n)
