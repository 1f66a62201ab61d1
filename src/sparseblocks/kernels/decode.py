"""Triton kernel for ``Y = act(X · Wᵀ + b)`` at a few tokens (M ≤ 64), where the time is the weight stream.

The row-per-program forward kernel starves here: a down projection has 32–64 block rows, so a few dozen programs
stream the whole weight while most SMs idle, and rows of unequal length leave a ragged last wave. This kernel
spreads the *stored tiles* evenly instead: program ``p`` takes tiles ``[p·T, (p+1)·T)`` in storage (row-major)
order, T tiles each, whatever rows they belong to.

A block row that lies inside one program is finished there (bias, activation, store). A row cut between programs
("pieces") is reduced in fp32: each piece stores its partial ``(BLOCK_M, bn)`` sum in a scratch slot and counts
itself in an arrival counter of the row; the last piece to arrive adds the row's slots in a fixed order and writes
the row. The result therefore does not depend on which piece arrives last: it is deterministic, and the launch is
one kernel (plus the counters' memset), with no host sync, so CUDA graphs capture it.

Slots need no allocation table: piece ``(program p, row r)`` uses slot ``p + r``, which is unique because programs
and rows advance together along the tile list, so at most ``programs + rows`` slots exist.
Empty block rows are written (bias, or zero, through the activation) by the program at whose position in the tile
list they sit, so every output element is written exactly once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparseblocks.backend import triton_interpreting
from sparseblocks.format import BlockSparseMatrix
from sparseblocks.kernels.epilogue import ACTIVATION_CODES, apply_activation, input_precision
from sparseblocks.reference import ACTIVATIONS

MAX_TOKENS = 64  # spmm dispatches here for M ≤ MAX_TOKENS
PROGRAMS_PER_SM = 2  # tiles per program = ceil(nnz / (PROGRAMS_PER_SM · SMs)); see benchmarks/NOTES.md


@triton.jit
def _finish_row(acc, row, offs_m, M, N, bias_ptr, y_ptr, stride_ym, stride_yn, BN: tl.constexpr,
                HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):  # fmt: skip
    """Bias, activation and store of one ``(BLOCK_M, BN)`` tile of Y."""
    offs_n = row * BN + tl.arange(0, BN)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    acc = apply_activation(acc, ACTIVATION)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=["M", "tiles_per_program", "DENSITY_BUCKET"])
def _decode_kernel(
    x_ptr,  # (M, K)
    values_ptr,  # (nnz, BN, BK)
    crow_ptr,  # (n_rows + 1,) int32
    col_ptr,  # (nnz,) int32
    tile_row_ptr,  # (nnz,) int32: block row of each stored tile
    bias_ptr,  # (N,) or unused
    partial_ptr,  # (programs + n_rows, BLOCK_M, BN) fp32 scratch
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
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    first = pid * tiles_per_program
    last = tl.minimum(first + tiles_per_program, nnz)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BK)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # x may be a view with a huge row stride
    row_in_range = offs_m[:, None] < M
    tile_offsets = tl.arange(0, BN)[:, None] * BK + offs_k[None, :]
    slot_offsets = offs_m[:, None] * BN + tl.arange(0, BN)[None, :]

    # Rows this program writes or contributes to: from the first empty row sitting at `first` (if any) to the
    # row of its last tile, or to the last row for the last program (empty rows after the last tile).
    previous_row = tl.load(tile_row_ptr + first - 1, mask=first > 0, other=-1)
    first_row = tl.minimum(tl.load(tile_row_ptr + first), previous_row + 1)
    last_row = tl.load(tile_row_ptr + last - 1)
    if last == nnz:
        last_row = n_rows - 1

    for row in range(first_row, last_row + 1):
        row_start = tl.load(crow_ptr + row)
        row_end = tl.load(crow_ptr + row + 1)
        acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
        w_ptrs = values_ptr + tl.maximum(row_start, first).to(tl.int64) * (BN * BK) + tile_offsets
        for t in range(tl.maximum(row_start, first), tl.minimum(row_end, last)):
            k_index = tl.load(col_ptr + t) * BK + offs_k
            if EVEN_K:
                x_tile = tl.load(x_rows + k_index[None, :] * stride_xk, mask=row_in_range, other=0.0)
            else:
                x_mask = row_in_range & (k_index[None, :] < K)
                x_tile = tl.load(x_rows + k_index[None, :] * stride_xk, mask=x_mask, other=0.0)
            w_tile = tl.load(w_ptrs)
            w_ptrs += BN * BK
            if DOT_IN_FP32:
                x_tile, w_tile = x_tile.to(tl.float32), w_tile.to(tl.float32)
            acc = tl.dot(x_tile, tl.trans(w_tile), acc, input_precision=INPUT_PRECISION)

        # Programs that hold a piece of this row: first_piece..last_piece (one, for an empty row).
        first_piece = row_start // tiles_per_program
        last_piece = tl.maximum(row_end - 1, row_start) // tiles_per_program
        if first_piece == last_piece:
            _finish_row(acc, row, offs_m, M, N, bias_ptr, y_ptr, stride_ym, stride_yn, BN, HAS_BIAS, ACTIVATION)
        else:
            tl.store(partial_ptr + tl.cast(pid + row, tl.int64) * (BLOCK_M * BN) + slot_offsets, acc)
            tl.debug_barrier()  # every thread's partial is stored before the counter says so (release below)
            arrived = tl.atomic_add(arrived_ptr + row, 1, sem="acq_rel")
            if arrived == last_piece - first_piece:  # the last piece: sum all of them in piece order
                tl.store(arrived_ptr + row, 0)  # leave the counter as found: re-runs (autotuning) need it zero
                total = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
                for piece in range(first_piece, last_piece + 1):
                    slot = partial_ptr + tl.cast(piece + row, tl.int64) * (BLOCK_M * BN) + slot_offsets
                    total += tl.load(slot, cache_modifier=".cg")  # from L2: other SMs wrote it
                _finish_row(total, row, offs_m, M, N, bias_ptr, y_ptr, stride_ym, stride_yn, BN, HAS_BIAS,
                            ACTIVATION)  # fmt: skip


TUNING_CONFIGS = [
    triton.Config({}, num_warps=warps, num_stages=stages) for warps, stages in [(4, 2), (4, 3), (4, 4), (8, 3)]
]
_decode_tuned = triton.autotune(
    configs=TUNING_CONFIGS,
    key=["BLOCK_M", "N", "K", "BN", "BK", "DENSITY_BUCKET", "HAS_BIAS", "ACTIVATION", "INPUT_PRECISION"],
    cache_results=True,
)(_decode_kernel)


def default_tiles_per_program(w: BlockSparseMatrix) -> int:
    """Tiles per program so that about ``PROGRAMS_PER_SM`` programs run on each SM."""
    if triton_interpreting() or not w.values.is_cuda:
        return 2  # small test shapes: still cut rows into pieces
    sms = torch.cuda.get_device_properties(w.values.device).multi_processor_count
    return max(1, triton.cdiv(w.nnz, PROGRAMS_PER_SM * sms))


def spmm_decode_triton(
    x2: torch.Tensor,
    w: BlockSparseMatrix,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    tiles_per_program: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``act(x2 · wᵀ + bias)`` for a 2-D ``x2`` ``(M, K)`` with ``1 ≤ M ≤ MAX_TOKENS``: ``(M, N)`` of x2's dtype.

    ``tiles_per_program`` and ``config`` (``num_warps``, ``num_stages``) override the defaults: for tuning.
    """
    m = x2.shape[0]
    if not 1 <= m <= MAX_TOKENS:
        raise ValueError(f"the decode kernel takes 1..{MAX_TOKENS} rows, got {m}")
    if w.nnz == 0:  # nothing to stream: every row is empty
        y = torch.zeros((m, w.shape[0]), device=x2.device, dtype=torch.float32)
        if bias is not None:
            y += bias
        return ACTIVATIONS[activation](y).to(x2.dtype)
    (n, k), (bn, bk), (n_rows, _) = w.shape, w.block_shape, w.block_grid
    tiles = tiles_per_program or default_tiles_per_program(w)
    programs = triton.cdiv(w.nnz, tiles)
    block_m = max(16, triton.next_power_of_2(m))
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    partial = torch.empty((programs + n_rows, block_m, bn), device=x2.device, dtype=torch.float32)
    arrived = torch.zeros(n_rows, device=x2.device, dtype=torch.int32)
    args = (
        x2, w.values, w.crow_indices, w.col_indices, w.row_indices_of_block,
        bias if bias is not None else y, partial, arrived, y,
        m, n, k, w.nnz, n_rows, tiles,
        x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
        round(w.density * 20),
    )  # fmt: skip
    meta = {
        "BN": bn,
        "BK": bk,
        "BLOCK_M": block_m,
        "HAS_BIAS": bias is not None,
        "ACTIVATION": ACTIVATION_CODES[activation],
        "INPUT_PRECISION": input_precision(x2.dtype),
        "DOT_IN_FP32": triton_interpreting() and x2.dtype == torch.bfloat16,
        "EVEN_K": k % bk == 0,
    }
    if config is None and triton_interpreting():
        config = {"num_warps": 4, "num_stages": 1}
    if config is None:
        _decode_tuned[(programs,)](*args, **meta)
    else:
        _decode_kernel[(programs,)](*args, **meta, **config)
    return y
