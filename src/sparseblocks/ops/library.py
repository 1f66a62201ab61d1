"""The ``sparseblocks::`` operators, defined through ``torch.library.Library``.

``torch.library.custom_op`` wraps each call in two Python kernels: an autograd one and a backend one that checks
the outputs for aliasing. Here an op has its implementation as its only backend kernel, and an autograd kernel
that only checks (ops without a backward) or ``register_autograd``'s. On the development machine's CPU, kernels
stubbed, three alternating runs against the ``custom_op`` version (``benchmarks/diagnose/op_dispatch.py``; a noisy
machine): faster in all nine pairs, ``sparseblocks::fused_mlp`` (31 tensors) 37-68 -> 30-44 µs a call,
``spmm_input_grad`` 28-30 -> 14-27 µs, ``spmm`` 32-45 -> 20-27 µs. Only code that ``torch.compile`` traced calls
these ops (eager code calls the implementations directly), and there a decode step or a prefill is host-bound.
"""

# No `from __future__ import annotations` here: infer_schema reads the implementations' annotations at run time.

from collections.abc import Callable

import torch

_LIBRARY = torch.library.Library("sparseblocks", "DEF")


def define_op(
    name: str, implementation: Callable, fake: Callable, differentiable: bool = False
) -> torch._ops.OpOverload:
    """Define ``sparseblocks::<name>``: ``implementation`` on every device (its annotations give the schema; it
    mutates no input) and ``fake`` for tracing (the outputs' shapes and dtypes). Returns the op, called as
    ``implementation`` is.

    ``differentiable``: the caller registers a backward (``torch.library.register_autograd``). Otherwise a call that
    autograd would have to record raises, as ``custom_op``'s did: PyTorch's fallback for an op without an autograd
    kernel only warns and leaves the gradient out (zeros under ``torch.func.grad`` of a compiled function).
    """
    _LIBRARY.define(name + torch.library.infer_schema(implementation, mutates_args=()),
                    tags=(torch.Tag.pt2_compliant_tag,))  # fmt: skip
    _LIBRARY.impl(name, implementation, "CompositeExplicitAutograd")
    torch.library.register_fake(f"sparseblocks::{name}", fake, lib=_LIBRARY)
    op = getattr(torch.ops.sparseblocks, name).default
    if not differentiable:
        _LIBRARY.impl(name, _refusing_gradients(op), "Autograd", with_keyset=True)
    return op


def _refusing_gradients(op: torch._ops.OpOverload) -> Callable:
    """An autograd kernel for ``op``, which has no backward: it raises a ``RuntimeError`` when grad mode is on and
    an input requires a gradient, and otherwise runs the op."""

    def kernel(keyset: torch._C.DispatchKeySet, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):  # tensors, and tensors in lists
            raise RuntimeError(f"{op} has no backward, and an input requires a gradient")
        return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    return kernel
