"""Plain PyTorch versions of every op: the oracle the kernels are tested against, and the path off the GPU.

They run on any device and float dtype. Each densifies the weight (``O(N·K)`` memory) and leaves the arithmetic
to the dense BLAS, which on a CPU beats any gather-based formulation at the sizes a CPU path sees.

Quantized tiles (forward only: they are for inference): the dequantized weight (``to_dense``, float32) times x in
float32 (float64 for float64 x), bias and activation in that precision, rounded once to x's dtype, as the kernels
do; with ``fp8_activations`` x is first quantized to fp8 per token (``format.quantize_rows``) and dequantized.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sparseblocks.format import BlockSparseMatrix, MLPWeights, quantize_rows

ACTIVATIONS = {
    None: lambda y: y,
    "relu": F.relu,
    "gelu": F.gelu,  # the exact (erf) form, nn.GELU()'s default
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "silu": F.silu,
}


def spmm(
    x: torch.Tensor, w: BlockSparseMatrix, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """``activation(x · wᵀ + bias)``: x ``(..., K)``, w logical ``(N, K)``, bias ``(N,)`` -> ``(..., N)``."""
    if w.scales is not None:
        return quantized_spmm(x, w, bias, activation)
    return ACTIVATIONS[activation](F.linear(x, w.to_dense(), bias))


def quantized_spmm(
    x: torch.Tensor, w: BlockSparseMatrix, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """:func:`spmm` for quantized tiles (see the module docstring): ``(..., N)`` of x's dtype."""
    out_dtype, precise = x.dtype, torch.promote_types(x.dtype, torch.float32)
    if w.fp8_activations:  # W8A8: the products see x as its per-token fp8 quantization
        x2, scales = quantize_rows(x.reshape(-1, w.shape[1]))
        x = (x2.to(torch.float32) * scales[:, None]).reshape(x.shape)
    y = F.linear(x.to(precise), w.to_dense().to(precise), None if bias is None else bias.to(precise))
    return ACTIVATIONS[activation](y).to(out_dtype)


def spmm_activation_grad(
    grad_out: torch.Tensor, x: torch.Tensor, w: BlockSparseMatrix, bias: torch.Tensor | None, activation: str
) -> torch.Tensor:
    """The gradient before the activation, ``dY ⊙ act'(x · wᵀ + bias)``: ``(..., N)``.

    ``act'`` and the product are computed in fp32 (float64 for float64) and rounded once, as PyTorch's own
    activation backwards do: in bf16 arithmetic they had 1.3-2.3x the error of PyTorch's.
    """
    z = F.linear(x, w.to_dense(), bias)  # (..., N), rounded to x's dtype as the forward's output is
    dtype = torch.promote_types(grad_out.dtype, z.dtype)
    precise = torch.promote_types(dtype, torch.float32)
    return (grad_out.to(precise) * ACTIVATION_GRADS[activation](z.to(precise))).to(dtype)


def spmm_input_grad(grad_out: torch.Tensor, w: BlockSparseMatrix) -> torch.Tensor:
    """Input gradient ``dY · W``: grad_out ``(..., N)`` -> ``(..., K)``."""
    return grad_out @ w.to_dense()


def sddmm(grad_out: torch.Tensor, x: torch.Tensor, w: BlockSparseMatrix) -> torch.Tensor:
    """Weight gradient on w's pattern: the tiles of ``dYᵀ · X`` where w stores one, ``(nnz, bn, bk)``.

    grad_out ``(..., N)`` and x ``(..., K)`` share their leading dims; the padding of ragged tiles is zero.
    """
    (n, k), (bn, bk), (rows, cols) = w.shape, w.block_shape, w.block_grid
    grad_weight = grad_out.reshape(-1, n).t() @ x.reshape(-1, k)  # (N, K)
    grad_weight = F.pad(grad_weight, (0, cols * bk - k, 0, rows * bn - n))
    tiles = grad_weight.reshape(rows, bn, cols, bk).transpose(1, 2)  # (N_blocks, K_blocks, bn, bk)
    return tiles[w.row_indices_of_block.long(), w.col_indices.long()]


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))
    pdf = torch.exp(-0.5 * z * z) * 0.3989422804014327
    return cdf + z * pdf


def _gelu_tanh_grad(z: torch.Tensor) -> torch.Tensor:
    inner = 0.7978845608028654 * (z + 0.044715 * z**3)
    tanh = torch.tanh(inner)
    return 0.5 * (1.0 + tanh) + 0.5 * z * (1.0 - tanh * tanh) * 0.7978845608028654 * (1.0 + 3 * 0.044715 * z * z)


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    sigmoid = torch.sigmoid(z)
    return sigmoid * (1.0 + z * (1.0 - sigmoid))


# d activation(z) / dz, from the pre-activation z
ACTIVATION_GRADS = {
    "relu": lambda z: (z > 0).to(z.dtype),
    "gelu": _gelu_grad,
    "gelu_tanh": _gelu_tanh_grad,
    "silu": _silu_grad,
}


def mlp(
    x: torch.Tensor,
    weights: MLPWeights,
    activation: str = "gelu",
    hidden_dropout: float = 0.0,
    product: Callable[..., torch.Tensor] = spmm,
) -> torch.Tensor:
    """A block-sparse MLP, plain ``down(drop(act(up(x))))`` or gated ``down(drop(act(gate(x)) ⊙ up(x)))``: x
    ``(..., K)``, ``weights`` as :class:`~sparseblocks.format.MLPWeights` -> ``(..., N)``.

    ``product`` computes each ``act(x · wᵀ + b)`` (``ops.spmm`` makes this the differentiable unfused path).
    """
    up, down, gate, up_bias, down_bias, gate_bias = weights
    if gate is None:
        hidden = product(x, up, up_bias, activation)
    else:
        hidden = product(x, gate, gate_bias, activation) * product(x, up, up_bias)
    return product(F.dropout(hidden, hidden_dropout, hidden_dropout > 0.0), down, down_bias)
