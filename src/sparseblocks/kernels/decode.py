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

One token (batch-1 decode, the common case) takes its own kernel, one program per stored tile: a ``(bn,)``
product on the CUDA cores (``tl.dot`` needs 16 rows), each tile of a longer row a piece with its own slot.

The arrival counters are kept between calls (``arrival_counters``): every kernel leaves them zero, so a call
costs one kernel launch and no memset.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparseblocks.backend import triton_interpreting
from sparseblocks.format import BlockSparseMatrix
from sparseblocks.kernels.epilogue import (
    ACTIVATION_CODES,
    accumulate_dot,
    apply_activation,
    hopper_or_later,
    input_precision,
    load_x_columns,
    multiprocessors,
)
from sparseblocks.kernels.tuning import TunedKernel, cdiv, density_bucket, next_power_of_2
from sparseblocks.reference import ACTIVATIONS

MAX_TOKENS = 64  # the most rows of x the kernel takes
ALWAYS_TOKENS = 16  # up to here it beat the row kernel in nearly every case of `bench decode` (H200)
EMPTY_ROWS_PER_PROGRAM = 32
REDUCE_CHUNK = 16  # partial sums of a cut row added per load at one token
ONE_TOKEN_LAUNCH = {"num_warps": 2, "num_stages": 1}  # 2 warps beat 1 and 4 (benchmarks/decode_overhead.py)
# Programs per SM of the few-token kernel (tiles per program = ceil(nnz / (programs per SM · SMs))): tiles of at
# most SMALL_TILE elements take more programs, each streaming its tiles one after the other, to hide the latency of
# their small loads; larger tiles take fewer (benchmarks/results/h200/tune_decode_4_16_tokens.txt).
PROGRAMS_PER_SM = 4
PROGRAMS_PER_SM_SMALL_TILES = 8
SMALL_TILE = 32 * 32  # elements
# At one token, rows of at least this many small tiles stream faster through the few-token kernel (several tiles per
# program) than through the one-token kernel (a program per tile). Blocks of 32 at 50%, one token, same H200 run
# (decode_ab_one_stage.txt): Llama-1B down 12.4 µs vs the one-token kernel's 15.7, Llama-8B up 25.6 vs 33.0, down
# 25.4 vs 40.3 (dense: 13.2, 30.2, 32.0). Rows of 32 small tiles (Llama-1B up: 12.1 vs 11.1 µs at 4 tokens, the same
# kernel and x tile) and larger tiles went faster through the one-token kernel (decode_ab_prefetch.txt).
FEW_TOKEN_KERNEL_MIN_TILES_PER_ROW = 64


@triton.jit
def _with_bias(acc, offs_n, in_bounds, bias_ptr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    """act(acc + bias) on an fp32 ``(BLOCK_M, BN)`` tile of Y whose columns are ``offs_n``."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=in_bounds, other=0.0).to(tl.float32)[None, :]
    return apply_activation(acc, ACTIVATION)


@triton.jit
def _store_row(value, row, offs_m, M, N, y_ptr, stride_ym, stride_yn, BN: tl.constexpr, write=True):
    """Store one fp32 ``(BLOCK_M, BN)`` tile of Y, block row ``row`` (a no-op where ``write`` is False)."""
    offs_n = row * BN + tl.arange(0, BN)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = (offs_m[:, None] < M) & ((offs_n < N) & write)[None, :]
    tl.store(y_ptrs, value.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finish_row(acc, row, offs_m, M, N, bias_ptr, y_ptr, stride_ym, stride_yn, BN: tl.constexpr,
                HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, write=True):  # fmt: skip
    """Bias, activation and store of one ``(BLOCK_M, BN)`` tile of Y (a no-op where ``write`` is False)."""
    offs_n = row * BN + tl.arange(0, BN)
    value = _with_bias(acc, offs_n, (offs_n < N) & write, bias_ptr, HAS_BIAS, ACTIVATION)
    _store_row(value, row, offs_m, M, N, y_ptr, stride_ym, stride_yn, BN, write)


@triton.jit
def _finish_gated_row(up, gate, row, N, bias_ptr, gate_bias_ptr, y_ptr, stride_yn, BN: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_GATE_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):  # fmt: skip
    """One token's block row of act(gate + b_gate) ⊙ (up + b): both ``(1, BN)`` fp32 sums."""
    offs_n = row * BN + tl.arange(0, BN)
    in_bounds = offs_n < N
    value = _with_bias(gate, offs_n, in_bounds, gate_bias_ptr, HAS_GATE_BIAS, ACTIVATION)
    value *= _with_bias(up, offs_n, in_bounds, bias_ptr, HAS_BIAS, 0)
    _store_row(value, row, tl.arange(0, 1), 1, N, y_ptr, 0, stride_yn, BN)


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
    registers that the whole kernel ran at half speed (``benchmarks/tune_decode.py``).
    """
    first_piece = row_start // tiles_per_program
    last_piece = (row_end - 1) // tiles_per_program
    tl.store(arrived_ptr + row, 0)  # leave the counter as found: re-runs (autotuning) need it zero
    total = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
    for piece in range(first_piece, last_piece + 1):
        slot = partial_ptr + tl.cast(piece + row, tl.int64) * (BLOCK_M * BN) + slot_offsets
        total += tl.load(slot, mask=slot_mask, other=0.0, cache_modifier=".cg")  # from L2: other SMs wrote it
    _finish_row(total, row, offs_m, M, N, bias_ptr, y_ptr, stride_ym, stride_yn, BN, HAS_BIAS, ACTIVATION)


@triton.jit
def _write_empty_rows(group, M, N, n_rows, crow_ptr, bias_ptr, y_ptr, stride_ym, stride_yn, BN: tl.constexpr,
                      EMPTY_ROWS_PER_PROGRAM: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                      gate_crow_ptr=None, gate_bias_ptr=None, GATED: tl.constexpr = False,
                      HAS_GATE_BIAS: tl.constexpr = False):  # fmt: skip
    """act(bias) (or act(0)) into the empty block rows among the ``group``-th ``EMPTY_ROWS_PER_PROGRAM`` rows;
    ``GATED``: act(gate bias) ⊙ bias into the rows empty in both matrices.

    Their row bounds in one load and the value of all of them at once (the same for every token), then stores
    only: no dependent round trip per row.
    """
    rows = group * EMPTY_ROWS_PER_PROGRAM + tl.arange(0, EMPTY_ROWS_PER_PROGRAM)
    starts = tl.load(crow_ptr + rows, mask=rows < n_rows, other=0)
    empty = (starts == tl.load(crow_ptr + rows + 1, mask=rows < n_rows, other=0)) & (rows < n_rows)
    offs_n = rows[:, None] * BN + tl.arange(0, BN)[None, :]
    if GATED:
        gate_starts = tl.load(gate_crow_ptr + rows, mask=rows < n_rows, other=0)
        empty &= gate_starts == tl.load(gate_crow_ptr + rows + 1, mask=rows < n_rows, other=0)
    write = empty[:, None] & (offs_n < N)
    value = tl.zeros((EMPTY_ROWS_PER_PROGRAM, BN), dtype=tl.float32)
    if HAS_BIAS:
        value += tl.load(bias_ptr + offs_n, mask=write, other=0.0).to(tl.float32)
    if GATED:
        gate = tl.zeros((EMPTY_ROWS_PER_PROGRAM, BN), dtype=tl.float32)
        if HAS_GATE_BIAS:
            gate += tl.load(gate_bias_ptr + offs_n, mask=write, other=0.0).to(tl.float32)
        value *= apply_activation(gate, ACTIVATION)
    else:
        value = apply_activation(value, ACTIVATION)
    value = value.to(y_ptr.dtype.element_ty)
    for m in range(M):
        tl.store(y_ptr + m * stride_ym + offs_n * stride_yn, value, mask=write)


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
):
    pid = tl.program_id(0)
    tile_programs = tl.cdiv(nnz, tiles_per_program)
    offs_m = tl.arange(0, BLOCK_M)
    if pid >= tile_programs:  # the programs after the tile programs write the empty rows
        _write_empty_rows(pid - tile_programs, M, N, n_rows, crow_ptr, bias_ptr, y_ptr, stride_ym, stride_yn, BN,
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
        acc = accumulate_dot(acc, x_tile, tl.trans(w_tile), DOT_IN_FP32, INPUT_PRECISION)
        row_ends = next_row != row  # before the program's last tile (that row is settled after the loop)
        is_head_piece = (row == head_row) & head_is_piece
        head_acc = tl.where(row_ends & is_head_piece, acc, head_acc)
        _finish_row(acc, row, offs_m, M, N, bias_ptr, y_ptr, stride_ym, stride_yn, BN, HAS_BIAS, ACTIVATION,
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
        _finish_row(acc, tail_row, offs_m, M, N, bias_ptr, y_ptr, stride_ym, stride_yn, BN, HAS_BIAS, ACTIVATION)


@triton.jit
def _wait_for_previous_kernel():
    """Wait until the previous kernel in the stream has finished and its writes are visible, then let the next
    programmatically launched kernel start (griddepcontrol, sm_90+)."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _row_partials(partial_ptr, row_start, row_end, offs_n, BN: tl.constexpr, REDUCE_CHUNK: tl.constexpr):
    """The ``(1, BN)`` fp32 sum of slots ``[row_start, row_end)``, ``REDUCE_CHUNK`` slots per load, in order."""
    total = tl.zeros((BN,), dtype=tl.float32)
    for chunk in range(row_start, row_end, REDUCE_CHUNK):  # a fixed order: deterministic
        slots = chunk + tl.arange(0, REDUCE_CHUNK)
        partials = tl.load(partial_ptr + slots.to(tl.int64)[:, None] * BN + offs_n[None, :],
                           mask=(slots < row_end)[:, None], other=0.0, cache_modifier=".cg")  # fmt: skip
        total += tl.sum(partials, axis=0)
    return total[None, :]


@triton.jit
def _one_token_kernel(
    x_ptr,  # (K,), stride stride_xk
    values_ptr,  # (nnz, BN, BK)
    crow_ptr,  # (n_rows + 1,) int32
    col_ptr,  # (nnz,) int32
    tile_row_ptr,  # (nnz,) int32: block row of each stored tile
    bias_ptr,  # (N,) or unused
    gate_values_ptr,  # GATED: the gate matrix's arrays and bias, tiled like the first; else unused
    gate_crow_ptr,
    gate_col_ptr,
    gate_tile_row_ptr,
    gate_bias_ptr,
    partial_ptr,  # (nnz + gate_nnz, BN) fp32 scratch: one slot per tile
    arrived_ptr,  # (n_rows,) int32, zero on entry and on exit
    y_ptr,  # (N,), stride stride_yn
    N,
    K,
    nnz,
    gate_nnz,
    n_rows,
    stride_xk,
    stride_yn,
    BN: tl.constexpr,
    BK: tl.constexpr,
    EMPTY_ROWS_PER_PROGRAM: tl.constexpr,
    REDUCE_CHUNK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_GATE_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    EVEN_K: tl.constexpr,
    DEPENDENT: tl.constexpr,
):
    """y = act(W · x + b) for one token, program ``t`` multiplying stored tile ``t``; with ``GATED``,
    y = act(W_gate · x + b_gate) ⊙ (W · x + b), programs ``nnz + t`` taking the gate's tiles.

    One tile per program measured fastest (more tiles per program, loaded at once or in a loop, were slower:
    ``benchmarks/decode_overhead.py``): every program's loads go out at once, and nothing waits on a previous
    tile. A row of several tiles is reduced like the few-token kernel's pieces, each tile a piece: its partial sum
    in the tile's own slot (a row's slots are consecutive; the gate's follow W's), and the last tile to arrive
    adds them in order. Gated, a row's counter counts the tiles of both rows, so one launch writes the hidden
    activation of a SwiGLU MLP: no separate products, no elementwise kernel.

    ``DEPENDENT`` (a programmatic dependent launch, Hopper on): 1 waits for the previous kernel before touching
    memory; 2 streams its tiles and indices first and waits only before reading x and writing anything, for a
    launch that follows one of these kernels whose wait covered any writer of the weights. Either way the next
    launch may start once every program has waited.
    """
    pid = tl.program_id(0)
    if DEPENDENT == 1:
        _wait_for_previous_kernel()
    if pid >= nnz + gate_nnz:
        if DEPENDENT == 2:
            _wait_for_previous_kernel()
        _write_empty_rows(pid - nnz - gate_nnz, 1, N, n_rows, crow_ptr, bias_ptr, y_ptr, 0, stride_yn, BN,
                          EMPTY_ROWS_PER_PROGRAM, HAS_BIAS, ACTIVATION, gate_crow_ptr, gate_bias_ptr, GATED,
                          HAS_GATE_BIAS)  # fmt: skip
        return
    tile = pid
    is_gate = False
    if GATED:  # one matrix or the other: the selects cost no round trip
        is_gate = pid >= nnz
        tile = tl.where(is_gate, pid - nnz, pid)
        values_ptr = tl.where(is_gate, gate_values_ptr, values_ptr)
        col_ptr = tl.where(is_gate, gate_col_ptr, col_ptr)
        tile_row_ptr = tl.where(is_gate, gate_tile_row_ptr, tile_row_ptr)
    offs_n, offs_k = tl.arange(0, BN), tl.arange(0, BK)
    w = tl.load(values_ptr + tile.to(tl.int64) * (BN * BK) + offs_n[:, None] * BK + offs_k[None, :])
    row = tl.load(tile_row_ptr + tile)
    k_index = tl.load(col_ptr + tile) * BK + offs_k
    row_start, row_end = tl.load(crow_ptr + row), tl.load(crow_ptr + row + 1)
    tiles_in_row = row_end - row_start
    if GATED:
        gate_start, gate_end = tl.load(gate_crow_ptr + row), tl.load(gate_crow_ptr + row + 1)
        tiles_in_row += gate_end - gate_start
    if DEPENDENT == 2:
        _wait_for_previous_kernel()
    x = tl.load(x_ptr + k_index * stride_xk, mask=True if EVEN_K else k_index < K, other=0.0)
    acc = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)[None, :]  # (1, BN) fp32, CUDA cores
    offs_m = tl.arange(0, 1)
    if tiles_in_row == 1:
        if GATED:
            _finish_gated_row(tl.where(is_gate, 0.0, acc), tl.where(is_gate, acc, 0.0), row, N, bias_ptr,
                              gate_bias_ptr, y_ptr, stride_yn, BN, HAS_BIAS, HAS_GATE_BIAS, ACTIVATION)  # fmt: skip
        else:
            _finish_row(acc, row, offs_m, 1, N, bias_ptr, y_ptr, 0, stride_yn, BN, HAS_BIAS, ACTIVATION)
    else:
        tl.store(partial_ptr + pid.to(tl.int64) * BN + offs_n[None, :], acc)
        tl.debug_barrier()  # every thread's part of the partial is stored before the counter says so (release)
        if tl.atomic_add(arrived_ptr + row, 1, sem="acq_rel") == tiles_in_row - 1:
            tl.store(arrived_ptr + row, 0)  # leave the counter as found: the next call needs it zero
            total = _row_partials(partial_ptr, row_start, row_end, offs_n, BN, REDUCE_CHUNK)
            if GATED:
                gate_total = _row_partials(partial_ptr, nnz + gate_start, nnz + gate_end, offs_n, BN, REDUCE_CHUNK)
                _finish_gated_row(total, gate_total, row, N, bias_ptr, gate_bias_ptr, y_ptr, stride_yn, BN,
                                  HAS_BIAS, HAS_GATE_BIAS, ACTIVATION)  # fmt: skip
            else:
                _finish_row(total, row, offs_m, 1, N, bias_ptr, y_ptr, 0, stride_yn, BN, HAS_BIAS, ACTIVATION)


# (num_warps, num_stages). A one-stage config, for programs of about one tile (Llama-1B 50%/b128), was tried: the
# autotuner took it in one case of 24 (with no gain), never at blocks of 128 (decode_ab_one_stage.txt, H200).
LAUNCH_CONFIGS = [(4, 2), (4, 3), (4, 4), (8, 3)]
decode_tuned = TunedKernel(
    _decode_kernel,
    [triton.Config({}, num_warps=warps, num_stages=stages) for warps, stages in LAUNCH_CONFIGS],
    key=["BLOCK_M", "N", "K", "BN", "BK", "DENSITY_BUCKET", "HAS_BIAS", "ACTIVATION", "INPUT_PRECISION"],
    cache_results=True,
)

_COUNTERS: dict[tuple[torch.device, int, int], torch.Tensor] = {}


def arrival_counters(device: torch.device, n_rows: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for ``n_rows`` block rows, kept from call to call.

    Both kernels leave every counter zero on exit, so a call needs no memset of its own (0.8–1 µs of a 5–9 µs
    one-token call on the H200). One buffer per device and stream: calls on one stream run one after the other,
    so two calls never count in the same buffer at once. A buffer first needed inside a CUDA-graph capture is
    zeroed by that graph (once per replay, shared by its layers of that height), like any memory it allocates.
    Buffers are never freed or regrown (one per height): a captured graph keeps its pointer for good.
    """
    if device.type != "cuda":
        return torch.zeros(n_rows, device=device, dtype=torch.int32)
    key = (device, torch.cuda.current_stream(device).cuda_stream, n_rows)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(n_rows, device=device, dtype=torch.int32)
    return _COUNTERS[key]


def default_tiles_per_program(w: BlockSparseMatrix) -> int:
    """Tiles per program so that about ``PROGRAMS_PER_SM`` programs (``PROGRAMS_PER_SM_SMALL_TILES`` for small
    tiles) run on each SM."""
    if triton_interpreting() or not w.values.is_cuda:
        return 2  # small test shapes: still cut rows into pieces
    per_sm = PROGRAMS_PER_SM_SMALL_TILES if _small_tiles(w) else PROGRAMS_PER_SM
    return max(1, cdiv(w.nnz, per_sm * multiprocessors(w.values.device)))


def _small_tiles(w: BlockSparseMatrix) -> bool:
    """Whether ``w``'s tiles hold at most ``SMALL_TILE`` elements."""
    bn, bk = w.block_shape
    return bn * bk <= SMALL_TILE


def decode_pays(m: int, w: BlockSparseMatrix) -> bool:
    """Whether ``m`` rows of x go faster through this kernel than through the row kernel (``bench decode``, H200).

    Up to ``ALWAYS_TOKENS`` they do. Above, the row kernel's wide M tile wins unless ``w`` has fewer block rows
    than half the SMs (down projections), where the row kernel leaves SMs idle; and with blocks 128 rows tall the
    row kernel won at 64 tokens even then, in 10 of 12 cases measured with the descriptor row kernel
    (``benchmarks/results/h200/decode_recheck.json``). The grid measured 16 and 64 tokens only: 17 to 63 follow
    the 64-token result.
    """
    if not 1 <= m <= MAX_TOKENS:
        return False
    if m <= ALWAYS_TOKENS or triton_interpreting() or not w.values.is_cuda:
        return True
    few_block_rows = 2 * w.block_grid[0] < multiprocessors(w.values.device)
    return few_block_rows and w.block_shape[0] < 128


def one_token_kernel_pays(w: BlockSparseMatrix) -> bool:
    """Whether one row of x goes faster through the one-token kernel than through the few-token one: unless
    ``w``'s tiles are small and its rows hold ``FEW_TOKEN_KERNEL_MIN_TILES_PER_ROW`` of them on average."""
    return not _small_tiles(w) or w.nnz < FEW_TOKEN_KERNEL_MIN_TILES_PER_ROW * w.block_grid[0]


def spmm_decode_triton(
    x2: torch.Tensor,
    w: BlockSparseMatrix,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    tiles_per_program: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``act(x2 · wᵀ + bias)`` for a 2-D ``x2`` ``(M, K)`` with ``1 ≤ M ≤ MAX_TOKENS``: ``(M, N)`` of x2's dtype.

    One row takes the one-token kernel where :func:`one_token_kernel_pays`, else the few-token kernel.
    ``tiles_per_program`` (few-token kernel only; the one-token kernel takes one tile per program) and ``config``
    (``num_warps``, ``num_stages``) override the defaults: for tuning.
    """
    m = x2.shape[0]
    if not 1 <= m <= MAX_TOKENS:
        raise ValueError(f"the decode kernel takes 1..{MAX_TOKENS} rows, got {m}")
    if w.nnz == 0:  # nothing to stream: every row is empty
        y = torch.zeros((m, w.shape[0]), device=x2.device, dtype=torch.float32)
        if bias is not None:
            y += bias
        return ACTIVATIONS[activation](y).to(x2.dtype)
    bias = None if bias is None else bias.contiguous()  # read as one flat array
    if m == 1 and one_token_kernel_pays(w):
        return _one_token(x2, w, bias, activation, config)
    (n, k), (bn, bk), (n_rows, _) = w.shape, w.block_shape, w.block_grid
    tiles = tiles_per_program or default_tiles_per_program(w)
    tile_programs = cdiv(w.nnz, tiles)
    programs = tile_programs + cdiv(n_rows, EMPTY_ROWS_PER_PROGRAM)
    block_m = max(16, next_power_of_2(m))  # tl.dot takes 16 rows at least
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    partial = torch.empty((tile_programs + n_rows, block_m, bn), device=x2.device, dtype=torch.float32)
    density = density_bucket(w.density)
    args = (
        x2, w.values, w.crow_indices, w.col_indices, w.row_indices_of_block,
        bias if bias is not None else y, partial, arrival_counters(x2.device, n_rows), y,
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
        "DOT_IN_FP32": triton_interpreting() and x2.dtype == torch.bfloat16,
        "EVEN_K": k % bk == 0,
    }
    if config is None and triton_interpreting():
        config = {"num_warps": 4, "num_stages": 1}
    if config is None:
        decode_tuned.launch((x2.dtype, w.dtype, n, k, density), (programs,), args, meta)
    else:
        _decode_kernel[(programs,)](*args, **meta, **config)
    return y


def _one_token(
    x2: torch.Tensor,
    w: BlockSparseMatrix,
    bias: torch.Tensor | None,
    activation: str | None,
    config: dict | None,
    gate: BlockSparseMatrix | None = None,
    gate_bias: torch.Tensor | None = None,
    dependent: int = 0,
) -> torch.Tensor:
    """``spmm_decode_triton`` for x2 ``(1, K)``: the one-token kernel, one program per stored tile; with ``gate``
    (tiled like ``w``), ``act(x2 · gateᵀ + gate_bias) ⊙ (x2 · wᵀ + bias)`` in the same launch.

    ``dependent`` 1 or 2 (Hopper and later; else ignored): a programmatic dependent launch, scheduled while the
    previous kernel finishes, in the kernel's ``DEPENDENT`` mode of that number (2 only where the previous launch
    on this stream was this kernel in mode 1 or 2, whose wait covered any writer of ``w``).
    """
    (n, k), (bn, bk), (n_rows, _) = w.shape, w.block_shape, w.block_grid
    gate_nnz = 0 if gate is None else gate.nnz
    y = torch.empty((1, n), device=x2.device, dtype=x2.dtype)
    partial = torch.empty((w.nnz + gate_nnz, bn), device=x2.device, dtype=torch.float32)
    unused = y  # for pointer arguments the kernel does not read
    gate_arrays = (unused,) * 4 if gate is None else _arrays(gate)
    args = (
        x2, *_arrays(w), bias if bias is not None else unused, *gate_arrays,
        gate_bias if gate_bias is not None else unused, partial, arrival_counters(x2.device, n_rows), y,
        n, k, w.nnz, gate_nnz, n_rows, x2.stride(1), y.stride(1),
    )  # fmt: skip
    grid = (w.nnz + gate_nnz + cdiv(n_rows, EMPTY_ROWS_PER_PROGRAM),)
    _one_token_kernel[grid](
        *args,
        BN=bn,
        BK=bk,
        EMPTY_ROWS_PER_PROGRAM=EMPTY_ROWS_PER_PROGRAM,
        REDUCE_CHUNK=REDUCE_CHUNK,
        HAS_BIAS=bias is not None,
        HAS_GATE_BIAS=gate_bias is not None,
        ACTIVATION=ACTIVATION_CODES[activation],
        GATED=gate is not None,
        EVEN_K=k % bk == 0,
        **_dependent_launch(x2.device, dependent),
        **(config or ONE_TOKEN_LAUNCH),
    )
    return y


# The one-token MLP's two launches are programmatic dependent launches (False: plain, for A/B runs). A one-token
# `spmm` alone is not: back to back on Llama-8B's projections it ran 15% slower so (compare_one_token_mlp.py).
PROGRAMMATIC_LAUNCH = True


def _dependent_launch(device: torch.device, dependent: int) -> dict:
    """The one-token kernel's ``DEPENDENT`` mode and launch option on ``device`` (see ``_one_token``)."""
    if dependent == 0 or triton_interpreting() or device.type != "cuda" or not hopper_or_later(device):
        return {"DEPENDENT": 0}
    return {"DEPENDENT": dependent, "launch_pdl": True}


def _arrays(w: BlockSparseMatrix) -> tuple[torch.Tensor, ...]:
    """What the one-token kernel reads of a matrix: values, row pointers, block columns, each tile's block row."""
    return w.values, w.crow_indices, w.col_indices, w.row_indices_of_block


def one_token_mlp_triton(
    x2: torch.Tensor,
    up: BlockSparseMatrix,
    down: BlockSparseMatrix,
    gate: BlockSparseMatrix | None = None,
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    activation: str | None = "gelu",
) -> torch.Tensor:
    """A whole MLP for one token in two launches of the one-token kernel: the hidden activation (gated: gate, up
    and their product at once), then down, whose tiles stream while the first launch finishes. x2 ``(1, K)`` ->
    ``(1, N)``; up and gate logical ``(H, K)`` tiled alike, down ``(N, H)``."""
    first, second = (1, 2) if PROGRAMMATIC_LAUNCH else (0, 0)
    if gate is None:
        hidden = _one_token(x2, up, _flat(up_bias), activation, None, dependent=first)
    else:
        hidden = gated_one_token_triton(x2, up, gate, up_bias, gate_bias, activation, dependent=first)
    return _one_token(hidden, down, _flat(down_bias), None, None, dependent=second)


def _flat(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A bias as the kernels read it: one contiguous array."""
    return None if bias is None else bias.contiguous()


def gated_one_token_triton(
    x2: torch.Tensor,
    up: BlockSparseMatrix,
    gate: BlockSparseMatrix,
    up_bias: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    activation: str | None = "silu",
    dependent: int = 0,
) -> torch.Tensor:
    """A gated MLP's hidden activation for one token, ``act(x2 · gateᵀ + gate_bias) ⊙ (x2 · upᵀ + up_bias)``, in
    one launch: x2 ``(1, K)``, up and gate logical ``(H, K)`` tiled alike -> ``(1, H)`` of x2's dtype.
    ``dependent``: as in ``_one_token``."""
    if x2.shape[0] != 1:
        raise ValueError(f"the gated one-token kernel takes one row of x, got {x2.shape[0]}")
    if gate.shape != up.shape or gate.block_shape != up.block_shape:
        raise ValueError(f"gate {tuple(gate.shape)} in blocks {gate.block_shape} must be tiled like up "
                         f"{tuple(up.shape)} in blocks {up.block_shape}")  # fmt: skip
    return _one_token(x2, up, _flat(up_bias), activation, None, gate, _flat(gate_bias), dependent)
