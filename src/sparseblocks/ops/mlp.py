"""``sparse_mlp``: a whole block-sparse MLP; for inference one op, ``sparseblocks::fused_mlp`` (torch.compile
traces it), which runs the plan ``dispatch.mlp_plan`` picks on CUDA (one fused kernel; at one token, two launches of
the one-token kernel; for a gated MLP, the row kernel's gated mode, then down; or a product per matrix) and
``reference.mlp`` elsewhere.

The fused op has no backward of its own: while gradients are needed, :func:`sparse_mlp` computes the forward as
separate products; a plain (ungated, no dropout) MLP outside torch.compile trains through ``_EagerPlainMLP``, whose
backward keeps the hidden gradient on chip, everything else through :func:`~sparseblocks.ops.spmm`'s autograd.
"""

# No `from __future__ import annotations` here: torch.library reads these annotations at run time.

import torch

from sparseblocks import dispatch, reference
from sparseblocks.backend import on_device_of, use_triton
from sparseblocks.dispatch import Plan, Tiles
from sparseblocks.format import INDEX_NAMES, BlockSparseMatrix, MLPWeights
from sparseblocks.ops.library import define_op
from sparseblocks.ops.spmm import (
    _column_sums,
    _descriptors,
    _forward,
    _hidden_grad,
    _index,
    _input_grad,
    _matrix,
    _sddmm,
    autocast_inputs,
    check_spmm_inputs,
    eager_inference,
    int32_addressable,
    needs_grad,
    spmm,
    with_values,
)


def check_mlp_shapes(up: BlockSparseMatrix, down: BlockSparseMatrix, gate: BlockSparseMatrix | None) -> None:
    """Raise a ``ValueError`` unless ``up`` (and ``gate``) ``(H, K)`` and ``down`` ``(N, H)`` chain."""
    if down.shape[1] != up.shape[0]:
        raise ValueError(f"down {tuple(down.shape)} must take up's {up.shape[0]} hidden units")
    if gate is not None and gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} must match up {tuple(up.shape)}")


def _mlp_plan(m: int, weights: MLPWeights, device: torch.device) -> tuple[Plan, bool]:
    """:func:`dispatch.mlp_plan` for these weights on ``device``, and whether they are W8A8 tiles."""
    facts, matrices = dispatch.device_facts(device), weights.matrices
    w8a8 = False
    if any(w.scales is not None for w in matrices):  # quantized tiles (checked only then: this runs every call)
        for w in matrices:
            dispatch.check_quantized_tiles(w, facts)
        w8a8 = any(w.fp8_activations for w in matrices)
    gate = Tiles.of(weights.gate) if weights.gate is not None else None
    return dispatch.mlp_plan(m, Tiles.of(weights.up), Tiles.of(weights.down), gate, facts, w8a8), w8a8


def _matrices(
    values: list[torch.Tensor],
    indices: list[torch.Tensor],
    shapes: list[int],
    scales: list[torch.Tensor | None],
    fp8_activations: list[bool],
) -> list[BlockSparseMatrix]:
    """The matrices a custom op received as flat lists (each one's INDEX_NAMES arrays and shape, in turn)."""
    per = len(INDEX_NAMES)
    return [_matrix(v, indices[i * per : (i + 1) * per], shapes[2 * i : 2 * i + 2], scales[i], fp8_activations[i])
            for i, v in enumerate(values)]  # fmt: skip


def _fused_mlp_implementation(
    x: torch.Tensor,
    values: list[torch.Tensor],  # up, down[, gate]
    indices: list[torch.Tensor],  # each matrix's INDEX_NAMES arrays, one after the other
    shapes: list[int],  # (rows, columns) of each matrix, one after the other
    biases: list[torch.Tensor | None],  # up, down, gate
    activation: str,
    scales: list[torch.Tensor | None],  # of quantized tiles, in the order of values
    fp8_activations: list[bool],
) -> torch.Tensor:
    up, down, gate = (*_matrices(values, indices, shapes, scales, fp8_activations), None)[:3]
    return _inference(x, MLPWeights(up, down, gate, *biases), activation)


_fused_mlp_op = define_op(
    "fused_mlp",
    _fused_mlp_implementation,
    lambda x, values, indices, shapes, biases, activation, scales, fp8_activations: x.new_empty(
        (*x.shape[:-1], shapes[2])
    ),
)


def _inference(x: torch.Tensor, weights: MLPWeights, activation: str) -> torch.Tensor:
    """The MLP without gradients or dropout, on the plan :func:`dispatch.mlp_plan` picks where the kernels run (the
    reference elsewhere); the fused op's implementation, also called directly outside torch.compile (a custom op's
    dispatch costs more CPU than a one-token MLP's two kernels take on the GPU)."""
    if not use_triton(x):
        return reference.mlp(x, weights, activation)
    x2 = int32_addressable(x).reshape(-1, weights.up.shape[1])
    plan, w8a8 = _mlp_plan(x2.shape[0], weights, x.device)
    if plan is not Plan.UNFUSED and w8a8:
        dispatch.notice_weight_only(plan.value)  # forced: the fused launches multiply fp8 tiles weight-only
    with on_device_of(x2):
        if plan is Plan.UNFUSED:
            y = reference.mlp(x2, weights, activation, product=_forward)
        elif plan is Plan.GATED_ROWS:
            from sparseblocks.kernels.spmm import gated_rows

            up, down, gate, up_bias, down_bias, gate_bias = weights
            descriptors = _descriptors(x2.shape[0], up, "gated_hidden", x2, up, "gated_hidden", None, gate)
            hidden = gated_rows(x2, up, gate, up_bias, gate_bias, activation, descriptors)  # (M, H)
            y = _forward(hidden, down, down_bias, None)
        elif plan is Plan.ONE_TOKEN:
            from sparseblocks.kernels.one_token import one_token_mlp

            y = one_token_mlp(x2, weights, activation)
        else:
            from sparseblocks.kernels.fused_mlp import fused_mlp_triton

            y = fused_mlp_triton(x2, weights, activation)
    return y.reshape(*x.shape[:-1], weights.down.shape[0])


class _EagerPlainMLP(torch.autograd.Function):
    """``down(act(up(x)))`` for training outside torch.compile: the forward as two products, and a backward that
    never writes the hidden gradient ``dY · W_down``: one kernel computes it tile by tile and multiplies it by
    ``act'`` of the recomputed pre-activation (``_hidden_grad``). Runs under ``torch.func`` as ``_EagerSpmm`` does."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, up_values, down_values, up_bias, down_bias, up, down, activation):
        hidden = _forward(x, with_values(up, up_values), up_bias, activation)
        return _forward(hidden, with_values(down, down_values), down_bias, None), hidden

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, up_values, down_values, up_bias, down_bias, up, down, activation = inputs
        ctx.save_for_backward(x, output[1], up_values, down_values, up_bias, down_bias)
        ctx.up, ctx.down, ctx.activation = up, down, activation
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_out, _):
        x, hidden, up_values, down_values, up_bias, down_bias = ctx.saved_tensors
        up, down = with_values(ctx.up, up_values), with_values(ctx.down, down_values)
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
    neither gradients nor dropout to compute, one kernel does it all where it pays (``dispatch.mlp_plan``), the
    hidden activation kept on chip, at one token two launches of the decode kernel do, and a gated MLP elsewhere
    computes its hidden activation in one launch, gate and up never stored; otherwise
    separate differentiable products do, and with ``fused`` a plain MLP (no gate, no dropout) trained outside
    torch.compile keeps its hidden *gradient* on chip in the backward.

    Inference called again eagerly on CUDA with inputs of the same metadata replays the launches of its first such
    call where ``backend.prepared_launches(True)`` is on, as :func:`~sparseblocks.ops.spmm` does.
    """
    biases = (up_bias, down_bias, gate_bias)
    if fused and hidden_dropout == 0.0 and eager_inference(x, (up, down, gate), biases, activation):
        from sparseblocks.ops import prepared_calls as calls

        matrices = (calls.matrix_key(up), calls.matrix_key(down), None if gate is None else calls.matrix_key(gate))
        key = ("mlp", activation, matrices, *map(calls.bias_key, biases), *calls.context(x.dtype))
        fixed = lambda: [*calls.fixed_tensors(up), *calls.fixed_tensors(down), *calls.fixed_tensors(gate), *biases]
        full = lambda: _full_sparse_mlp(x, up, down, gate, up_bias, down_bias, gate_bias, activation, 0.0, True)
        return calls.replayed(x, up, key, fixed, full)
    return _full_sparse_mlp(x, up, down, gate, up_bias, down_bias, gate_bias, activation, hidden_dropout, fused)


def _full_sparse_mlp(x, up, down, gate, up_bias, down_bias, gate_bias, activation, hidden_dropout, fused):
    """:func:`sparse_mlp` without prepared launches."""
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
    weights = MLPWeights(up, down, gate, up_bias, down_bias, gate_bias)
    training = needs_grad(x, *(w.values for w in weights.matrices), *weights.biases)
    if fused and not training and hidden_dropout == 0.0:
        if not torch.compiler.is_compiling():
            return _inference(x, weights, activation)
        return _fused_mlp_op(
            x,
            [w.values for w in weights.matrices],
            [index for w in weights.matrices for index in _index(w)],
            [size for w in weights.matrices for size in w.shape],
            weights.biases,
            activation,
            [w.scales for w in weights.matrices],
            [w.fp8_activations for w in weights.matrices],
        )
    # quantized tiles have no backward: while gradients are needed their products raise in it (ops.spmm)
    quantized = any(w.scales is not None for w in weights.matrices)
    plain = gate is None and activation is not None and hidden_dropout == 0.0 and not quantized
    if fused and training and plain and not torch.compiler.is_compiling():
        return _EagerPlainMLP.apply(x, up.values, down.values, up_bias, down_bias, up, down, activation)[0]
    return reference.mlp(x, weights, activation, hidden_dropout=hidden_dropout, product=spmm)
