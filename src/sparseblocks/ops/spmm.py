"""``spmm``: ``Y = activation(X · Wᵀ + bias)`` with W block-sparse, and its autograd.

Registered as ``torch.library`` ops with fake (meta) implementations (``ops/library.py``), so
``torch.compile(fullgraph=True)`` traces around them and CUDA graphs capture them. The backward is written in the
same vocabulary:

* ``sparseblocks::spmm``             Y  = act(X Wᵀ + b)     (dense · sparseᵀ -> dense)
* ``sparseblocks::spmm_activation_grad`` dZ = dY ⊙ act'(X Wᵀ + b)  (Z recomputed tile by tile, never stored;
  optionally Σ dZ over tokens, the bias gradient, from the same tiles)
* ``sparseblocks::spmm_input_grad``  dX = dZ W             (dense · sparse  -> dense, through W's transposed index)
* ``sparseblocks::sddmm``            dW = dZᵀ X on W's pattern (dense · dense -> sparse)

where dZ is the gradient before the activation. Quantized tiles (``BlockSparseMatrix.quantize``) are for inference:
``spmm`` computes their forward on every path, and a backward through one raises (:class:`_InferenceOnly`).
Each op runs a Triton kernel on CUDA tensors and the plain PyTorch reference (``sparseblocks.reference``) elsewhere.
Outside ``torch.compile``, :func:`spmm` runs the same implementations through a ``torch.autograd.Function``
instead: a custom op's dispatch costs more CPU time than the kernels take on small layers.
"""

# No `from __future__ import annotations` here: torch.library reads these annotations at run time.

from collections.abc import Callable
from typing import NamedTuple

import torch

from sparseblocks import dispatch, reference
from sparseblocks.backend import on_device_of, prepared_launches_enabled, triton_available, use_triton
from sparseblocks.dispatch import Plan, Tiles
from sparseblocks.format import INDEX_NAMES, BlockSparseMatrix
from sparseblocks.ops.library import define_op


# A matrix's index arrays travel through the custom ops as one list[Tensor], in INDEX_NAMES order.
def _matrix(
    values: torch.Tensor,
    index: list[torch.Tensor],
    shape: list[int],
    scales: torch.Tensor | None = None,
    fp8_activations: bool = False,
) -> BlockSparseMatrix:
    indices = dict(zip(INDEX_NAMES, index, strict=False))
    return BlockSparseMatrix.from_parts(values, shape, indices, scales, fp8_activations)


def _index(w: BlockSparseMatrix) -> list[torch.Tensor]:
    return [getattr(w, name) for name in INDEX_NAMES]


# ---------------------------------------------------------------------------------------------- implementations
# Triton on CUDA (the plan ``sparseblocks.dispatch`` names), the reference elsewhere. Shared by the custom ops
# (traced by torch.compile) and the eager path, which calls them straight from an autograd.Function: a torch.library
# dispatch costs 20-45 µs of CPU a call (benchmarks/op_dispatch.py).


# The kernels multiply a column number by its stride, and bump row pointers by up to 256 rows, in int32 (int64 there
# costs registers and instructions in every tile load): an input whose column offsets, or a 256-row step, could pass
# 2^31 elements goes to them as a contiguous copy (its columns then 1 apart, its rows one row apart).
INT32_OFFSETS = 2**31
MAX_ROWS_PER_STEP = 256


def int32_addressable(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``(..., K)``, or a contiguous copy of it where the kernels' int32 offsets could overflow on it."""
    columns = (t.shape[-1] - 1) * abs(t.stride(-1))
    rows = MAX_ROWS_PER_STEP * abs(t.stride(-2)) if t.dim() > 1 else 0
    return t if columns < INT32_OFFSETS and rows < INT32_OFFSETS else t.contiguous()


def forward_with_kernels(x: torch.Tensor, w: BlockSparseMatrix, bias: torch.Tensor | None, activation: str | None):
    """``act(x · wᵀ + bias)`` by the kernel :func:`dispatch.forward_plan` picks (x on a device the kernels run on)."""
    x = int32_addressable(x)
    x2 = x.reshape(-1, w.shape[1])  # a view whenever the strides allow; the kernels take any strides
    m, tiles, device = x2.shape[0], Tiles.of(w), dispatch.device_facts(x.device)
    dispatch.check_quantized_tiles(w, device)
    plan = dispatch.forward_plan(m, tiles, device, lambda: dispatch.descriptors_fit(x2, w, "forward"))
    if w.fp8_activations and not dispatch.fp8_products(plan, tiles, device):
        dispatch.notice_weight_only(plan.value)  # W8A8 runs in the row kernel only: here the tiles alone are fp8
    if plan is Plan.ONE_TOKEN:
        from sparseblocks.kernels.one_token import spmm_one_token

        y = spmm_one_token(x2, w, bias, activation)
    elif plan is Plan.FEW_TOKENS:
        from sparseblocks.kernels.few_tokens import spmm_few_tokens

        y = spmm_few_tokens(x2, w, bias, activation, dispatch.few_token_tiles_per_program(tiles, device))
    else:
        from sparseblocks.kernels.spmm import spmm_rows

        fp8 = w.fp8_activations and dispatch.fp8_products(plan, tiles, device)
        return spmm_rows(x, w, bias, activation, descriptors=plan is Plan.ROWS_DESCRIPTORS, fp8_products=fp8)
    return y.reshape(*x.shape[:-1], w.shape[0])


def _forward(
    x: torch.Tensor, w: BlockSparseMatrix, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    if use_triton(x):
        with on_device_of(x):
            return forward_with_kernels(x, w, bias, activation)
    return reference.spmm(x, w, bias, activation)


def _descriptors(m: int, w: BlockSparseMatrix, decision: str, *fit_args) -> bool:
    """Whether the row kernel reads by descriptor in a ``decision`` launch (:func:`dispatch.row_loads`)."""
    fits = lambda: dispatch.descriptors_fit(*fit_args)
    return dispatch.row_loads(m, Tiles.of(w), fits, decision) is Plan.ROWS_DESCRIPTORS


def _activation_grad(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    w: BlockSparseMatrix,
    bias: torch.Tensor | None,
    activation: str,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dZ, and with ``bias_grad`` its fp32 sum over all leading dims (the bias gradient; else None)."""
    if use_triton(x):
        from sparseblocks.kernels.spmm import activation_grad_rows

        x, grad_out = int32_addressable(x), int32_addressable(grad_out)
        x2, grad2 = x.reshape(-1, w.shape[1]), grad_out.reshape(-1, w.shape[0])
        descriptors = _descriptors(x2.shape[0], w, "activation_grad", x2, w, "activation_grad", grad2)
        with on_device_of(x):
            return activation_grad_rows(grad_out, x, w, bias, activation, bias_grad, descriptors)
    dz = reference.spmm_activation_grad(grad_out, x, w, bias, activation)
    return dz, _summed_over_tokens(dz, w) if bias_grad else None


def _hidden_grad(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    up: BlockSparseMatrix,
    up_bias: torch.Tensor | None,
    down: BlockSparseMatrix,
    activation: str,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An MLP's ``dZ = (dY · W_down) ⊙ act'(x · W_upᵀ + b_up)`` and, with ``bias_grad``, up's bias gradient."""
    if use_triton(x):
        x, grad_out = int32_addressable(x), int32_addressable(grad_out)
        x2, grad2 = x.reshape(-1, up.shape[1]), grad_out.reshape(-1, down.shape[0])
        on_chip = dispatch.hidden_grad_plan(lambda: dispatch.hidden_grad_on_chip_fits(x2, grad2, up, down))
        if on_chip is Plan.HIDDEN_GRAD_ON_CHIP:
            from sparseblocks.kernels.spmm import hidden_grad_on_chip

            with on_device_of(x):
                return hidden_grad_on_chip(grad_out, x, up, up_bias, down, activation, bias_grad)
    return _activation_grad(_input_grad(grad_out, down), x, up, up_bias, activation, bias_grad)


def _summed_over_tokens(grad: torch.Tensor, w: BlockSparseMatrix) -> torch.Tensor:
    """``grad`` ``(..., N)`` summed over its leading dims in fp32 (float64 for float64), ``(N,)``: a bias gradient
    (plain PyTorch, which torch.compile traces)."""
    return grad.reshape(-1, w.shape[0]).sum(0, dtype=_sums_dtype(grad))


def _sums_dtype(grad: torch.Tensor) -> torch.dtype:
    """Where a bias gradient is summed: fp32, float64 for float64."""
    return torch.promote_types(grad.dtype, torch.float32)


def _column_sums(grad: torch.Tensor, w: BlockSparseMatrix) -> torch.Tensor:
    """:func:`_summed_over_tokens`, by the Triton column-sum kernel where :func:`dispatch.bias_grad_plan` says."""
    if use_triton(grad) and dispatch.bias_grad_plan(grad.numel()) is Plan.COLUMN_SUMS_KERNEL:
        from sparseblocks.kernels.column_sums import column_sums_triton

        with on_device_of(grad):
            return column_sums_triton(grad.reshape(-1, w.shape[0]))
    return _summed_over_tokens(grad, w)


def _input_grad(grad_out: torch.Tensor, w: BlockSparseMatrix) -> torch.Tensor:
    if use_triton(grad_out):
        from sparseblocks.kernels.spmm import input_grad_rows

        grad_out = int32_addressable(grad_out)
        grad2 = grad_out.reshape(-1, w.shape[0])
        descriptors = _descriptors(grad2.shape[0], w, "input_grad", grad2, w, "input_grad")
        with on_device_of(grad_out):
            return input_grad_rows(grad_out, w, descriptors)
    return reference.spmm_input_grad(grad_out, w)


def _sddmm(grad_out: torch.Tensor, x: torch.Tensor, w: BlockSparseMatrix) -> torch.Tensor:
    if use_triton(x):
        from sparseblocks.kernels.sddmm import sddmm_triton

        with on_device_of(x):
            return sddmm_triton(int32_addressable(grad_out), int32_addressable(x), w)
    return reference.sddmm(grad_out, x, w)


# ---------------------------------------------------------------------------------------------- custom ops


def _spmm_implementation(
    x: torch.Tensor,
    values: torch.Tensor,
    index: list[torch.Tensor],
    shape: list[int],
    bias: torch.Tensor | None,
    activation: str | None,
    scales: torch.Tensor | None,
    fp8_activations: bool,
) -> torch.Tensor:
    return _forward(x, _matrix(values, index, shape, scales, fp8_activations), bias, activation)


_spmm_op = define_op(
    "spmm",
    _spmm_implementation,
    lambda x, values, index, shape, bias, activation, scales, fp8_activations: x.new_empty((*x.shape[:-1], shape[0])),
    differentiable=True,  # register_autograd, below
)


def _activation_grad_implementation(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    index: list[torch.Tensor],
    shape: list[int],
    bias: torch.Tensor | None,
    activation: str,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dZ and, with ``bias_grad``, its column sums (``(N,)`` in ``_sums_dtype``; else an empty tensor)."""
    dz, column_sums = _activation_grad(grad_out, x, _matrix(values, index, shape), bias, activation, bias_grad)
    return dz, column_sums if column_sums is not None else dz.new_empty(0, dtype=_sums_dtype(dz))


def _activation_grad_fake(grad_out, x, values, index, shape, bias, activation, bias_grad):
    sums = grad_out.new_empty(shape[0] if bias_grad else 0, dtype=_sums_dtype(grad_out))
    return grad_out.new_empty(grad_out.shape), sums


_spmm_activation_grad_op = define_op("spmm_activation_grad", _activation_grad_implementation, _activation_grad_fake)


def _input_grad_implementation(
    grad_out: torch.Tensor, values: torch.Tensor, index: list[torch.Tensor], shape: list[int]
) -> torch.Tensor:
    return _input_grad(grad_out, _matrix(values, index, shape))


_spmm_input_grad_op = define_op(
    "spmm_input_grad",
    _input_grad_implementation,
    lambda grad_out, values, index, shape: grad_out.new_empty((*grad_out.shape[:-1], shape[1])),
)


def _sddmm_implementation(
    grad_out: torch.Tensor, x: torch.Tensor, values: torch.Tensor, index: list[torch.Tensor], shape: list[int]
) -> torch.Tensor:
    """The gradient of ``values``; ``values`` itself only says the tile shape and dtype."""
    return _sddmm(grad_out, x, _matrix(values, index, shape))


_sddmm_op = define_op(
    "sddmm", _sddmm_implementation, lambda grad_out, x, values, index, shape: torch.empty_like(values)
)


# ---------------------------------------------------------------------------------------------- autograd


class _Backward(NamedTuple):
    """The backward computations, called with a ``BlockSparseMatrix``."""

    activation_grad: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    input_grad: Callable[..., torch.Tensor]
    sddmm: Callable[..., torch.Tensor]
    column_sums: Callable[..., torch.Tensor]  # the bias gradient of a layer without activation


def _activation_grad_through_op(g, x, w, b, act, bias_grad):
    dz, column_sums = _spmm_activation_grad_op(g, x, w.values, _index(w), list(w.shape), b, act, bias_grad)
    return dz, column_sums if bias_grad else None


_EAGER = _Backward(_activation_grad, _input_grad, _sddmm, _column_sums)
_CUSTOM_OPS = _Backward(
    _activation_grad_through_op,
    lambda g, w: _spmm_input_grad_op(g, w.values, _index(w), list(w.shape)),
    lambda g, x, w: _sddmm_op(g, x, w.values, _index(w), list(w.shape)),
    _summed_over_tokens,  # traced: Inductor writes the reduction
)


def _gradients(
    kernels: _Backward,
    grad_out: torch.Tensor,
    x: torch.Tensor,
    w: BlockSparseMatrix,
    bias: torch.Tensor | None,
    activation: str | None,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of x, values and bias (None where not needed); dZ first where there is an activation, with the
    bias gradient summed from its tiles on the way (one pass over dZ fewer)."""
    needs_x, needs_values, needs_bias = needs
    column_sums = None
    if activation is not None:
        grad_out, column_sums = kernels.activation_grad(grad_out, x, w, bias, activation, needs_bias)
    grad_x = kernels.input_grad(grad_out, w) if needs_x else None
    grad_values = kernels.sddmm(grad_out, x, w) if needs_values else None
    grad_bias = None
    if needs_bias:
        grad_bias = (column_sums if column_sums is not None else kernels.column_sums(grad_out, w)).to(bias.dtype)
    return grad_x, grad_values, grad_bias


def _setup_context(ctx, inputs, output):
    x, values, index, shape, bias, activation, scales, _ = inputs
    ctx.save_for_backward(x, values, bias, *index)
    ctx.shape, ctx.activation, ctx.quantized = shape, activation, scales is not None


def _backward(ctx, grad_out):
    if ctx.quantized:
        raise RuntimeError(_no_backward("a quantized weight"))
    x, values, bias, *index = ctx.saved_tensors
    needs = ctx.needs_input_grad
    w = _matrix(values, index, ctx.shape)
    grads = _gradients(_CUSTOM_OPS, grad_out, x, w, bias, ctx.activation, (needs[0], needs[1], needs[4]))
    grad_x, grad_values, grad_bias = grads
    return grad_x, grad_values, [None] * len(index), None, grad_bias, None, None, None


torch.library.register_autograd("sparseblocks::spmm", _backward, setup_context=_setup_context)


def with_values(w: BlockSparseMatrix, values: torch.Tensor) -> BlockSparseMatrix:
    """``w`` holding ``values``: ``w`` itself when it does. Under ``torch.func`` transforms an autograd.Function
    receives its tensors unwrapped, while the matrix passed beside them still holds the wrapped ``values``."""
    if values is w.values:
        return w
    return BlockSparseMatrix.from_parts(values, w.shape, w.index_tensors(), w.scales, w.fp8_activations)


def _no_backward(label: str) -> str:
    return (f"{label} holds quantized tiles, which are for inference: there is no backward through it "
            "(fine-tune before quantizing, or keep this layer out of the graph that needs gradients)")  # fmt: skip


class _InferenceOnly(torch.autograd.Function):
    """The forward of a quantized product where autograd records it (x or the bias requires a gradient); its
    backward raises, naming ``label`` (the layer, where the caller knows it)."""

    @staticmethod
    def forward(ctx, x, bias, w, activation, label):
        ctx.label = label
        return _forward(x, w, bias, activation)

    @staticmethod
    def backward(ctx, grad_out):
        raise RuntimeError(_no_backward(ctx.label))


def spmm_inference_only(
    x: torch.Tensor,
    w: BlockSparseMatrix,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    label: str = "a quantized weight",
) -> torch.Tensor:
    """:func:`spmm` for a quantized ``w``; where autograd would record it, a backward through it raises a
    ``RuntimeError`` naming ``label``."""
    if torch.compiler.is_compiling():
        return _spmm_op(x, w.values, _index(w), list(w.shape), bias, activation, w.scales, w.fp8_activations)
    if needs_grad(x, bias):
        return _InferenceOnly.apply(x, bias, w, activation, label)
    return _forward(x, w, bias, activation)


class _EagerSpmm(torch.autograd.Function):
    """The same forward and backward as the custom op, without its dispatch cost: the path outside torch.compile.
    Written with ``setup_context`` and a generated vmap rule, so ``torch.func`` runs it: ``grad`` on any path,
    ``vmap`` on the reference only (a Triton kernel cannot take the batched tensors the generated rule passes)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, values, bias, w, activation):
        return _forward(x, with_values(w, values), bias, activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, values, bias, w, activation = inputs
        ctx.save_for_backward(x, values, bias)
        ctx.w, ctx.activation = w, activation

    @staticmethod
    def backward(ctx, grad_out):
        x, values, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        w = with_values(ctx.w, values)
        grads = _gradients(_EAGER, grad_out, x, w, bias, ctx.activation, (needs[0], needs[1], needs[2]))
        return (*grads, None, None)


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
    if w.scales is not None:
        if not x.is_floating_point() or x.dtype.itemsize < 2:
            raise ValueError(f"x must be float16, bfloat16, float32 or float64 for quantized tiles, got {x.dtype}")
    elif x.dtype != w.dtype:
        raise ValueError(f"x is {x.dtype} but the weight is {w.dtype}; cast one of them")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but the weight is on {w.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"bias must be {x.dtype} on {x.device}, got {bias.dtype} on {bias.device}")
    if not (activation is None or isinstance(activation, str)) or activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(a for a in reference.ACTIVATIONS if a)} or None")


def _autocasting(device_type: str) -> bool:
    # A fixed device list rather than torch.amp.is_autocast_available, which torch.compile (2.11) cannot trace:
    # it broke the graph at every sparse layer.
    return device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type)


def autocast_inputs(
    x: torch.Tensor, matrices: list[BlockSparseMatrix], biases: list[torch.Tensor | None]
) -> tuple[torch.Tensor, list[BlockSparseMatrix], list[torch.Tensor | None]]:
    """Under ``torch.autocast``, the inputs cast to the autocast dtype as ``F.linear`` casts its own: floating point
    but not float64 (the casts are differentiable, so fp32 master weights get fp32 gradients); unchanged otherwise."""
    if not _autocasting(x.device.type):
        return x, matrices, biases
    dtype = torch.get_autocast_dtype(x.device.type)
    cast = lambda t: t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
    # quantized tiles keep their dtype and scales: their products run in the activations' dtype already
    matrices = [w if w.scales is not None else BlockSparseMatrix.from_parts(cast(w.values), w.shape,
                w.index_tensors()) for w in matrices]  # fmt: skip
    return cast(x), matrices, [cast(b) for b in biases]


def spmm(
    x: torch.Tensor,
    w: BlockSparseMatrix,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """``activation(x · wᵀ + bias)`` for a block-sparse ``w``, like ``F.linear`` with a sparse weight.

    x: ``(..., K)`` float16/bfloat16/float32, any strides; w: logical ``(N, K)`` of x's dtype and device;
    bias: ``(N,)`` or None; activation: None, "relu", "gelu", "gelu_tanh" or "silu". Returns ``(..., N)``.
    Differentiable w.r.t. ``x``, ``w.values`` and ``bias``, unless ``w`` holds quantized tiles (int8 or fp8 with
    scales, for inference: x of any of those dtypes or float64; a backward raises). Under ``torch.autocast`` the
    three are cast to the autocast dtype first, as ``F.linear`` does (the casts are differentiable, so fp32 master
    weights get fp32 gradients); quantized tiles keep theirs.

    Called again eagerly on CUDA without gradients, with inputs of the same metadata, it replays the launches of
    its first such call when ``backend.prepared_launches(True)`` is on (``ops/prepared_calls.py``).
    """
    if eager_inference(x, (w,), (bias,), activation):
        from sparseblocks.ops import prepared_calls as calls

        key = ("spmm", activation, calls.matrix_key(w), calls.bias_key(bias), *calls.context(x.dtype))
        fixed = lambda: [*calls.fixed_tensors(w), bias]
        return calls.replayed(x, w, key, fixed, lambda: _full_spmm(x, w, bias, activation))
    return _full_spmm(x, w, bias, activation)


def _full_spmm(x, w, bias, activation) -> torch.Tensor:
    """:func:`spmm` without prepared launches."""
    if isinstance(w, BlockSparseMatrix) and isinstance(x, torch.Tensor):
        x, (w,), (bias,) = autocast_inputs(x, [w], [bias])
    check_spmm_inputs(x, w, bias, activation)
    if w.scales is not None:
        return spmm_inference_only(x, w, bias, activation)
    if torch.compiler.is_compiling():
        return _spmm_op(x, w.values, _index(w), list(w.shape), bias, activation, None, False)
    if not needs_grad(x, w.values, bias):  # inference: the autograd.Function alone costs ~10 µs of CPU a call
        return _forward(x, w, bias, activation)
    return _EagerSpmm.apply(x, w.values, bias, w, activation)


def _replay_device(x: torch.Tensor) -> bool:
    """Where prepared launches run: CUDA tensors with Triton (the interpreter compiles nothing to replay)."""
    return x.is_cuda and triton_available()


def eager_inference(
    x: torch.Tensor,
    matrices: tuple[BlockSparseMatrix | None, ...],
    biases: tuple[torch.Tensor | None, ...],
    activation: str | None,
) -> bool:
    """Whether a call may replay prepared launches (``ops/prepared_calls.py``): the switch on, a CUDA tensor ``x``
    where Triton runs, ``BlockSparseMatrix`` weights (None: an absent gate), tensor or None biases, a string or
    None activation, outside ``torch.compile`` and ``torch.autocast``, and no gradient to record. Anything else
    takes the full path, which checks the inputs."""
    # is_compiling first: torch.compile folds it to True, and must not trace the switch (a ContextVar: a graph break)
    if torch.compiler.is_compiling() or not prepared_launches_enabled():
        return False
    if not (isinstance(x, torch.Tensor) and _replay_device(x)) or torch.is_autocast_enabled("cuda"):
        return False
    if not (activation is None or type(activation) is str):
        return False
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:
        return False
    for w in matrices:  # loops, not any(): a generator costs ~1 µs here
        if w is not None and (type(w) is not BlockSparseMatrix or (grad and w.values.requires_grad)):
            return False
    for b in biases:  # noqa: SIM110 (the loop, as above)
        if b is not None and (not isinstance(b, torch.Tensor) or (grad and b.requires_grad)):
            return False
    return True


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record an op on these tensors (None entries ignored)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
