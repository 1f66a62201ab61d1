"""``sparse_mlp``: a whole block-sparse MLP; for inference one op, ``sparseblocks::fused_mlp`` (torch.compile
traces it), which runs ``kernels/fused_mlp.py`` on CUDA (at one token, two launches of the one-token decode kernel;
for a gated MLP where the fused kernel does not pay, the row kernel's gated mode, then down) and ``reference.mlp``
elsewhere.

The fused op has no backward of its own: while gradients are needed, :func:`sparse_mlp` computes the forward as
separate products; a plain (ungated, no dropout) MLP outside torch.compile trains through ``_EagerPlainMLP``, whose
backward keeps the hidden gradient on chip, everything else through :func:`~sparseblocks.ops.spmm`'s autograd.
"""

# No `from __future__ import annotations` here: torch.library reads these annotations at run time.

import torch

from sparseblocks import reference
from sparseblocks.backend import on_device_of, triton_available, triton_interpreting, use_triton
from sparseblocks.format import INDEX_NAMES, BlockSparseMatrix
from sparseblocks.ops.library import define_op
from sparseblocks.ops.spmm import (
    _column_sums,
    _forward,
    _hidden_grad,
    _index,
    _input_grad,
    _matrix,
    _sddmm,
    autocast_inputs,
    check_spmm_inputs,
    needs_grad,
    spmm,
)


def check_mlp_shapes(up: BlockSparseMatrix, down: BlockSparseMatrix, gate: BlockSparseMatrix | None) -> None:
    """Raise a ``ValueError`` unless ``up`` (and ``gate``) ``(H, K)`` and ``down`` ``(N, H)`` chain."""
    if down.shape[1] != up.shape[0]:
        raise ValueError(f"down {tuple(down.shape)} must take up's {up.shape[0]} hidden units")
    if gate is not None and gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} must match up {tuple(up.shape)}")


def tiles_chain(up: BlockSparseMatrix, down: BlockSparseMatrix, gate: BlockSparseMatrix | None) -> bool:
    """Whether the fused kernel can take these weights: up's (and gate's) block rows as tall as down's block
    columns are wide (one hidden tile), gate tiled like up."""
    return down.block_shape[1] == up.block_shape[0] and (gate is None or gate.block_shape == up.block_shape)


# The fused kernel recomputes each hidden tile once per W2 block row that stores a tile in its column: the first
# product costs (W2 block rows x W2 density) times the unfused one. Past this factor the unfused path wins.
# Past a factor of 1 the unfused path was as fast or faster in `bench mlp` (H200: benchmarks/results/h200/mlp.md).
MAX_RECOMPUTE = 1.0
FUSED_MIN_TOKENS = 65  # below, the unfused products' decode kernel streams the weights faster (4x at one token)


def fused_pays(m: int, up: BlockSparseMatrix, down: BlockSparseMatrix, gate: BlockSparseMatrix | None) -> bool:
    """Whether the fused kernel beats three ``spmm`` calls for ``m`` tokens (``bench mlp``, H200).

    At few tokens the unfused products take the decode kernel, which spreads the weight stream over every SM;
    above, the fused kernel pays unless its recomputation of hidden tiles costs more than the hidden tensor's
    round trip through memory: at 95% sparsity with blocks of 64 or 128, and at 90% with blocks of 128 on
    ViT-B-sized MLPs. Under the interpreter (tests) it runs wherever it can.
    """
    if not tiles_chain(up, down, gate):
        return False
    return triton_interpreting() or (m >= FUSED_MIN_TOKENS and recompute_factor(down) <= MAX_RECOMPUTE)


def inference_path(m: int, up: BlockSparseMatrix, down: BlockSparseMatrix, gate: BlockSparseMatrix | None) -> str:
    """The path ``sparse_mlp(..., fused=True)`` takes for ``m`` tokens when it needs no gradient and no dropout:
    ``"one_token"`` (two launches of the one-token decode kernel: the hidden activation — gated: gate, up and
    their product at once —, then down), ``"fused"`` (one kernel, :func:`fused_pays`), ``"gated"`` (a gated MLP
    the fused kernel does not pay for: one launch of the row kernel for the hidden activation, act(gate) ⊙ up,
    then down through ``spmm``) or ``"unfused"`` (a product per matrix, through ``spmm``).

    ``"gated"`` needs gate tiled like up, weights the row kernel runs on (CUDA with Triton, or the interpreter;
    elsewhere nothing changes), and as many tokens as ``spmm`` would give the row kernel: below, each product's
    decode kernel streams the weights faster (``decode_pays``; gate's answer is up's, same shapes)."""
    same_tiles = gate is not None and gate.block_shape == up.block_shape
    if m == 1 and (gate is None or same_tiles):
        return "one_token"
    if fused_pays(m, up, down, gate):
        return "fused"
    if not (same_tiles and (triton_interpreting() or (up.values.is_cuda and triton_available()))):
        return "unfused"
    from sparseblocks.kernels.decode import decode_pays  # imports Triton, which a CPU-only install may lack

    return "unfused" if decode_pays(m, up) else "gated"


def recompute_factor(down: BlockSparseMatrix) -> float:
    """How many times the fused kernel computes each hidden tile: W2's block rows x W2's density."""
    return down.nnz / down.block_grid[1]


def _matrices(values: list[torch.Tensor], indices: list[torch.Tensor], shapes: list[int]) -> list[BlockSparseMatrix]:
    """The matrices a custom op received as flat lists (each one's INDEX_NAMES arrays and shape, in turn)."""
    per = len(INDEX_NAMES)
    return [_matrix(v, indices[i * per : (i + 1) * per], shapes[2 * i : 2 * i + 2]) for i, v in enumerate(values)]


def _fused_mlp_implementation(
    x: torch.Tensor,
    values: list[torch.Tensor],  # up, down[, gate]
    indices: list[torch.Tensor],  # each matrix's INDEX_NAMES arrays, one after the other
    shapes: list[int],  # (rows, columns) of each matrix, one after the other
    biases: list[torch.Tensor | None],  # up, down, gate
    activation: str,
) -> torch.Tensor:
    up, down, gate = (*_matrices(values, indices, shapes), None)[:3]
    path = inference_path(x.numel() // x.shape[-1], up, down, gate)
    return _fused_mlp(x, up, down, gate, biases, activation, path)


_fused_mlp_op = define_op(
    "fused_mlp",
    _fused_mlp_implementation,
    lambda x, values, indices, shapes, biases, activation: x.new_empty((*x.shape[:-1], shapes[2])),
)


def _fused_mlp(
    x: torch.Tensor,
    up: BlockSparseMatrix,
    down: BlockSparseMatrix,
    gate: BlockSparseMatrix | None,
    biases: list[torch.Tensor | None],
    activation: str,
    path: str,
) -> torch.Tensor:
    """The fused op's implementation on the ``path`` that :func:`inference_path` chose (not ``"unfused"``), also
    called directly outside torch.compile (a custom op's dispatch costs more CPU than a one-token MLP's two kernels
    take on the GPU)."""
    x2 = x.reshape(-1, up.shape[1])
    if use_triton(x):
        from sparseblocks.kernels.decode import one_token_mlp_triton
        from sparseblocks.kernels.fused_mlp import fused_mlp_triton
        from sparseblocks.kernels.spmm import gated_spmm_triton, spmm_triton

        up_bias, down_bias, gate_bias = biases
        with on_device_of(x2):
            if path == "gated":
                hidden = gated_spmm_triton(x2, up, gate, up_bias, gate_bias, activation)  # (M, H)
                y = spmm_triton(hidden, down, down_bias)
            else:
                kernel = one_token_mlp_triton if path == "one_token" else fused_mlp_triton
                y = kernel(x2, up, down, gate, *biases, activation)
    else:
        y = reference.mlp(x2, up, down, gate, *biases, activation)
    return y.reshape(*x.shape[:-1], down.shape[0])


class _EagerPlainMLP(torch.autograd.Function):
    """``down(act(up(x)))`` for training outside torch.compile: the forward as two products, and a backward that
    never writes the hidden gradient ``dY · W_down``: one kernel computes it tile by tile and multiplies it by
    ``act'`` of the recomputed pre-activation (``_hidden_grad``)."""

    @staticmethod
    def forward(ctx, x, up_values, down_values, up_bias, down_bias, up, down, activation):
        hidden = _forward(x, up, up_bias, activation)
        ctx.save_for_backward(x, hidden, up_bias, down_bias)
        ctx.up, ctx.down, ctx.activation = up, down, activation
        return _forward(hidden, down, down_bias, None)

    @staticmethod
    def backward(ctx, grad_out):
        x, hidden, up_bias, down_bias = ctx.saved_tensors
        up, down = ctx.up, ctx.down
        needs_x, needs_up, needs_down, needs_up_bias, needs_down_bias = ctx.needs_input_grad[:5]
        grad_down = _sddmm(grad_out, hidden, down) if needs_down else None
        grad_down_bias = _column_sums(grad_out, down).to(down_bias.dtype) if needs_down_bias else None
        grad_x = grad_up = grad_up_bias = None
        if needs_x or needs_up or needs_up_bias:
            dz, up_bias_sums = _hidden_grad(grad_out, x, up, up_bias, down, ctx.activation, needs_up_bias)
            grad_up = _sddmm(dz, x, up) if needs_up else None
            grad_x = _input_grad(dz, up) if needs_x else None
            grad_up_bias = up_bias_sums.to(up_bias.dtype) if needs_up_bias else None
        return grad_x, grad_up, grad_down, grad_up_bias, grad_down_bias, None, None, None


def sparse_mlp(
    x: torch.Tensor,
    up: BlockSparseMatrix,
    down: BlockSparseMatrix,
    gate: BlockSparseMatrix | None = None,
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    activation: str = "gelu",
    hidden_dropout: float = 0.0,
    fused: bool = True,
) -> torch.Tensor:
    """``down(drop(act(up(x))))``, or gated ``down(drop(act(gate(x)) ⊙ up(x)))``, with biases: x ``(..., K)`` ->
    ``(..., N)``.

    up and gate: logical ``(H, K)``; down: ``(N, H)`` whose block columns are as wide as up's block rows.
    hidden_dropout: the dropout probability on the hidden activation (pass 0 in eval mode). With ``fused`` and
    neither gradients nor dropout to compute, one kernel does it all where it pays (:func:`fused_pays`), the
    hidden activation kept on chip, at one token two launches of the decode kernel do, and a gated MLP elsewhere
    computes its hidden activation in one launch, gate and up never stored (:func:`inference_path`); otherwise
    separate differentiable products do, and with ``fused`` a plain MLP (no gate, no dropout) trained outside
    torch.compile keeps its hidden *gradient* on chip in the backward.
    """
    x, (up, down, *gates), (up_bias, down_bias, gate_bias) = autocast_inputs(
        x, [up, down] + ([gate] if gate is not None else []), [up_bias, down_bias, gate_bias]
    )
    gate = gates[0] if gates else None
    if gate is None and gate_bias is not None:
        raise ValueError("gate_bias needs a gate")
    check_spmm_inputs(x, up, up_bias, activation)
    check_spmm_inputs(x.new_empty((0, down.shape[1])), down, down_bias, None)  # no elements: no allocation
    if gate is not None:
        check_spmm_inputs(x, gate, gate_bias, activation)
    check_mlp_shapes(up, down, gate)
    matrices = [up, down] if gate is None else [up, down, gate]
    biases = [up_bias, down_bias, gate_bias]
    training = needs_grad(x, *(w.values for w in matrices), *biases)
    inference = fused and not training and hidden_dropout == 0.0
    path = inference_path(x.numel() // x.shape[-1], up, down, gate) if inference else "unfused"
    if path != "unfused":
        if not torch.compiler.is_compiling():
            return _fused_mlp(x, up, down, gate, biases, activation, path)
        return _fused_mlp_op(
            x,
            [w.values for w in matrices],
            [index for w in matrices for index in _index(w)],
            [size for w in matrices for size in w.shape],
            biases,
            activation,
        )
    plain = gate is None and activation is not None and hidden_dropout == 0.0
    if fused and training and plain and not torch.compiler.is_compiling():
        return _EagerPlainMLP.apply(x, up.values, down.values, up_bias, down_bias, up, down, activation)
    return reference.mlp(x, up, down, gate, *biases, activation, hidden_dropout=hidden_dropout, product=spmm)
