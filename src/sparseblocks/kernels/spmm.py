"""Triton kernel for ``Y = act(X · Wᵀ + b)`` and, through W's transposed index, for ``dX = dY · W``.

Forward: one program computes a ``(BLOCK_M, bn)`` tile of Y: one M tile of X against one block row of W,
looping over that row's stored tiles. Programs are numbered block-row-fastest, so the programs on the GPU at one
time all read the same few M tiles of X, which stay in L2; block rows are visited heaviest first (``row_order``),
so the longest programs start in the first wave instead of trailing the last one.

Input gradient (``TRANSPOSED``): the same loop over one block *column* of W (``ccol_indices``, ``row_indices``),
reading the tiles in place through ``transpose_perm`` and multiplying them untransposed: a ``(BLOCK_M, bk)``
tile of dX per program, columns heaviest first (``col_order``). No transposed copy of W exists.

Quantized tiles (``QUANTIZED``, forward and gated only): int8 or fp8 tiles go into the dot in x's dtype and each
tile's fp32 product is scaled by its row scales (``epilogue.accumulate_tile``); with ``X_FP8`` (W8A8) x is the
activations quantized to fp8 per token, the products are fp8 × fp8, and the finished tile is scaled by each row's
activation scale before the epilogue.

Gated (``GATED``, forward only): a SwiGLU MLP's hidden activation ``act(X·Wgᵀ + bg) ⊙ (X·Wᵀ + b)``, W the up
projection: each program also walks the gate's block row (its own index: gate and up may store different tiles)
into a second fp32 accumulator, so neither product is written to memory and read back (:func:`gated_rows`).

The same loop also runs with tensor descriptors (``kernels/spmm_tma.py``, 1.1-1.2x faster on an H200);
:func:`launch_rows` runs either version of one :class:`~sparseblocks.kernels.row_launch.RowLaunch`, as the caller
says (``sparseblocks.dispatch`` decides which, and when a few tokens take the decode kernels instead).

Known limits (2026-11):
* The Triton interpreter multiplies bf16 ``tl.dot`` operands wrongly (triton-lang/triton#11584), so under
  ``TRITON_INTERPRET=1`` bf16 tiles are upcast to fp32 before the dot (exact: bf16 -> fp32 loses nothing).
* The interpreter (Triton 3.6) casts fp32 to bf16 by truncation, not to nearest as the GPU and torch do: there a
  bf16 gated product differs from torch's product of the two rounded halves by an ulp (2026-12).
* ``tl.make_block_ptr`` is avoided (removed in Triton 3.9); loads are plain pointer arithmetic with masks, which
  is also what handles ragged M, N and K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparseblocks.format import BlockSparseMatrix, quantize_rows
from sparseblocks.kernels import prepared
from sparseblocks.kernels.epilogue import (
    accumulate_dot,
    accumulate_tile,
    activation_grad,
    add_bias,
    apply_activation,
    gated_product,
    launch_config,
    load_x_columns,
    store_column_sums,
)
from sparseblocks.kernels.row_launch import RowLaunch, RowMode, row_arguments
from sparseblocks.kernels.spmm_tma import launch_tma, spmm_tma_tuned
from sparseblocks.kernels.tuning import autotune_row_kernel, cdiv, density_bucket, m_bucket, m_tile_grid


@triton.jit
def _block_row_product(x_rows, row_in_range, IN, stride_xk, values_ptr, idx_ptr, perm_ptr, start, end,
                       BN: tl.constexpr, BK: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK_M: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, EVEN_IN: tl.constexpr,
                       scales_ptr, QUANTIZED: tl.constexpr):  # fmt: skip
    """The rows ``x_rows`` ``(BLOCK_M, 1)`` of X times the stored tiles ``start:end`` of one block row of W (one
    block column when ``TRANSPOSED``): an fp32 ``(BLOCK_M, OUT_B)`` tile, zero for an empty row."""
    OUT_B: tl.constexpr = BK if TRANSPOSED else BN
    IN_B: tl.constexpr = BN if TRANSPOSED else BK
    offs_in = tl.arange(0, IN_B)
    tile_offsets = tl.arange(0, BN)[:, None] * BK + tl.arange(0, BK)[None, :]
    # The forward walks the row's tiles in storage order (a pointer bump a step); the transpose follows the
    # permutation into the same values. Indices are loaded one tile ahead (see ``kernels/few_tokens.py``): with the
    # index of a gather loaded in the same iteration, Triton 3.6 pipelines X and W one buffer deep.
    w_ptrs = values_ptr + start.to(tl.int64) * (BN * BK) + tile_offsets
    in_block = tl.load(idx_ptr + start, mask=start < end, other=0)
    tile = tl.load(perm_ptr + start, mask=start < end, other=0) if TRANSPOSED else start
    acc = tl.zeros((BLOCK_M, OUT_B), dtype=tl.float32)
    for j in range(start, end):
        has_next = j + 1 < end
        next_in_block = tl.load(idx_ptr + j + 1, mask=has_next, other=0)
        x_tile = load_x_columns(x_rows, row_in_range, in_block * IN_B + offs_in, IN, stride_xk, EVEN_IN)
        if TRANSPOSED:
            next_tile = tl.load(perm_ptr + j + 1, mask=has_next, other=0)
            w_tile = tl.load(values_ptr + tile.to(tl.int64) * (BN * BK) + tile_offsets)
            tile = next_tile
            acc = accumulate_dot(acc, x_tile, w_tile, DOT_IN_FP32, INPUT_PRECISION)
        else:
            w_tile = tl.load(w_ptrs)
            w_ptrs += BN * BK
            acc = accumulate_tile(acc, x_tile, w_tile, scales_ptr, j, BN, QUANTIZED, DOT_IN_FP32, INPUT_PRECISION)
        in_block = next_in_block
    return acc


@triton.jit(do_not_specialize=["M", "M_BUCKET", "DENSITY_BUCKET"])
def _spmm_kernel(
    # pointers
    x_ptr,  # (M, IN): X for the forward, dY for the input gradient
    values_ptr,  # (nnz, BN, BK)
    ptr_ptr,  # (n_out_blocks + 1,) int32: crow_indices, or ccol_indices when TRANSPOSED
    idx_ptr,  # (nnz,) int32: col_indices, or row_indices when TRANSPOSED
    perm_ptr,  # (nnz,) int32: transpose_perm when TRANSPOSED, else unused
    order_ptr,  # (n_out_blocks,) int32: row_order, or col_order when TRANSPOSED
    bias_ptr,  # (OUT,) or unused
    grad_ptr,  # (M, OUT): dY, read in the GRAD_EPILOGUE mode only
    y_ptr,  # (M, OUT)
    bias_grad_ptr,  # (M tiles, OUT) fp32: column sums of each M tile's dZ, written in the BIAS_GRAD mode only
    gate_values_ptr,  # GATED only: the gate's (gate nnz, BN, BK) tiles,
    gate_crow_ptr,  # (n_out_blocks + 1,) int32 crow_indices,
    gate_col_ptr,  # (gate nnz,) int32 col_indices
    gate_bias_ptr,  # and (OUT,) bias (HAS_GATE_BIAS)
    scales_ptr,  # QUANTIZED only: W's (nnz, BN) float32 scales,
    gate_scales_ptr,  # the gate's (gate nnz, BN)
    x_scales_ptr,  # X_FP8 only: (M,) float32 scales of X's rows
    # sizes
    M,
    OUT,
    IN,
    n_out_blocks,
    # strides
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yn,
    stride_gm,
    stride_gn,
    # autotuning keys only (shape bucket, density bucket)
    M_BUCKET,
    DENSITY_BUCKET,
    # meta-parameters
    BN: tl.constexpr,
    BK: tl.constexpr,
    TRANSPOSED: tl.constexpr,  # False: Y = X·Wᵀ by block rows; True: dX = dY·W by block columns
    BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GRAD_EPILOGUE: tl.constexpr,  # write dY ⊙ act'(Z) instead of act(Z): the backward's recompute of Z
    BIAS_GRAD: tl.constexpr,  # with GRAD_EPILOGUE: also the tile's column sums of dZ (the bias gradient's parts)
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    EVEN_IN: tl.constexpr,  # IN is a multiple of the tile: no column mask on X, so its loads stay 16 bytes wide
    GATED: tl.constexpr,  # forward only: Y = act(X·Wgᵀ + bg) ⊙ (X·Wᵀ + b), W the up projection, Wg the gate
    HAS_GATE_BIAS: tl.constexpr,
    QUANTIZED: tl.constexpr,  # int8 / fp8 tiles with scales per tile row (forward and gated only)
    X_FP8: tl.constexpr,  # X quantized to fp8 per row (W8A8, forward only)
):
    # Tile width along the output: BN for the forward, BK through the transpose.
    OUT_B: tl.constexpr = BK if TRANSPOSED else BN
    pid = tl.program_id(0)
    pid_m = pid // n_out_blocks
    out_block = tl.load(order_ptr + pid % n_out_blocks)
    start = tl.load(ptr_ptr + out_block)
    end = tl.load(ptr_ptr + out_block + 1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_out = out_block * OUT_B + tl.arange(0, OUT_B)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # (BLOCK_M, 1)
    row_in_range = offs_m[:, None] < M

    out_mask = row_in_range & (offs_out[None, :] < OUT)
    if GRAD_EPILOGUE:  # issued before the loop, so its latency hides behind the products
        grad_ptrs = grad_ptr + offs_m[:, None].to(tl.int64) * stride_gm + offs_out[None, :] * stride_gn
        grad_tile = tl.load(grad_ptrs, mask=out_mask, other=0.0)

    acc = _block_row_product(x_rows, row_in_range, IN, stride_xk, values_ptr, idx_ptr, perm_ptr, start, end, BN, BK,
                             TRANSPOSED, BLOCK_M, INPUT_PRECISION, DOT_IN_FP32, EVEN_IN, scales_ptr,
                             QUANTIZED)  # fmt: skip
    if X_FP8:  # the products were of the rows divided by their scales
        acc *= tl.load(x_scales_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    if GATED:  # the gate's own block row: it may store other tiles than up's, or none
        gate_start = tl.load(gate_crow_ptr + out_block)
        gate_end = tl.load(gate_crow_ptr + out_block + 1)
        gate = _block_row_product(x_rows, row_in_range, IN, stride_xk, gate_values_ptr, gate_col_ptr, gate_col_ptr,
                                  gate_start, gate_end, BN, BK, False, BLOCK_M, INPUT_PRECISION, DOT_IN_FP32,
                                  EVEN_IN, gate_scales_ptr, QUANTIZED)  # fmt: skip

    if HAS_BIAS:
        acc = add_bias(acc, bias_ptr, offs_out, OUT)
    if GRAD_EPILOGUE:
        acc = grad_tile.to(tl.float32) * activation_grad(acc, ACTIVATION)
        if BIAS_GRAD:  # rows past M hold zeros (their dY was masked to 0)
            store_column_sums(bias_grad_ptr + pid_m * OUT, acc, offs_out, OUT)
    elif GATED:
        if HAS_GATE_BIAS:
            gate = add_bias(gate, gate_bias_ptr, offs_out, OUT)
        acc = gated_product(gate, acc, ACTIVATION, y_ptr.dtype.element_ty)
    else:
        acc = apply_activation(acc, ACTIVATION)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_out[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


# (BLOCK_M, num_warps, num_stages). (64, 4, 2) first: fp32 tiles multiplied on the tensor cores (TF32, tf32x3) are
# staged in shared memory at 4 bytes an element, and at blocks of 128 no other config's buffers fit (64 x 128 of X and
# 128 x 128 of W, three stages: 288 KB of the H200's 227 KB; "out of resource" from every config, bench spmm).
spmm_tuned = autotune_row_kernel(
    _spmm_kernel,
    [(64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 4, 3), (128, 4, 4), (128, 8, 2), (256, 4, 3), (256, 8, 4)],
    cache_results=True,
)

SMALLEST_TUNED_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in spmm_tuned.configs + spmm_tma_tuned.configs)


def launch_rows(
    x2: torch.Tensor,
    w: BlockSparseMatrix,
    spec: RowLaunch,
    descriptors: bool = False,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the row kernel as ``spec`` says on a 2-D ``x2`` ``(M, IN)``: ``(M, OUT)`` of x2's dtype, and with
    ``spec.bias_grad`` the output's fp32 column sums ``(OUT,)`` (the bias gradient; else None).

    ``descriptors``: the tensor-descriptor version (``kernels/spmm_tma.py``; the inputs must meet its rules,
    ``dispatch.descriptors_fit``), else pointer loads; the hidden-gradient mode exists in the descriptor version
    only. ``config`` (``BLOCK_M``, ``num_warps``, ``num_stages``) skips the autotuner: for tuning scripts.
    """
    if spec.check().mode is RowMode.HIDDEN_GRAD and not descriptors:
        raise ValueError("the hidden gradient from dY · W2 runs in the descriptor kernel only")
    geometry, meta = row_arguments(x2, w, spec)
    m = x2.shape[0]
    if m == 0:
        empty_sums = x2.new_zeros(geometry.out_features, dtype=torch.float32) if spec.bias_grad else None
        return x2.new_empty((0, geometry.out_features), dtype=spec.out_dtype or x2.dtype), empty_sums
    config = launch_config(config)
    parts = None
    if spec.bias_grad:  # a row of column sums per M tile, as many as the smallest M tile the tuner may pick makes
        smallest_block_m = config["BLOCK_M"] if config else SMALLEST_TUNED_BLOCK_M
        parts = torch.empty((cdiv(m, smallest_block_m), geometry.out_features), device=x2.device, dtype=torch.float32)
    if descriptors:
        y, block_m = launch_tma(x2, w, spec, geometry, meta, config, parts)
    else:
        y, block_m = _launch_pointers(x2, w, spec, geometry, meta, config, parts)
    return y, _bias_grad_from_parts(parts, m, block_m)


def _launch_pointers(x2, w, spec, geometry, meta, config, parts) -> tuple[torch.Tensor, int]:
    """``_spmm_kernel`` on the arguments :func:`launch_rows` built; returns ``(M, OUT)`` and its BLOCK_M."""
    m = x2.shape[0]
    y = torch.empty((m, geometry.out_features), device=x2.device, dtype=spec.out_dtype or x2.dtype)
    bias, gate, gate_bias, grad2 = spec.bias, spec.gate, spec.gate_bias, spec.grad
    bias, gate_bias = (None if b is None else b.contiguous() for b in (bias, gate_bias))  # read as flat arrays
    buckets = (
        m_bucket(m),
        density_bucket(w.nnz / (geometry.n_out_blocks * cdiv(geometry.in_features, geometry.in_block))),
    )
    args = (
        x2,
        w.values,
        *geometry.index,
        bias if bias is not None else y,  # never read without HAS_BIAS
        grad2 if grad2 is not None else y,  # never read without GRAD_EPILOGUE
        y,
        parts if parts is not None else y,  # written in the BIAS_GRAD mode only
        *((gate.values, gate.crow_indices, gate.col_indices) if gate is not None else (w.values, *geometry.index[:2])),
        gate_bias if gate_bias is not None else y,  # never read without HAS_GATE_BIAS
        w.scales if w.scales is not None else y,  # never read without QUANTIZED
        gate.scales if gate is not None and gate.scales is not None else y,
        spec.x_scales if spec.x_scales is not None else y,  # never read without X_FP8
        m,
        geometry.out_features,
        geometry.in_features,
        geometry.n_out_blocks,
        x2.stride(0),
        x2.stride(1),
        y.stride(0),
        y.stride(1),
        *(grad2.stride() if grad2 is not None else y.stride()),
        *buckets,
    )
    meta = {**meta, "EVEN_IN": geometry.in_features % geometry.in_block == 0}
    prepared.allocated(y, parts)
    if config is None:
        tuning_key = (x2.dtype, w.dtype, geometry.out_features, geometry.in_features, *buckets)
        return y, spmm_tuned.launch(tuning_key, m_tile_grid(m, geometry.n_out_blocks), args, meta).kwargs["BLOCK_M"]
    grid, kwargs = (cdiv(m, config["BLOCK_M"]) * geometry.n_out_blocks,), {**meta, **config}
    prepared.launch(_spmm_kernel, grid, args, kwargs)
    return y, config["BLOCK_M"]


def _bias_grad_from_parts(parts: torch.Tensor | None, m: int, block_m: int) -> torch.Tensor | None:
    """The bias gradient from its per-M-tile parts: the rows the launch wrote (``block_m`` tiles), in order.
    (A few hundred rows: ``torch.sum`` is as fast here as the column-sum kernel and cheaper to issue.)"""
    return None if parts is None else parts[: cdiv(m, block_m)].sum(0)


def spmm_rows(
    x: torch.Tensor,
    w: BlockSparseMatrix,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    descriptors: bool = False,
    config: dict | None = None,
    fp8_products: bool = False,
) -> torch.Tensor:
    """``act(x · wᵀ + bias)`` by the row kernel: x ``(..., K)`` -> ``(..., N)``; inputs are checked by ``ops.spmm``.

    ``fp8_products`` (W8A8 tiles, ``dispatch.fp8_products``): x is quantized to fp8 per row first (a few
    elementwise PyTorch kernels: not fused into the launch yet) and the products are fp8 × fp8."""
    x2 = x.reshape(-1, w.shape[1])  # a view whenever the strides allow; the kernels take any strides
    spec = RowLaunch(RowMode.FORWARD, bias, activation)
    if fp8_products:
        if w.values.dtype != torch.float8_e4m3fn:
            raise ValueError(f"fp8 products need fp8 tiles, got {w.values.dtype}")
        out_dtype, (x2, x_scales) = x2.dtype, quantize_rows(x2)
        spec = RowLaunch(RowMode.FORWARD, bias, activation, x_scales=x_scales, out_dtype=out_dtype)
    y, _ = launch_rows(x2, w, spec, descriptors, config)
    return y.reshape(*x.shape[:-1], w.shape[0])


def gated_rows(
    x2: torch.Tensor,
    up: BlockSparseMatrix,
    gate: BlockSparseMatrix,
    up_bias: torch.Tensor | None,
    gate_bias: torch.Tensor | None,
    activation: str | None,
    descriptors: bool = False,
) -> torch.Tensor:
    """A gated MLP's hidden activation ``act(x2 · gateᵀ + gate_bias) ⊙ (x2 · upᵀ + up_bias)`` in one launch of
    the row kernel: x2 ``(M, K)`` -> ``(M, H)`` of x2's dtype; up and gate logical ``(H, K)`` in the same blocks
    (each with its own pattern), biases ``(H,)`` or None. Neither product is written to memory; the epilogue is
    ``epilogue.gated_product``, as on every path."""
    spec = RowLaunch(RowMode.GATED, up_bias, activation, gate=gate, gate_bias=gate_bias)
    return launch_rows(x2, up, spec, descriptors)[0]


def activation_grad_rows(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    w: BlockSparseMatrix,
    bias: torch.Tensor | None,
    activation: str,
    bias_grad: bool = False,
    descriptors: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``dZ = dY ⊙ act'(Z)`` with ``Z = x · wᵀ + bias`` recomputed tile by tile, never stored: ``(..., N)``; with
    ``bias_grad``, also dZ summed over all leading dims in fp32 (``(N,)``, the bias gradient; else None), from the
    same tiles."""
    x2, grad2 = x.reshape(-1, w.shape[1]), grad_out.reshape(-1, w.shape[0])
    spec = RowLaunch(RowMode.ACTIVATION_GRAD, bias, activation, grad2, bias_grad)
    dz, column_sums = launch_rows(x2, w, spec, descriptors)
    return dz.reshape(grad_out.shape), column_sums


def hidden_grad_on_chip(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    up: BlockSparseMatrix,
    up_bias: torch.Tensor | None,
    down: BlockSparseMatrix,
    activation: str,
    bias_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For an MLP ``y = down(act(up(x)))``: ``dZ = (dY · W_down) ⊙ act'(x · W_upᵀ + b_up)``, ``(..., H)``, and with
    ``bias_grad`` its fp32 column sums (up's bias gradient), in one launch of the descriptor kernel that computes
    each ``(M tile, hidden block)`` of dY · W_down on chip (never written to memory).

    grad_out ``(..., N)`` is dY; x ``(..., K)``; down's block columns as wide as up's block rows
    (``dispatch.hidden_grad_on_chip_fits``).
    """
    x2, grad2 = x.reshape(-1, up.shape[1]), grad_out.reshape(-1, down.shape[0])
    spec = RowLaunch(RowMode.HIDDEN_GRAD, up_bias, activation, grad2, bias_grad, grad_weight=down)
    dz, column_sums = launch_rows(x2, up, spec, descriptors=True)
    return dz.reshape(*grad_out.shape[:-1], up.shape[0]), column_sums


def input_grad_rows(
    grad_out: torch.Tensor, w: BlockSparseMatrix, descriptors: bool = False, config: dict | None = None
) -> torch.Tensor:
    """``dX = dY · W`` through W's transposed index: grad_out ``(..., N)`` -> ``(..., K)``, no copy of W."""
    grad2 = grad_out.reshape(-1, w.shape[0])
    y, _ = launch_rows(grad2, w, RowLaunch(RowMode.INPUT_GRAD), descriptors, config)
    return y.reshape(*grad_out.shape[:-1], w.shape[1])
