"""``spmm``: ``Y = activation(X · Wᵀ + bias)`` with W block-sparse, and its autograd.

Registered as ``torch.library`` custom ops with fake (meta) implementations, so ``torch.compile(fullgraph=True)``
traces around them and CUDA graphs capture them. The backward is written in the same vocabulary:

* ``sparseblocks::spmm``             Y  = act(X Wᵀ + b)     (dense · sparseᵀ -> dense)
* ``sparseblocks::spmm_activation_grad`` dZ = dY ⊙ act'(X Wᵀ + b)  (Z recomputed tile by tile, never stored)
* ``sparseblocks::spmm_input_grad``  dX = dZ W             (dense · sparse  -> dense, through W's transposed index)
* ``sparseblocks::sddmm``            dW = dZᵀ X on W's pattern (dense · dense -> sparse)

where dZ is the gradient before the activation.
Each op runs a Triton kernel on CUDA tensors and the plain PyTorch reference (``sparseblocks.reference``) elsewhere.
"""

# No `from __future__ import annotations` here: torch.library reads these annotations at run time.

import torch

from sparseblocks import reference
from sparseblocks.backend import use_triton
from sparseblocks.format import BlockSparseMatrix

# The order in which a matrix's index arrays travel through the custom ops (as one list[Tensor]).
INDEX_NAMES = (
    "crow_indices",
    "col_indices",
    "row_indices_of_block",
    "ccol_indices",
    "row_indices",
    "transpose_perm",
    "row_order",
    "col_order",
)


def _matrix(values: torch.Tensor, index: list[torch.Tensor], shape: list[int]) -> BlockSparseMatrix:
    return BlockSparseMatrix.from_parts(values, shape, dict(zip(INDEX_NAMES, index, strict=False)))


# ---------------------------------------------------------------------------------------------- forward


@torch.library.custom_op("sparseblocks::spmm", mutates_args=())
def _spmm_op(
    x: torch.Tensor,
    values: torch.Tensor,
    index: list[torch.Tensor],
    shape: list[int],
    bias: torch.Tensor | None,
    activation: str | None,
) -> torch.Tensor:
    w = _matrix(values, index, shape)
    if use_triton(x):
        from sparseblocks.kernels.spmm import spmm_triton

        return spmm_triton(x, w, bias, activation)
    return reference.spmm(x, w, bias, activation)


@_spmm_op.register_fake
def _(x, values, index, shape, bias, activation):
    return x.new_empty((*x.shape[:-1], shape[0]))


# ---------------------------------------------------------------------------------------------- backward


@torch.library.custom_op("sparseblocks::spmm_activation_grad", mutates_args=())
def _spmm_activation_grad_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    index: list[torch.Tensor],
    shape: list[int],
    bias: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    w = _matrix(values, index, shape)
    if use_triton(x):
        from sparseblocks.kernels.spmm import spmm_activation_grad_triton

        return spmm_activation_grad_triton(grad_out, x, w, bias, activation)
    return reference.spmm_activation_grad(grad_out, x, w, bias, activation)


@_spmm_activation_grad_op.register_fake
def _(grad_out, x, values, index, shape, bias, activation):
    return grad_out.new_empty(grad_out.shape)


@torch.library.custom_op("sparseblocks::spmm_input_grad", mutates_args=())
def _spmm_input_grad_op(
    grad_out: torch.Tensor, values: torch.Tensor, index: list[torch.Tensor], shape: list[int]
) -> torch.Tensor:
    w = _matrix(values, index, shape)
    if use_triton(grad_out):
        from sparseblocks.kernels.spmm import spmm_input_grad_triton

        return spmm_input_grad_triton(grad_out, w)
    return reference.spmm_input_grad(grad_out, w)


@_spmm_input_grad_op.register_fake
def _(grad_out, values, index, shape):
    return grad_out.new_empty((*grad_out.shape[:-1], shape[1]))


@torch.library.custom_op("sparseblocks::sddmm", mutates_args=())
def _sddmm_op(
    grad_out: torch.Tensor, x: torch.Tensor, values: torch.Tensor, index: list[torch.Tensor], shape: list[int]
) -> torch.Tensor:
    """The gradient of ``values``; ``values`` itself only says the tile shape and dtype."""
    w = _matrix(values, index, shape)
    if use_triton(x):
        from sparseblocks.kernels.sddmm import sddmm_triton

        return sddmm_triton(grad_out, x, w)
    return reference.sddmm(grad_out, x, w)


@_sddmm_op.register_fake
def _(grad_out, x, values, index, shape):
    return torch.empty_like(values)


def _setup_context(ctx, inputs, output):
    x, values, index, shape, bias, activation = inputs
    ctx.save_for_backward(x, values, bias, *index)
    ctx.shape, ctx.activation = shape, activation


def _backward(ctx, grad_out):
    x, values, bias, *index = ctx.saved_tensors
    shape = ctx.shape
    if ctx.activation is not None:
        grad_out = _spmm_activation_grad_op(grad_out, x, values, index, shape, bias, ctx.activation)
    needs_x, needs_values, _, _, needs_bias, _ = ctx.needs_input_grad
    grad_x = _spmm_input_grad_op(grad_out, values, index, shape) if needs_x else None
    grad_values = _sddmm_op(grad_out, x, values, index, shape) if needs_values else None
    grad_bias = None
    if needs_bias:
        grad_bias = grad_out.reshape(-1, shape[0]).sum(0, dtype=torch.float32).to(bias.dtype)
    return grad_x, grad_values, [None] * len(index), None, grad_bias, None


_spmm_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- public


def check_spmm_inputs(x: torch.Tensor, w: BlockSparseMatrix, bias: torch.Tensor | None, activation: str | None) -> None:
    """Raise a ``ValueError`` / ``TypeError`` that names the problem with the inputs of :func:`spmm`."""
    if not isinstance(w, BlockSparseMatrix):
        raise TypeError(f"w must be a BlockSparseMatrix, got {type(w).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    n, k = w.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., K={k}) to multiply a {n}x{k} weight, got {tuple(x.shape)}")
    if x.dtype != w.dtype:
        raise ValueError(f"x is {x.dtype} but the weight is {w.dtype}; cast one of them")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but the weight is on {w.device}")
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"bias must be {x.dtype} on {x.device}, got {bias.dtype} on {bias.device}")
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(a for a in reference.ACTIVATIONS if a)} or None")


def _autocasting(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def spmm(
    x: torch.Tensor,
    w: BlockSparseMatrix,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """``activation(x · wᵀ + bias)`` for a block-sparse ``w``, like ``F.linear`` with a sparse weight.

    x: ``(..., K)`` float16/bfloat16/float32, any strides; w: logical ``(N, K)`` of x's dtype and device;
    bias: ``(N,)`` or None; activation: None, "relu", "gelu", "gelu_tanh" or "silu". Returns ``(..., N)``.
    Differentiable w.r.t. ``x``, ``w.values`` and ``bias``. Under ``torch.autocast`` the three are cast to the
    autocast dtype first, as ``F.linear`` does (the casts are differentiable, so fp32 master weights get fp32
    gradients).
    """
    if isinstance(w, BlockSparseMatrix) and isinstance(x, torch.Tensor) and _autocasting(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype) if x.is_floating_point() else x
        w = BlockSparseMatrix.from_parts(w.values.to(dtype), w.shape, w.index_tensors())
        bias = None if bias is None else bias.to(dtype)
    check_spmm_inputs(x, w, bias, activation)
    index = [getattr(w, name) for name in INDEX_NAMES]
    return _spmm_op(x, w.values, index, list(w.shape), bias, activation)
