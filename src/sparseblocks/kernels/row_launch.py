"""What one launch of the row kernel computes (:class:`RowLaunch`), checked once, and the constexprs and index arrays
both versions of the kernel (pointer loads in ``kernels/spmm.py``, tensor descriptors in ``kernels/spmm_tma.py``)
take for it (:func:`row_arguments`)."""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch

from sparseblocks.format import BlockSparseMatrix
from sparseblocks.kernels.epilogue import ACTIVATION_CODES, dot_in_fp32, input_precision


class RowMode(enum.Enum):
    """The row kernel's modes, for ``X`` ``(M, IN)`` and W's block rows (block columns for ``INPUT_GRAD``)."""

    FORWARD = "forward"  # Y = act(X·Wᵀ + b)
    INPUT_GRAD = "input_grad"  # dX = dY·W, through W's transposed index (X is dY here)
    ACTIVATION_GRAD = "activation_grad"  # dZ = dY ⊙ act'(X·Wᵀ + b), Z recomputed tile by tile
    GATED = "gated_hidden"  # act(X·Wgᵀ + bg) ⊙ (X·Wᵀ + b): a SwiGLU's hidden activation, W the up projection
    HIDDEN_GRAD = "hidden_grad"  # dZ = (dY2·W2) ⊙ act'(X·Wᵀ + b), dY2·W2 computed on chip (descriptors only)


class RowLaunch(NamedTuple):
    """One launch of the row kernel: its mode and the tensors its epilogue reads.

    ``grad``: dY ``(M, OUT)`` for ``ACTIVATION_GRAD``, the next layer's dY2 ``(M, N2)`` for ``HIDDEN_GRAD``;
    ``bias_grad``: with those two, also dZ's fp32 column sums (the bias gradient); ``gate``/``gate_bias``: the
    gate of ``GATED`` (tiled like W); ``grad_weight``: W2 of ``HIDDEN_GRAD``; ``x_scales``: ``FORWARD`` of W8A8
    tiles only, X is the activations quantized to fp8 per row (``format.quantize_rows``) and these ``(M,)`` float32
    their scales, the output in ``out_dtype`` (the activations' dtype). :meth:`check` refuses combinations the
    kernel has no mode for; ``launch_rows`` calls it. (A named tuple: one is built per launch, where a frozen
    dataclass cost ~3 µs of CPU more.)
    """

    mode: RowMode = RowMode.FORWARD
    bias: torch.Tensor | None = None
    activation: str | None = None
    grad: torch.Tensor | None = None
    bias_grad: bool = False
    gate: BlockSparseMatrix | None = None
    gate_bias: torch.Tensor | None = None
    grad_weight: BlockSparseMatrix | None = None
    x_scales: torch.Tensor | None = None
    out_dtype: torch.dtype | None = None

    def check(self) -> RowLaunch:
        """This launch, or a ``ValueError`` naming what no mode of the kernel takes."""
        if self.x_scales is not None and (self.mode is not RowMode.FORWARD or self.out_dtype is None):
            raise ValueError("x_scales (fp8 activations) are for the forward mode, with an out_dtype")
        gradient_epilogue = self.mode in (RowMode.ACTIVATION_GRAD, RowMode.HIDDEN_GRAD)
        if (self.grad is not None) != gradient_epilogue:
            raise ValueError(f"{self.mode.value}: grad is for the activation- and hidden-gradient modes only")
        if gradient_epilogue and self.activation is None:
            raise ValueError(f"{self.mode.value} needs an activation")
        if self.bias_grad and not gradient_epilogue:
            raise ValueError("bias_grad needs the activation- or hidden-gradient mode")
        gated = self.mode is RowMode.GATED
        if (self.gate is not None) != gated or (self.gate_bias is not None and self.gate is None):
            raise ValueError("gate (and gate_bias) are for the gated mode, which needs a gate")
        if (self.grad_weight is not None) != (self.mode is RowMode.HIDDEN_GRAD):
            raise ValueError("grad_weight is for the hidden-gradient mode, which needs it")
        if self.mode is RowMode.INPUT_GRAD and (self.bias is not None or self.activation is not None):
            raise ValueError("the input gradient takes no bias and no activation")
        return self

    @property
    def transposed(self) -> bool:
        return self.mode is RowMode.INPUT_GRAD


class RowGeometry(NamedTuple):
    """The output's width and tiles of a launch, the reduction's width, and the index arrays it walks
    (row pointers, tile indices, the permutation into the values, the visiting order)."""

    out_features: int
    in_features: int
    n_out_blocks: int
    out_block: int  # the output tile's width
    in_block: int  # the reduction tile's width
    index: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def row_arguments(x2: torch.Tensor, w: BlockSparseMatrix, spec: RowLaunch) -> tuple[RowGeometry, dict]:
    """The geometry and the constexprs both versions of the row kernel share, for ``spec`` on ``x2`` ``(M, IN)``."""
    (n, k), (_, bn, bk) = w.shape, w.values.shape  # (properties of w would recompute these: ~1 µs each)
    n_block_rows, n_block_cols = -(-n // bn), -(-k // bk)
    if spec.transposed:
        index = (w.ccol_indices, w.row_indices, w.transpose_perm, w.col_order)
        geometry = RowGeometry(k, n, n_block_cols, bk, bn, index)
    else:
        index = (w.crow_indices, w.col_indices, w.col_indices, w.row_order)  # the third is never read
        geometry = RowGeometry(n, k, n_block_rows, bn, bk, index)
    if spec.gate is not None and (spec.gate.shape, spec.gate.block_shape) != (w.shape, w.block_shape):
        raise ValueError(f"gate {tuple(spec.gate.shape)} in {spec.gate.block_shape} blocks must match "
                         f"{tuple(w.shape)} in {w.block_shape} blocks")  # fmt: skip
    quantized = w.scales is not None
    if quantized and spec.mode not in (RowMode.FORWARD, RowMode.GATED):
        raise ValueError(f"quantized tiles are for inference: the {spec.mode.value} mode does not take them")
    if spec.gate is not None and (spec.gate.scales is not None) != quantized:
        raise ValueError("gate and up must both be quantized or both not")
    meta = {
        "BN": bn,
        "BK": bk,
        "TRANSPOSED": spec.transposed,
        "HAS_BIAS": spec.bias is not None,
        "ACTIVATION": ACTIVATION_CODES[spec.activation],
        "GRAD_EPILOGUE": spec.grad is not None,
        "BIAS_GRAD": spec.bias_grad,
        "INPUT_PRECISION": input_precision(x2.dtype),
        "DOT_IN_FP32": dot_in_fp32(x2.dtype),
        "GATED": spec.gate is not None,
        "HAS_GATE_BIAS": spec.gate_bias is not None,
        "QUANTIZED": quantized,
        "X_FP8": spec.x_scales is not None,
    }
    return geometry, meta
