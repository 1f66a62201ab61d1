"""Pieces every kernel shares: the gather of x's columns, the fused activations (and their derivatives), the bias
gradient's partial sums, the fp32 dot precision and the device facts (SM count, Hopper or later)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sparseblocks.backend import fp32_dot_precision, triton_interpreting

ACTIVATION_CODES = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}


@triton.jit
def load_x_columns(x_rows, row_in_range, columns, width, stride_xk, EVEN: tl.constexpr):
    """x at ``columns`` (one tile's ``(BK,)`` column numbers) of the rows ``x_rows`` ``(BLOCK_M, 1)``, zero outside.

    ``EVEN``: ``width`` is a multiple of the tile, so no column mask: the loads stay 16 bytes wide.
    """
    if EVEN:
        return tl.load(x_rows + columns[None, :] * stride_xk, mask=row_in_range, other=0.0)
    return tl.load(x_rows + columns[None, :] * stride_xk, mask=row_in_range & (columns[None, :] < width), other=0.0)


@triton.jit
def accumulate_dot(acc, a, b, DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``acc + a · b`` on the tensor cores, fp32 accumulation. ``DOT_IN_FP32``: the operands go in as fp32 (set
    under the Triton interpreter for bf16, which its dot does not take)."""
    if DOT_IN_FP32:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def accumulate_tile(acc, x_tile, w_tile, scales_ptr, tile, BN: tl.constexpr, QUANTIZED: tl.constexpr,
                    DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):  # fmt: skip
    """``acc + x_tile · w_tileᵀ`` for a ``(BLOCK_M, BK)`` x tile and a stored ``(BN, BK)`` tile, fp32 accumulation.

    ``QUANTIZED``: the tile is int8 or fp8 e4m3, stored tile number ``tile`` of a matrix whose scales
    ``(nnz, BN)`` float32 start at ``scales_ptr``. It goes into the dot in x's dtype (exact: |q| ≤ 127 and every
    e4m3 value are bf16 and fp16 values; fp8 × fp8 where x is fp8 too, W8A8), and the tile's fp32 product is scaled
    by its row scales before it is added: exact, where scaling the tile first would round it to x's dtype."""
    # One return, after the branches: the compiler (Triton 3.6) also compiles code after a return inside a
    # constexpr branch, so an early return would still send int8 tiles into the unquantized dot and fail there
    # (the interpreter, which runs plain Python, never saw it).
    if QUANTIZED:
        scale = tl.load(scales_ptr + tl.cast(tile, tl.int64) * BN + tl.arange(0, BN))
        if DOT_IN_FP32:  # straight to fp32 (exact): the interpreter converts int8 to bf16 wrongly
            a, b = x_tile.to(tl.float32), tl.trans(w_tile.to(tl.float32))
        else:
            a, b = x_tile, tl.trans(w_tile.to(x_tile.dtype))
        acc = acc + tl.dot(a, b, tl.zeros_like(acc), input_precision=INPUT_PRECISION) * scale[None, :]
    else:
        acc = accumulate_dot(acc, x_tile, tl.trans(w_tile), DOT_IN_FP32, INPUT_PRECISION)
    return acc


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


@triton.jit
def add_bias(acc, bias_ptr, offs_out, width):
    """``acc`` ``(BLOCK_M, OUT_B)`` fp32 plus the bias at ``offs_out`` (zero past ``width``)."""
    return acc + tl.load(bias_ptr + offs_out, mask=offs_out < width, other=0.0).to(tl.float32)[None, :]


@triton.jit
def gated_product(gate, up, ACTIVATION: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """A gated MLP's hidden tile ``act(gate) ⊙ up`` from the fp32 pre-activations (biases added), in fp32.

    ``act(gate)`` and ``up`` are rounded to ``OUT_DTYPE`` first, where the unfused path stores them (two ``spmm``
    outputs, then an elementwise product in that dtype), so every path gives the same numbers."""
    gate = apply_activation(gate, ACTIVATION).to(OUT_DTYPE).to(tl.float32)
    return gate * up.to(OUT_DTYPE).to(tl.float32)


@triton.jit
def activation_grad(z, ACTIVATION: tl.constexpr):
    """d activation / dz on an fp32 tile of pre-activations (``ACTIVATION`` > 0)."""
    tl.static_assert(ACTIVATION > 0, "no activation, no activation gradient")
    if ACTIVATION == 1:
        d = tl.where(z > 0, 1.0, 0.0)
    elif ACTIVATION == 2:
        d = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACTIVATION == 3:
        tanh = 2.0 * tl.sigmoid(2.0 * 0.7978845608028654 * (z + 0.044715 * z * z * z)) - 1.0
        slope = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        d = 0.5 * (1.0 + tanh) + 0.5 * z * (1.0 - tanh * tanh) * slope
    else:
        sigmoid = tl.sigmoid(z)
        d = sigmoid * (1.0 + z * (1.0 - sigmoid))
    return d


@triton.jit
def store_column_sums(row_ptr, tile, offs_out, width):
    """``tile``'s column sums (fp32) at ``row_ptr + offs_out``, the columns inside ``width``: one M tile's share
    of a bias gradient, summed over M tiles in a fixed order afterwards."""
    tl.store(row_ptr + offs_out, tl.sum(tile, axis=0), mask=offs_out < width)


@functools.cache
def hopper_or_later(device: torch.device) -> bool:
    """Whether a CUDA device is sm_90 or newer (TMA descriptors, programmatic dependent launch)."""
    return torch.cuda.get_device_capability(device)[0] >= 9


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device; 2 elsewhere (the interpreter: a small count, so that tests still split work)."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """The ``DOT_IN_FP32`` constexpr: 16-bit tiles go into ``tl.dot`` as fp32 under the interpreter, which
    multiplies bf16 operands wrongly (triton-lang/triton#11584) and sums fp16 products in fp16, where a GPU sums in
    fp32 (exact: 16-bit -> fp32 loses nothing)."""
    return dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn) and triton_interpreting()


# The interpreter runs one fixed, small config: tuning there would only time Python.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "num_warps": 4, "num_stages": 1}


def launch_config(config: dict | None, interpreted: dict = INTERPRETER_CONFIG) -> dict | None:
    """The config a launch runs with: the caller's, else ``interpreted`` under the interpreter, else None (tune)."""
    if config is None and triton_interpreting():
        return interpreted
    return config


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: for fp32 inputs :func:`~sparseblocks.backend.fp32_dot_precision` (by default what
    ``torch.backends.cuda.matmul.allow_tf32`` says, as dense does); ignored for 16-bit inputs."""
    return fp32_dot_precision() if dtype == torch.float32 else "tf32"
