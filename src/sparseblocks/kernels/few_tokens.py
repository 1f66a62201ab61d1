"""Triton kernel for ``Y = act(X · Wᵀ + b)`` at a few tokens (M ≤ 64), where the time is the weight stream.

The row-per-program forward kernel starves here: a down projection has 32–64 block rows, so a few dozen programs
stream the whole weight while most SMs idle, and rows of unequal length leave a ragged last wave. This kernel
spreads the *stored tiles* evenly instead: program ``p`` takes tiles ``[p·T, (p+1)·T)`` in storage (row-major)
order, T tiles each, whatever rows they belong to.

The weight stream then needs no index at all (a program's tiles are consecutive in memory); only the gather of
x's columns does. A block row that lies inside one program is finished there (bias, activation, store). Only a
program's first and last rows can be cut between programs ("pieces"); they are reduced in fp32: each piece stores
its partial ``(BLOCK_M, bn)`` sum in a scratch slot and counts itself in an arrival counter of the row, and the
last piece to arrive adds the row's slots in a fixed order and writes the row. The result therefore does not
depend on which piece arrives last: it is deterministic, and the launch is one kernel with no host sync, so CUDA
graphs capture it.

Slots need no allocation table: piece ``(program p, row r)`` uses slot ``p + r``, which is unique because programs
and rows advance together along the tile list, so at most ``programs + rows`` slots exist.
Empty block rows (bias, or zero, through the activation) are written by a few extra programs after the tile
programs, so every output element is written exactly once.

Quantized tiles (``QUANTIZED``: int8 / fp8 with scales per tile row) are converted to x's dtype as they stream in and
each tile's fp32 product is scaled by its row scales (``epilogue.accumulate_tile``): weight-only, W8A16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparseblocks.dispatch import MAX_TOKENS
from sparseblocks.format import BlockSparseMatrix
from sparseblocks.kernels import prepared
from sparseblocks.kernels.epilogue import (
    ACTIVATION_CODES,
    accumulate_tile,
    dot_in_fp32,
    input_precision,
    launch_config,
    load_x_columns,
)
from sparseblocks.kernels.row_finish import EMPTY_ROWS_PER_PROGRAM, arrival_counters, finish_row, write_empty_rows
from sparseblocks.kernels.tuning import TunedKernel, cdiv, density_bucket, next_power_of_2
from sparseblocks.reference import ACTIVATIONS


@triton.jit
def _store_piece(acc, row, row_start, row_end, pid, partial_ptr, arrived_ptr, tiles_per_program, slot_offsets,
                 slot_mask, BLOCK_M: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    """Store this program's partial sum of ``row`` and count it; return whether it was the row's last piece."""
    pieces = (row_end - 1) // tiles_per_program - row_start // tiles_per_program + 1
    tl.store(partial_ptr + tl.cast(pid + row, tl.int64) * (BLOCK_M * BN) + slot_offsets, acc, mask=slot_mask)
    tl.debug_barrier()  # every thread's part of the partial is stored before the counter says so (release below)
    arrived = tl.atomic_add(arrived_ptr + row, 1, sem="acq_rel")
    return arrived == pieces - 1


@triton.jit
def _reduce_row(row, row_start, row_end, offs_m, M, N, bias_ptr, partial_ptr, arrived_ptr, y_ptr,
                tiles_per_program, slot_offsets, slot_mask, stride_ym, stride_yn, BLOCK_M: tl.constexpr,
                BN: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):  # fmt: skip
    """The last piece's program: add the row's partials in a fixed order (deterministic) and write the row.

    With 16 token rows, one slot at a time: loading several at once (a (pieces, BLOCK_M, bn) block) held so many
    registers that the whole kernel ran at half speed (``benchmarks/tune/decode.py``).
    """
    first_piece = row_start // tiles_per_program
    last_piece = (row_end - 1) // tiles_per_program
    tl.store(arrived_ptr + row, 0)  # leave the counter as found: re-runs (autotuning) need it zero
    total = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
    for piece in range(first_piece, last_piece + 1):
        slot = partial_ptr + tl.cast(piece + row, tl.int64) * (BLOCK_M * BN) + slot_offsets
        total += tl.load(slot, mask=slot_mask, other=0.0, cache_modifier=".cg")  # from L2: other SMs wrote it
    finish_row(total, row, offs_m, M, N, bias_ptr, y_ptr, stride_ym, stride_yn, BN, HAS_BIAS, ACTIVATION)


@triton.jit(do_not_specialize=["M", "tiles_per_program", "DENSITY_BUCKET"])
def _decode_kernel(
    x_ptr,  # (M, K)
    values_ptr,  # (nnz, BN, BK)
    crow_ptr,  # (n_rows + 1,) int32
    col_ptr,  # (nnz,) int32
    tile_row_ptr,  # (nnz,) int32: block row of each stored tile
    bias_ptr,  # (N,) or unused
    partial_ptr,  # (tile programs + n_rows, BLOCK_M, BN) fp32 scratch
    arrived_ptr,  # (n_rows,) int32, zero on entry
    y_ptr,  # (M, N)
    scales_ptr,  # QUANTIZED only: (nnz, BN) float32 scales per tile row
    M,
    N,
    K,
    nnz,
    n_rows,
    tiles_per_program,
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yn,
    DENSITY_BUCKET,  # autotuning key only
    BN: tl.constexpr,
    BK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    EMPTY_ROWS_PER_PROGRAM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    EVEN_K: tl.constexpr,
    QUANTIZED: tl.constexpr,
):
    pid = tl.program_id(0)
    tile_programs = tl.cdiv(nnz, tiles_per_program)
    offs_m = tl.arange(0, BLOCK_M)
    if pid >= tile_programs:  # the programs after the tile programs write the empty rows
        write_empty_rows(pid - tile_programs, M, N, n_rows, crow_ptr, bias_ptr, y_ptr, stride_ym, stride_yn, BN,
                          EMPTY_ROWS_PER_PROGRAM, HAS_BIAS, ACTIVATION)  # fmt: skip
        return

    first = pid * tiles_per_program
    last = tl.minimum(first + tiles_per_program, nnz)
    offs_k = tl.arange(0, BK)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # x may be a view with a huge row stride
    row_in_range = offs_m[:, None] < M
    # The program's tiles are consecutive in storage: the weight stream needs no index, only x's columns do.
    w_ptrs = values_ptr + first.to(tl.int64) * (BN * BK) + tl.arange(0, BN)[:, None] * BK + offs_k[None, :]
    slot_offsets = offs_m[:, None] * BN + tl.arange(0, BN)[None, :]
    slot_mask = row_in_range & (tl.arange(0, BN)[None, :] < BN)

    # Only the first and the last row of a program can continue in a neighbour ("pieces"); rows between are whole.
    # Their bounds are loaded up front, beside the loop's first loads: every dependent round trip to memory costs
    # ~0.5 µs, as much as streaming a few tiles.
    head_row = tl.load(tile_row_ptr + first)
    tail_row = tl.load(tile_row_ptr + last - 1)
    head_start = tl.load(crow_ptr + head_row)
    head_end = tl.load(crow_ptr + head_row + 1)
    tail_start = tl.load(crow_ptr + tail_row)
    tail_end = tl.load(crow_ptr + tail_row + 1)
    head_is_piece = head_start < first
    # The loop has no branches, so Triton pipelines its loads: a whole row that ends inside it is written by a
    # masked store, and the head piece is kept aside (head_acc) for after the loop. Each tile's row and column
    # index is loaded one tile ahead: an x gather addressed by an index loaded in the same iteration kept
    # Triton 3.6's pipeliner to one buffer of each operand, waited on at every tile (the TTGIR for sm_90); with
    # the index carried over, x and w are copied num_stages - 1 tiles ahead.
    head_acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
    row = head_row
    col = tl.load(col_ptr + first)
    for t in range(first, last):
        has_next = t + 1 < last
        next_row = tl.load(tile_row_ptr + t + 1, mask=has_next, other=row)
        next_col = tl.load(col_ptr + t + 1, mask=has_next, other=0)
        x_tile = load_x_columns(x_rows, row_in_range, col * BK + offs_k, K, stride_xk, EVEN_K)
        w_tile = tl.load(w_ptrs)
        w_ptrs += BN * BK
        acc = accumulate_tile(acc, x_tile, w_tile, scales_ptr, t, BN, QUANTIZED, DOT_IN_FP32, INPUT_PRECISION)
        row_ends = next_row != row  # before the program's last tile (that row is settled after the loop)
        is_head_piece = (row == head_row) & head_is_piece
        head_acc = tl.where(row_ends & is_head_piece, acc, head_acc)
        finish_row(acc, row, offs_m, M, N, bias_ptr, y_ptr, stride_ym, stride_yn, BN, HAS_BIAS, ACTIVATION,
                    row_ends & ~is_head_piece)  # fmt: skip
        acc = tl.where(row_ends, 0.0, acc)
        row, col = next_row, next_col

    if head_is_piece & (head_row != tail_row):  # the head piece ended inside the loop
        head_was_last = _store_piece(head_acc, head_row, head_start, head_end, pid, partial_ptr, arrived_ptr,
                                     tiles_per_program, slot_offsets, slot_mask, BLOCK_M, BN)  # fmt: skip
        if head_was_last:
            _reduce_row(head_row, head_start, head_end, offs_m, M, N, bias_ptr, partial_ptr, arrived_ptr, y_ptr,
                        tiles_per_program, slot_offsets, slot_mask, stride_ym, stride_yn, BLOCK_M, BN,
                        HAS_BIAS, ACTIVATION)  # fmt: skip
    # The last row: whole, or a piece (a tail piece, or a head piece too when the program lies inside one row).
    if (tail_end > last) | ((tail_row == head_row) & head_is_piece):
        tail_was_last = _store_piece(acc, tail_row, tail_start, tail_end, pid, partial_ptr, arrived_ptr,
                                     tiles_per_program, slot_offsets, slot_mask, BLOCK_M, BN)  # fmt: skip
        if tail_was_last:
            _reduce_row(tail_row, tail_start, tail_end, offs_m, M, N, bias_ptr, partial_ptr, arrived_ptr, y_ptr,
                        tiles_per_program, slot_offsets, slot_mask, stride_ym, stride_yn, BLOCK_M, BN,
                        HAS_BIAS, ACTIVATION)  # fmt: skip
    else:
        finish_row(acc, tail_row, offs_m, M, N, bias_ptr, y_ptr, stride_ym, stride_yn, BN, HAS_BIAS, ACTIVATION)


# (num_warps, num_stages). A one-stage config, for programs of about one tile (Llama-1B 50%/b128), was tried: the
# autotuner took it in one case of 24 (with no gain), never at blocks of 128 (decode_ab_one_stage.txt, H200).
LAUNCH_CONFIGS = [(4, 2), (4, 3), (4, 4), (8, 3)]
few_tokens_tuned = TunedKernel(
    _decode_kernel,
    [triton.Config({}, num_warps=warps, num_stages=stages) for warps, stages in LAUNCH_CONFIGS],
    key=["BLOCK_M", "N", "K", "BN", "BK", "DENSITY_BUCKET", "HAS_BIAS", "ACTIVATION", "INPUT_PRECISION", "QUANTIZED"],
    cache_results=True,
)


def spmm_few_tokens(
    x2: torch.Tensor,
    w: BlockSparseMatrix,
    bias: torch.Tensor | None,
    activation: str | None,
    tiles_per_program: int,
    config: dict | None = None,
) -> torch.Tensor:
    """``act(x2 · wᵀ + bias)`` for a 2-D ``x2`` ``(M, K)`` with ``1 ≤ M ≤ MAX_TOKENS``: ``(M, N)`` of x2's dtype,
    each program streaming ``tiles_per_program`` stored tiles (``dispatch.few_token_tiles_per_program``).
    ``config`` (``num_warps``, ``num_stages``) skips the autotuner: for tuning."""
    m = x2.shape[0]
    if not 1 <= m <= MAX_TOKENS:
        raise ValueError(f"the few-token kernel takes 1..{MAX_TOKENS} rows, got {m}")
    if w.nnz == 0:  # nothing to stream: every row is empty
        y = torch.zeros((m, w.shape[0]), device=x2.device, dtype=torch.float32)
        if bias is not None:
            y += bias
        return ACTIVATIONS[activation](y).to(x2.dtype)
    bias = None if bias is None else bias.contiguous()  # read as one flat array
    (n, k), (bn, bk), (n_rows, _) = w.shape, w.block_shape, w.block_grid
    tiles = tiles_per_program
    tile_programs = cdiv(w.nnz, tiles)
    programs = tile_programs + cdiv(n_rows, EMPTY_ROWS_PER_PROGRAM)
    block_m = max(16, next_power_of_2(m))  # tl.dot takes 16 rows at least
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    partial = torch.empty((tile_programs + n_rows, block_m, bn), device=x2.device, dtype=torch.float32)
    density = density_bucket(w.density)
    args = (
        x2, w.values, w.crow_indices, w.col_indices, w.row_indices_of_block,
        bias if bias is not None else y, partial, arrival_counters(x2.device, n_rows), y,
        w.scales if w.scales is not None else y,  # never read without QUANTIZED
        m, n, k, w.nnz, n_rows, tiles,
        x2.stride(0), x2.stride(1), y.stride(0), y.stride(1), density,
    )  # fmt: skip
    meta = {
        "BN": bn,
        "BK": bk,
        "BLOCK_M": block_m,
        "EMPTY_ROWS_PER_PROGRAM": EMPTY_ROWS_PER_PROGRAM,
        "HAS_BIAS": bias is not None,
        "ACTIVATION": ACTIVATION_CODES[activation],
        "INPUT_PRECISION": input_precision(x2.dtype),
        "DOT_IN_FP32": dot_in_fp32(x2.dtype),
        "EVEN_K": k % bk == 0,
        "QUANTIZED": w.scales is not None,
    }
    config = launch_config(config, {"num_warps": 4, "num_stages": 1})
    prepared.allocated(y, partial)
    if config is None:
        few_tokens_tuned.launch((x2.dtype, w.dtype, n, k, density), (programs,), args, meta)
    else:
        prepared.launch(_decode_kernel, (programs,), args, {**meta, **config})
    return y
