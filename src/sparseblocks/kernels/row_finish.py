"""What both decode kernels (``kernels/few_tokens.py``, ``kernels/one_token.py``) do with a finished block row of
Y — bias, activation (or the gated product), store —, the empty block rows they write, and the arrival counters of
rows cut between programs.

The arrival counters are kept between calls (:func:`arrival_counters`): every kernel leaves them zero, so a call
costs one kernel launch and no memset.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparseblocks.kernels import prepared
from sparseblocks.kernels.epilogue import apply_activation, gated_product

EMPTY_ROWS_PER_PROGRAM = 32


@triton.jit
def with_bias(acc, offs_n, in_bounds, bias_ptr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    """act(acc + bias) on an fp32 ``(BLOCK_M, BN)`` tile of Y whose columns are ``offs_n``."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=in_bounds, other=0.0).to(tl.float32)[None, :]
    return apply_activation(acc, ACTIVATION)


@triton.jit
def store_row(value, row, offs_m, M, N, y_ptr, stride_ym, stride_yn, BN: tl.constexpr, write=True):
    """Store one fp32 ``(BLOCK_M, BN)`` tile of Y, block row ``row`` (a no-op where ``write`` is False)."""
    offs_n = row * BN + tl.arange(0, BN)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = (offs_m[:, None] < M) & ((offs_n < N) & write)[None, :]
    tl.store(y_ptrs, value.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def finish_row(acc, row, offs_m, M, N, bias_ptr, y_ptr, stride_ym, stride_yn, BN: tl.constexpr,
                HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, write=True):  # fmt: skip
    """Bias, activation and store of one ``(BLOCK_M, BN)`` tile of Y (a no-op where ``write`` is False)."""
    offs_n = row * BN + tl.arange(0, BN)
    value = with_bias(acc, offs_n, (offs_n < N) & write, bias_ptr, HAS_BIAS, ACTIVATION)
    store_row(value, row, offs_m, M, N, y_ptr, stride_ym, stride_yn, BN, write)


@triton.jit
def finish_gated_row(up, gate, row, N, bias_ptr, gate_bias_ptr, y_ptr, stride_yn, BN: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_GATE_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):  # fmt: skip
    """One token's block row of act(gate + b_gate) ⊙ (up + b) from both ``(1, BN)`` fp32 sums, through
    ``epilogue.gated_product`` as on every path."""
    offs_n = row * BN + tl.arange(0, BN)
    in_bounds = offs_n < N
    gate = with_bias(gate, offs_n, in_bounds, gate_bias_ptr, HAS_GATE_BIAS, 0)
    up = with_bias(up, offs_n, in_bounds, bias_ptr, HAS_BIAS, 0)
    value = gated_product(gate, up, ACTIVATION, y_ptr.dtype.element_ty)
    store_row(value, row, tl.arange(0, 1), 1, N, y_ptr, 0, stride_yn, BN)


@triton.jit
def write_empty_rows(group, M, N, n_rows, crow_ptr, bias_ptr, y_ptr, stride_ym, stride_yn, BN: tl.constexpr,
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
        value = gated_product(gate, value, ACTIVATION, y_ptr.dtype.element_ty)
    else:
        value = apply_activation(value, ACTIVATION)
    value = value.to(y_ptr.dtype.element_ty)
    for m in range(M):
        tl.store(y_ptr + m * stride_ym + offs_n * stride_yn, value, mask=write)


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
    prepared.persistent(_COUNTERS[key])  # a replay on this stream may reuse its pointer
    return _COUNTERS[key]
