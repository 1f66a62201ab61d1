"""The row kernel of ``kernels/spmm.py`` with tensor descriptors: X (or dY), W and Y tiles move through the Hopper
bulk-copy engine (TMA) instead of per-thread pointer loads.

Same work split and the same four modes (forward, its activation gradient, the input gradient through W's
transposed index, the gated forward): one program per (M tile, block row of W, or block column when
``TRANSPOSED``), heaviest first, block-row-fastest numbering. What changes is how the bytes move: a descriptor
load is one instruction per tile whatever its shape, so a program holds no ``(BLOCK_M, BK)`` address tensor and the
copies run ahead of the products asynchronously; ragged edges are the copy engine's zero fill and clipped store
instead of masks.
Measured on an H200 (``benchmarks/tune/spmm.py``, ``benchmarks/notes/spmm.md``): 1.1-1.2x faster than the pointer
kernel.

Needs what TMA needs (``dispatch.descriptors_fit``): a GPU with the copy engine (Hopper on), 16-byte aligned bases
and row strides, unit column strides, at least one stored tile; and 16-bit data, or fp32 in the forward mode with its
products on the tensor cores (TF32, tf32x3), where this version ran 1.14-1.44x faster than the pointer kernel.
IEEE fp32 (products on the CUDA cores) ran 5-15x slower here than there on an H200 (ViT-B/16 fp32 MLPs: 519
against 1925 images/s for PyTorch's BSR path) and takes the pointer kernel, as does every other input.
"""

from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sparseblocks.format import BlockSparseMatrix
from sparseblocks.kernels import prepared
from sparseblocks.kernels.epilogue import (
    accumulate_dot,
    accumulate_tile,
    activation_grad,
    add_bias,
    apply_activation,
    gated_product,
    store_column_sums,
)
from sparseblocks.kernels.row_launch import RowGeometry, RowLaunch
from sparseblocks.kernels.tuning import autotune_row_kernel, cdiv, density_bucket, m_bucket, m_tile_grid


@triton.jit
def _block_row_product(x_desc, w_desc, idx_ptr, perm_ptr, start, end, m0, BN: tl.constexpr, BK: tl.constexpr,
                       TRANSPOSED: tl.constexpr, BLOCK_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                       DOT_IN_FP32: tl.constexpr, scales_ptr, QUANTIZED: tl.constexpr):  # fmt: skip
    """X's M tile at row ``m0`` times the stored tiles ``start:end`` of one block row of W (one block column when
    ``TRANSPOSED``): an fp32 ``(BLOCK_M, OUT_B)`` tile, zero for an empty row."""
    OUT_B: tl.constexpr = BK if TRANSPOSED else BN
    IN_B: tl.constexpr = BN if TRANSPOSED else BK
    # Indices are loaded one tile ahead (see ``kernels/few_tokens.py``): with a copy's coordinate loaded in the same
    # iteration, Triton 3.6 kept two buffers per operand whatever num_stages; now it keeps num_stages.
    in_block = tl.load(idx_ptr + start, mask=start < end, other=0)
    tile = tl.load(perm_ptr + start, mask=start < end, other=0) if TRANSPOSED else start
    acc = tl.zeros((BLOCK_M, OUT_B), dtype=tl.float32)
    for j in range(start, end):
        has_next = j + 1 < end
        next_in_block = tl.load(idx_ptr + j + 1, mask=has_next, other=0)
        next_tile = tl.load(perm_ptr + j + 1, mask=has_next, other=0) if TRANSPOSED else j + 1
        x_tile = x_desc.load([m0, in_block * IN_B])
        w_tile = w_desc.load([tile * BN, 0])
        if TRANSPOSED:
            acc = accumulate_dot(acc, x_tile, w_tile, DOT_IN_FP32, INPUT_PRECISION)
        else:
            acc = accumulate_tile(acc, x_tile, w_tile, scales_ptr, tile, BN, QUANTIZED, DOT_IN_FP32, INPUT_PRECISION)
        in_block, tile = next_in_block, next_tile
    return acc


@triton.jit(do_not_specialize=["M", "IN", "M_BUCKET", "DENSITY_BUCKET"])
def _spmm_tma_kernel(
    x_desc,  # (M, IN), box (BLOCK_M, IN_B): X for the forward, dY for the input gradient
    w_desc,  # (nnz · BN, BK): the stored tiles stacked, box (BN, BK)
    grad_desc,  # (M, OUT), box (BLOCK_M, OUT_B): dY, read in the GRAD_EPILOGUE mode only; with GRAD_FROM_PRODUCT
    #             the next layer's dY (M, N2), box (BLOCK_M, BN2)
    w2_desc,  # GRAD_FROM_PRODUCT only: the next layer's tiles stacked, (nnz2 · BN2, OUT_B), box (BN2, OUT_B)
    y_desc,  # (M, OUT), box (BLOCK_M, OUT_B)
    gate_desc,  # GATED only: the gate's tiles stacked, (gate nnz · BN, BK), box (BN, BK)
    bias_grad_ptr,  # (M tiles, OUT) fp32: column sums of each M tile's dZ, written in the BIAS_GRAD mode only
    ptr_ptr,  # (n_out_blocks + 1,) int32: crow_indices, or ccol_indices when TRANSPOSED
    idx_ptr,  # (nnz,) int32: col_indices, or row_indices when TRANSPOSED
    perm_ptr,  # (nnz,) int32: transpose_perm when TRANSPOSED, else unused
    order_ptr,  # (n_out_blocks,) int32: row_order, or col_order when TRANSPOSED
    bias_ptr,  # (OUT,) or unused
    ccol2_ptr,  # GRAD_FROM_PRODUCT only, the next layer's (n2_block_cols + 1,) ccol_indices,
    row2_ptr,  # (nnz2,) row_indices
    perm2_ptr,  # and (nnz2,) transpose_perm
    gate_crow_ptr,  # GATED only: the gate's (n_out_blocks + 1,) crow_indices,
    gate_col_ptr,  # (gate nnz,) col_indices
    gate_bias_ptr,  # and (OUT,) bias (HAS_GATE_BIAS)
    scales_ptr,  # QUANTIZED only: W's (nnz, BN) float32 scales,
    gate_scales_ptr,  # the gate's (gate nnz, BN)
    x_scales_ptr,  # X_FP8 only: (M,) float32 scales of X's rows
    M,
    OUT,
    n_out_blocks,
    # autotuning keys only (reduction width, shape bucket, density bucket)
    IN,
    M_BUCKET,
    DENSITY_BUCKET,
    BN: tl.constexpr,
    BK: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GRAD_EPILOGUE: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    GRAD_FROM_PRODUCT: tl.constexpr,  # the dY of the epilogue is dY2 · W2 over W2's block column, never stored
    BN2: tl.constexpr,  # W2's block height (GRAD_FROM_PRODUCT only)
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    GATED: tl.constexpr,  # forward only: Y = act(X·Wgᵀ + bg) ⊙ (X·Wᵀ + b), W the up projection, Wg the gate
    HAS_GATE_BIAS: tl.constexpr,
    QUANTIZED: tl.constexpr,  # int8 / fp8 tiles with scales per tile row (forward and gated only)
    X_FP8: tl.constexpr,  # X quantized to fp8 per row (W8A8, forward only)
):
    OUT_B: tl.constexpr = BK if TRANSPOSED else BN
    pid = tl.program_id(0)
    m0 = (pid // n_out_blocks) * BLOCK_M
    out_block = tl.load(order_ptr + pid % n_out_blocks)
    start = tl.load(ptr_ptr + out_block)
    end = tl.load(ptr_ptr + out_block + 1)
    if GRAD_FROM_PRODUCT:  # an MLP's hidden gradient dH = dY2 · W2, one (BLOCK_M, OUT_B) tile, kept on chip
        grad_tile = tl.zeros((BLOCK_M, OUT_B), dtype=tl.float32)
        start2, end2 = tl.load(ccol2_ptr + out_block), tl.load(ccol2_ptr + out_block + 1)
        row2 = tl.load(row2_ptr + start2, mask=start2 < end2, other=0)  # indices one tile ahead, as below
        tile2 = tl.load(perm2_ptr + start2, mask=start2 < end2, other=0)
        for j2 in range(start2, end2):
            next_row2 = tl.load(row2_ptr + j2 + 1, mask=j2 + 1 < end2, other=0)
            next_tile2 = tl.load(perm2_ptr + j2 + 1, mask=j2 + 1 < end2, other=0)
            dy2_tile = grad_desc.load([m0, row2 * BN2])
            w2_tile = w2_desc.load([tile2 * BN2, 0])
            grad_tile = accumulate_dot(grad_tile, dy2_tile, w2_tile, DOT_IN_FP32, INPUT_PRECISION)
            row2, tile2 = next_row2, next_tile2
    elif GRAD_EPILOGUE:  # issued before the loop, so its latency hides behind the products
        grad_tile = grad_desc.load([m0, out_block * OUT_B])

    acc = _block_row_product(x_desc, w_desc, idx_ptr, perm_ptr, start, end, m0, BN, BK, TRANSPOSED, BLOCK_M,
                             INPUT_PRECISION, DOT_IN_FP32, scales_ptr, QUANTIZED)  # fmt: skip
    if X_FP8:  # the products were of the rows divided by their scales
        offs_m = m0 + tl.arange(0, BLOCK_M)
        acc *= tl.load(x_scales_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    if GATED:  # the gate's own block row: it may store other tiles than up's, or none
        gate = _block_row_product(x_desc, gate_desc, gate_col_ptr, gate_col_ptr, tl.load(gate_crow_ptr + out_block),
                                  tl.load(gate_crow_ptr + out_block + 1), m0, BN, BK, False, BLOCK_M,
                                  INPUT_PRECISION, DOT_IN_FP32, gate_scales_ptr, QUANTIZED)  # fmt: skip

    offs_out = out_block * OUT_B + tl.arange(0, OUT_B)
    if HAS_BIAS:
        acc = add_bias(acc, bias_ptr, offs_out, OUT)
    if GRAD_EPILOGUE:
        acc = grad_tile.to(tl.float32) * activation_grad(acc, ACTIVATION)
        if BIAS_GRAD:  # rows past M hold zeros (the copy engine filled their dY with 0)
            store_column_sums(bias_grad_ptr + (pid // n_out_blocks) * OUT, acc, offs_out, OUT)
    elif GATED:
        if HAS_GATE_BIAS:
            gate = add_bias(gate, gate_bias_ptr, offs_out, OUT)
        acc = gated_product(gate, acc, ACTIVATION, y_desc.dtype)
    else:
        acc = apply_activation(acc, ACTIVATION)
    y_desc.store([m0, out_block * OUT_B], acc.to(y_desc.dtype))


def _set_boxes(nargs: dict) -> None:
    """Autotuner pre-hook: the boxes along M follow the config's BLOCK_M."""
    for name in ("x_desc", "grad_desc", "y_desc"):
        nargs[name].block_shape = [nargs["BLOCK_M"], nargs[name].block_shape[1]]


# (BLOCK_M, num_warps, num_stages). Two stages too: at blocks of 128 with BLOCK_M 64, two buffers of X and W (96 KB)
# leave room for two programs per SM, three for one. Without them ViT-B fc1 at 90%/b128 ran 20% slower than before
# the indices were loaded a tile ahead; with them, 2% faster (bench spmm, H200).
LAUNCH_CONFIGS = [(64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 4, 3), (128, 4, 4), (128, 4, 5), (128, 8, 3),
                  (256, 8, 3), (256, 8, 4)]  # fmt: skip
spmm_tma_tuned = autotune_row_kernel(  # no cache_results: not kept for configs with a pre-hook
    _spmm_tma_kernel,
    LAUNCH_CONFIGS,
    pre_hook=_set_boxes,
    extra_key=("GRAD_FROM_PRODUCT", "BN2"),
)


_context_bound = threading.local()  # .devices: indices of the devices whose context this thread has made current


def _bind_context(device: torch.device) -> None:
    """Make ``device``'s CUDA context current on this thread, once per thread and device.

    The host encodes descriptors through the CUDA driver, which fails ("invalid device context") on a thread where
    no context is current yet. PyTorch runs a backward on its own thread, whose first CUDA work can be this kernel
    (``layer(x).backward(g)``); any CUDA runtime call binds the device's primary context to the calling thread.
    """
    devices = _context_bound.__dict__.setdefault("devices", set())
    if device.index not in devices:
        torch.cuda.mem_get_info(device)
        devices.add(device.index)


def launch_tma(
    x2: torch.Tensor,
    w: BlockSparseMatrix,
    spec: RowLaunch,
    geometry: RowGeometry,
    meta: dict,
    config: dict | None,
    bias_grad_parts: torch.Tensor | None,
) -> tuple[torch.Tensor, int]:
    """``_spmm_tma_kernel`` for ``spec`` on inputs that ``dispatch.descriptors_fit``; ``geometry``, ``meta`` and
    ``bias_grad_parts`` as ``kernels/spmm.py``'s ``launch_rows`` built them. In the hidden-gradient mode
    ``spec.grad`` is the next layer's output gradient and the epilogue's gradient is ``grad · W2``
    (``GRAD_FROM_PRODUCT``). Returns ``(M, OUT)`` and the BLOCK_M it ran with."""
    m = x2.shape[0]
    if x2.is_cuda:
        _bind_context(x2.device)
    prepared.not_replayable("tensor descriptors are built per launch")
    y = torch.empty((m, geometry.out_features), device=x2.device, dtype=spec.out_dtype or x2.dtype)
    bias, gate, grad2, grad_weight = spec.bias, spec.gate, spec.grad, spec.grad_weight
    bias, gate_bias = (None if b is None else b.contiguous() for b in (bias, spec.gate_bias))  # flat arrays
    block_m = config["BLOCK_M"] if config else 64  # the tuned launch's pre-hook resets the boxes per config
    descriptor = lambda t, width: TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [block_m, width])
    tiles = lambda v: TensorDescriptor(v, [v.shape[0] * v.shape[1], v.shape[2]], [v.shape[2], 1], list(v.shape[1:]))
    w_desc = tiles(w.values)
    index = geometry.index
    buckets = (m_bucket(m), density_bucket(w.density))
    meta = {**meta, "GRAD_FROM_PRODUCT": grad_weight is not None,
            "BN2": grad_weight.block_shape[0] if grad_weight is not None else 16}  # fmt: skip
    if grad_weight is None:
        grad_desc = descriptor(grad2 if grad2 is not None else y, geometry.out_block)  # read in GRAD_EPILOGUE only
        second = (w_desc, index[0], index[1], index[1])  # never read without GRAD_FROM_PRODUCT
    else:
        grad_desc = descriptor(grad2, grad_weight.block_shape[0])
        second = (tiles(grad_weight.values), grad_weight.ccol_indices, grad_weight.row_indices,
                  grad_weight.transpose_perm)  # fmt: skip
    args = (
        descriptor(x2, geometry.in_block),
        w_desc,
        grad_desc,
        second[0],
        descriptor(y, geometry.out_block),
        tiles(gate.values) if gate is not None else w_desc,  # never read without GATED
        bias_grad_parts if bias_grad_parts is not None else y,  # written in the BIAS_GRAD mode only
        *index,
        bias if bias is not None else y,  # never read without HAS_BIAS
        *second[1:],
        *((gate.crow_indices, gate.col_indices) if gate is not None else index[:2]),
        gate_bias if gate_bias is not None else y,  # never read without HAS_GATE_BIAS
        w.scales if w.scales is not None else y,  # never read without QUANTIZED
        gate.scales if gate is not None and gate.scales is not None else y,
        spec.x_scales if spec.x_scales is not None else y,  # never read without X_FP8
        m,
        geometry.out_features,
        geometry.n_out_blocks,
        geometry.in_features,
        *buckets,
    )
    if config is None:
        tuning_key = (x2.dtype, w.dtype, geometry.out_features, geometry.in_features, *buckets)
        launched = spmm_tma_tuned.launch(tuning_key, m_tile_grid(m, geometry.n_out_blocks), args, meta)
        return y, launched.kwargs["BLOCK_M"]
    _spmm_tma_kernel[(cdiv(m, block_m) * geometry.n_out_blocks,)](*args, **meta, **config)
    return y, block_m
