"""Triton kernel for one token (batch-1 decode, the common case): ``y = act(W · x + b)`` with one program per stored
tile, a ``(bn,)`` product on the CUDA cores (``tl.dot`` needs 16 rows); a row of several tiles is reduced like the
few-token kernel's pieces (``kernels/few_tokens.py``), each tile a piece with its own slot. A gated mode computes a
SwiGLU's hidden activation in the same launch, and :func:`one_token_mlp` a whole MLP in two programmatically dependent
launches. Quantized tiles (int8 / fp8, ``QUANTIZED``) are converted to fp32 as they load and each tile's sum
scaled by its row scales: weight-only, W8A16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparseblocks.format import BlockSparseMatrix, MLPWeights
from sparseblocks.kernels import prepared
from sparseblocks.kernels.epilogue import ACTIVATION_CODES, hopper_or_later
from sparseblocks.kernels.row_finish import (
    EMPTY_ROWS_PER_PROGRAM,
    arrival_counters,
    finish_gated_row,
    finish_row,
    write_empty_rows,
)
from sparseblocks.kernels.tuning import cdiv

REDUCE_CHUNK = 16  # partial sums of a cut row added per load
ONE_TOKEN_LAUNCH = {"num_warps": 2, "num_stages": 1}  # 2 warps beat 1 and 4 (benchmarks/diagnose/decode_overhead.py)


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
    scales_ptr,  # QUANTIZED only: (nnz, BN) float32 scales per tile row, and the gate's (gate nnz, BN)
    gate_scales_ptr,
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
    QUANTIZED: tl.constexpr,
):
    """y = act(W · x + b) for one token, program ``t`` multiplying stored tile ``t``; with ``GATED``,
    y = act(W_gate · x + b_gate) ⊙ (W · x + b), programs ``nnz + t`` taking the gate's tiles.

    One tile per program measured fastest (more tiles per program, loaded at once or in a loop, were slower:
    ``benchmarks/diagnose/decode_overhead.py``): every program's loads go out at once, and nothing waits on a previous
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
        write_empty_rows(pid - nnz - gate_nnz, 1, N, n_rows, crow_ptr, bias_ptr, y_ptr, 0, stride_yn, BN,
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
        scales_ptr = tl.where(is_gate, gate_scales_ptr, scales_ptr)
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
    if QUANTIZED:  # the tile's rows times their scales (exact in fp32 up to one rounding)
        acc *= tl.load(scales_ptr + tile.to(tl.int64) * BN + offs_n)[None, :]
    offs_m = tl.arange(0, 1)
    if tiles_in_row == 1:
        if GATED:
            finish_gated_row(tl.where(is_gate, 0.0, acc), tl.where(is_gate, acc, 0.0), row, N, bias_ptr,
                              gate_bias_ptr, y_ptr, stride_yn, BN, HAS_BIAS, HAS_GATE_BIAS, ACTIVATION)  # fmt: skip
        else:
            finish_row(acc, row, offs_m, 1, N, bias_ptr, y_ptr, 0, stride_yn, BN, HAS_BIAS, ACTIVATION)
    else:
        tl.store(partial_ptr + pid.to(tl.int64) * BN + offs_n[None, :], acc)
        tl.debug_barrier()  # every thread's part of the partial is stored before the counter says so (release)
        if tl.atomic_add(arrived_ptr + row, 1, sem="acq_rel") == tiles_in_row - 1:
            tl.store(arrived_ptr + row, 0)  # leave the counter as found: the next call needs it zero
            total = _row_partials(partial_ptr, row_start, row_end, offs_n, BN, REDUCE_CHUNK)
            if GATED:
                gate_total = _row_partials(partial_ptr, nnz + gate_start, nnz + gate_end, offs_n, BN, REDUCE_CHUNK)
                finish_gated_row(total, gate_total, row, N, bias_ptr, gate_bias_ptr, y_ptr, stride_yn, BN,
                                  HAS_BIAS, HAS_GATE_BIAS, ACTIVATION)  # fmt: skip
            else:
                finish_row(total, row, offs_m, 1, N, bias_ptr, y_ptr, 0, stride_yn, BN, HAS_BIAS, ACTIVATION)


def spmm_one_token(
    x2: torch.Tensor,
    w: BlockSparseMatrix,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    config: dict | None = None,
    gate: BlockSparseMatrix | None = None,
    gate_bias: torch.Tensor | None = None,
    dependent: int = 0,
) -> torch.Tensor:
    """``act(x2 · wᵀ + bias)`` for x2 ``(1, K)``: ``(1, N)``, one program per stored tile; with ``gate`` (tiled
    like ``w``), ``act(x2 · gateᵀ + gate_bias) ⊙ (x2 · wᵀ + bias)`` in the same launch.

    ``dependent`` 1 or 2 (Hopper and later; else ignored): a programmatic dependent launch, scheduled while the
    previous kernel finishes, in the kernel's ``DEPENDENT`` mode of that number (2 only where the previous launch
    on this stream was this kernel in mode 1 or 2, whose wait covered any writer of ``w``).
    """
    (n, k), (bn, bk), (n_rows, _) = w.shape, w.block_shape, w.block_grid
    bias, gate_bias = _flat(bias), _flat(gate_bias)
    gate_nnz = 0 if gate is None else gate.nnz
    y = torch.empty((1, n), device=x2.device, dtype=x2.dtype)
    partial = torch.empty((w.nnz + gate_nnz, bn), device=x2.device, dtype=torch.float32)
    unused = y  # for pointer arguments the kernel does not read
    gate_arrays = (unused,) * 4 if gate is None else _arrays(gate)
    quantized = w.scales is not None
    if gate is not None and (gate.scales is not None) != quantized:
        raise ValueError("gate and up must both be quantized or both not")
    scales = (w.scales, gate.scales if gate is not None else None) if quantized else (None, None)
    args = (
        x2, *_arrays(w), bias if bias is not None else unused, *gate_arrays,
        gate_bias if gate_bias is not None else unused, *(s if s is not None else unused for s in scales),
        partial, arrival_counters(x2.device, n_rows), y,
        n, k, w.nnz, gate_nnz, n_rows, x2.stride(1), y.stride(1),
    )  # fmt: skip
    grid = (w.nnz + gate_nnz + cdiv(n_rows, EMPTY_ROWS_PER_PROGRAM),)
    meta = {
        "BN": bn,
        "BK": bk,
        "EMPTY_ROWS_PER_PROGRAM": EMPTY_ROWS_PER_PROGRAM,
        "REDUCE_CHUNK": REDUCE_CHUNK,
        "HAS_BIAS": bias is not None,
        "HAS_GATE_BIAS": gate_bias is not None,
        "ACTIVATION": ACTIVATION_CODES[activation],
        "GATED": gate is not None,
        "EVEN_K": k % bk == 0,
        "QUANTIZED": quantized,
        **_dependent_launch(x2.device, dependent),
        **(config or ONE_TOKEN_LAUNCH),
    }
    prepared.allocated(y, partial)
    prepared.launch(_one_token_kernel, grid, args, meta)
    return y


# The one-token MLP's two launches are programmatic dependent launches (False: plain, for A/B runs). A one-token
# `spmm` alone is not: back to back on Llama-8B's projections it ran 15% slower so
# (benchmarks/diagnose/one_token_mlp_pdl.py).
PROGRAMMATIC_LAUNCH = True


def _dependent_launch(device: torch.device, dependent: int) -> dict:
    """The one-token kernel's ``DEPENDENT`` mode and launch option on ``device`` (see ``spmm_one_token``)."""
    if dependent == 0 or device.type != "cuda" or not hopper_or_later(device):
        return {"DEPENDENT": 0}
    return {"DEPENDENT": dependent, "launch_pdl": True}


def _arrays(w: BlockSparseMatrix) -> tuple[torch.Tensor, ...]:
    """What the one-token kernel reads of a matrix: values, row pointers, block columns, each tile's block row."""
    return w.values, w.crow_indices, w.col_indices, w.row_indices_of_block


def one_token_mlp(x2: torch.Tensor, weights: MLPWeights, activation: str | None) -> torch.Tensor:
    """A whole MLP for one token in two launches of the one-token kernel: the hidden activation (gated: gate, up
    and their product at once), then down, whose tiles stream while the first launch finishes. x2 ``(1, K)`` ->
    ``(1, N)``; up and gate logical ``(H, K)`` tiled alike, down ``(N, H)``."""
    first, second = (1, 2) if PROGRAMMATIC_LAUNCH else (0, 0)
    up, down, gate, up_bias, down_bias, gate_bias = weights
    if gate is None:
        hidden = spmm_one_token(x2, up, up_bias, activation, dependent=first)
    else:
        hidden = gated_one_token(x2, up, gate, up_bias, gate_bias, activation, dependent=first)
    return spmm_one_token(hidden, down, down_bias, dependent=second)


def _flat(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A bias as the kernels read it: one contiguous array."""
    return None if bias is None else bias.contiguous()


def gated_one_token(
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
    ``dependent``: as in ``spmm_one_token``."""
    if x2.shape[0] != 1:
        raise ValueError(f"the gated one-token kernel takes one row of x, got {x2.shape[0]}")
    if gate.shape != up.shape or gate.block_shape != up.block_shape:
        raise ValueError(f"gate {tuple(gate.shape)} in blocks {gate.block_shape} must be tiled like up "
                         f"{tuple(up.shape)} in blocks {up.block_shape}")  # fmt: skip
    return spmm_one_token(x2, up, up_bias, activation, None, gate, gate_bias, dependent)
