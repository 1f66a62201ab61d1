"""Triton kernel for a whole block-sparse MLP in one launch, the hidden activation never written to memory.

    plain:  Y = act(X·W1ᵀ + b1)·W2ᵀ + b2                       (GELU MLP: ViT, BERT, GPT)
    gated:  Y = (act(X·Wgᵀ + bg) ⊙ (X·W1ᵀ + b1))·W2ᵀ + b2      (SwiGLU: act = silu, W1 the up projection)

One program per (M tile, block row n of W2). For every stored tile (n, h) of W2 it computes hidden tile h (X
times block row h of W1, and of Wg, then the activation) and multiplies it into its output tile straight away.
A hidden tile is recomputed for each W2 block row that stores a tile in its column, so the first product costs
(W2 block rows × W2 density) times the unfused one: 1.2x for a ViT-B MLP at 90% with blocks of 64, but 6x at 50%.
The fused kernel is for high sparsity; in exchange the 4x-wide hidden tensor never goes through memory.

W1's (and Wg's) block rows and W2's block columns must have the same width (the hidden tile).
Quantized tiles (int8 / fp8 with scales per tile row; ``QUANTIZED_UP`` for W1 and Wg, ``QUANTIZED_DOWN`` for W2) go
into the dots in x's dtype, each tile's fp32 product scaled by its row scales: weight-only, W8A16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparseblocks.format import MLPWeights
from sparseblocks.kernels import prepared
from sparseblocks.kernels.epilogue import (
    ACTIVATION_CODES,
    accumulate_tile,
    add_bias,
    apply_activation,
    dot_in_fp32,
    gated_product,
    input_precision,
    launch_config,
    load_x_columns,
)
from sparseblocks.kernels.tuning import TunedKernel, cdiv, m_tile_grid


@triton.jit
def _project_rows(x_rows, row_in_range, offs_k, K, stride_xk, values_ptr, crow_ptr, col_ptr, h,
                  BH: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                  DOT_IN_FP32: tl.constexpr, EVEN_K: tl.constexpr, scales_ptr, QUANTIZED: tl.constexpr):  # fmt: skip
    """X (BLOCK_M rows) times block row ``h`` of a ``(H, K)`` block-sparse weight: an fp32 ``(BLOCK_M, BH)`` tile."""
    start = tl.load(crow_ptr + h)
    end = tl.load(crow_ptr + h + 1)
    w_ptrs = values_ptr + start.to(tl.int64) * (BH * BK) + tl.arange(0, BH)[:, None] * BK + tl.arange(0, BK)[None, :]
    acc = tl.zeros((BLOCK_M, BH), dtype=tl.float32)
    col = tl.load(col_ptr + start, mask=start < end, other=0)  # one tile ahead: see kernels/spmm.py
    for t in range(start, end):
        next_col = tl.load(col_ptr + t + 1, mask=t + 1 < end, other=0)
        x_tile = load_x_columns(x_rows, row_in_range, col * BK + offs_k, K, stride_xk, EVEN_K)
        w_tile = tl.load(w_ptrs)
        acc = accumulate_tile(acc, x_tile, w_tile, scales_ptr, t, BH, QUANTIZED, DOT_IN_FP32, INPUT_PRECISION)
        w_ptrs += BH * BK
        col = next_col
    return acc


@triton.jit(do_not_specialize=["M"])
def _fused_mlp_kernel(
    x_ptr,  # (M, K)
    w1_ptr,
    w1_crow_ptr,
    w1_col_ptr,
    b1_ptr,  # (H, K): up (gated) or the first linear  # fmt: skip
    wg_ptr,
    wg_crow_ptr,
    wg_col_ptr,
    bg_ptr,  # (H, K): gate, read when GATED  # fmt: skip
    w2_ptr,
    w2_crow_ptr,
    w2_col_ptr,
    w2_order_ptr,
    b2_ptr,  # (N, H)  # fmt: skip
    w1_scales_ptr,
    wg_scales_ptr,
    w2_scales_ptr,  # QUANTIZED_UP / QUANTIZED_DOWN: (nnz, BH) and (nnz2, BN) float32 scales  # fmt: skip
    y_ptr,  # (M, N)
    M,
    K,
    H,
    N,
    n_out_blocks,  # fmt: skip
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yn,  # fmt: skip
    BK: tl.constexpr,
    BH: tl.constexpr,
    BN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GATED: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_BG: tl.constexpr,
    HAS_B2: tl.constexpr,
    ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    EVEN_K: tl.constexpr,
    QUANTIZED_UP: tl.constexpr,
    QUANTIZED_DOWN: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid // n_out_blocks
    n = tl.load(w2_order_ptr + pid % n_out_blocks)  # heaviest W2 block rows first
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BK)
    offs_bh = tl.arange(0, BH)
    offs_n = n * BN + tl.arange(0, BN)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    row_in_range = offs_m[:, None] < M
    w2_tile_offsets = tl.arange(0, BN)[:, None] * BH + offs_bh[None, :]

    acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
    for j in range(tl.load(w2_crow_ptr + n), tl.load(w2_crow_ptr + n + 1)):
        h = tl.load(w2_col_ptr + j)
        offs_h = h * BH + offs_bh
        hidden = _project_rows(x_rows, row_in_range, offs_k, K, stride_xk, w1_ptr, w1_crow_ptr, w1_col_ptr, h, BH,
                               BK, BLOCK_M, INPUT_PRECISION, DOT_IN_FP32, EVEN_K, w1_scales_ptr,
                               QUANTIZED_UP)  # fmt: skip
        if HAS_B1:
            hidden = add_bias(hidden, b1_ptr, offs_h, H)
        if GATED:
            gate = _project_rows(x_rows, row_in_range, offs_k, K, stride_xk, wg_ptr, wg_crow_ptr, wg_col_ptr, h,
                                 BH, BK, BLOCK_M, INPUT_PRECISION, DOT_IN_FP32, EVEN_K, wg_scales_ptr,
                                 QUANTIZED_UP)  # fmt: skip
            if HAS_BG:
                gate = add_bias(gate, bg_ptr, offs_h, H)
            hidden = gated_product(gate, hidden, ACTIVATION, y_ptr.dtype.element_ty)
        else:
            hidden = apply_activation(hidden, ACTIVATION)
        # hidden units past H (the padding of a ragged hidden size) must not leak into the output
        hidden = tl.where(offs_h[None, :] < H, hidden, 0.0).to(y_ptr.dtype.element_ty)
        w2_tile = tl.load(w2_ptr + tl.cast(j, tl.int64) * (BN * BH) + w2_tile_offsets)
        acc = accumulate_tile(acc, hidden, w2_tile, w2_scales_ptr, j, BN, QUANTIZED_DOWN, DOT_IN_FP32, INPUT_PRECISION)

    if HAS_B2:
        acc = add_bias(acc, b2_ptr, offs_n, N)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_in_range & (offs_n[None, :] < N))


fused_mlp_tuned = TunedKernel(
    _fused_mlp_kernel,
    [triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=stages)
     for block_m, warps, stages in [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3)]],
    key=["K", "H", "N", "BK", "BH", "BN", "GATED", "ACTIVATION", "INPUT_PRECISION", "QUANTIZED_UP", "QUANTIZED_DOWN"],
    cache_results=True,
)  # fmt: skip


def fused_mlp_triton(
    x2: torch.Tensor, weights: MLPWeights, activation: str = "gelu", config: dict | None = None
) -> torch.Tensor:
    """The MLP of the module docstring on a 2-D ``x2`` ``(M, K)``: ``(M, N)`` of x2's dtype; inputs are checked
    by ``ops.sparse_mlp``.

    ``activation`` applies to the up projection (plain) or to the gate (gated). ``config`` (``BLOCK_M``,
    ``num_warps``, ``num_stages``) skips the autotuner.
    """
    up, down, gate, up_bias, down_bias, gate_bias = weights
    (hidden, k), (n, _) = up.shape, down.shape
    m = x2.shape[0]
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    if m == 0:
        return y
    up_bias, down_bias, gate_bias = (None if b is None else b.contiguous() for b in (up_bias, down_bias, gate_bias))
    if gate is not None and (gate.scales is None) != (up.scales is None):
        raise ValueError("gate and up must both be quantized or both not")
    scales = [y if w is None or w.scales is None else w.scales for w in (up, gate, down)]  # y: never read
    gate_parts = (gate.values, gate.crow_indices, gate.col_indices) if gate is not None else (up.values,) * 3
    args = (
        x2, up.values, up.crow_indices, up.col_indices, up_bias if up_bias is not None else y,
        *gate_parts, gate_bias if gate_bias is not None else y,
        down.values, down.crow_indices, down.col_indices, down.row_order, down_bias if down_bias is not None else y,
        *scales, y, m, k, hidden, n, down.block_grid[0],
        x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
    )  # fmt: skip
    meta = {
        "BK": up.block_shape[1],
        "BH": up.block_shape[0],
        "BN": down.block_shape[0],
        "GATED": gate is not None,
        "HAS_B1": up_bias is not None,
        "HAS_BG": gate_bias is not None,
        "HAS_B2": down_bias is not None,
        "ACTIVATION": ACTIVATION_CODES[activation],
        "INPUT_PRECISION": input_precision(x2.dtype),
        "DOT_IN_FP32": dot_in_fp32(x2.dtype),
        "EVEN_K": k % up.block_shape[1] == 0,
        "QUANTIZED_UP": up.scales is not None,
        "QUANTIZED_DOWN": down.scales is not None,
    }
    config = launch_config(config)
    prepared.allocated(y)
    if config is None:
        fused_mlp_tuned.launch((x2.dtype, k, hidden, n), m_tile_grid(m, down.block_grid[0]), args, meta)
    else:
        grid, kwargs = (cdiv(m, config["BLOCK_M"]) * down.block_grid[0],), {**meta, **config}
        prepared.launch(_fused_mlp_kernel, grid, args, kwargs)
    return y
