"""The ``sparseblocks::`` operators, defined through ``torch.library.Library``.

``torch.library.custom_op`` runs two Python wrappers around each call: an autograd kernel (registered even for an
op without a backward) and a backend kernel that checks the outputs for aliasing. On the development machine's CPU,
kernels stubbed (``benchmarks/op_dispatch.py``), a call of ``sparseblocks::fused_mlp`` (31 tensors) cost 53-61 µs
that way and 28-34 µs defined here; ``sparseblocks::spmm_input_grad`` 28-29 µs and 14 µs. ``sparseblocks::spmm``
keeps an autograd kernel (``register_autograd``) and costs about the same both ways, 24-35 µs; traced code that
needs no gradient calls ``sparseblocks::spmm_inference`` instead, 19 µs. Only code that ``torch.compile`` traced
calls these ops (eager code calls the implementations directly), and there a decode step or a prefill is
host-bound.
"""

# No `from __future__ import annotations` here: infer_schema reads the implementations' annotations at run time.

from collections.abc import Callable

import torch

_LIBRARY = torch.library.Library("sparseblocks", "DEF")


def define_op(name: str, implementation: Callable, fake: Callable) -> torch._ops.OpOverload:
    """Define ``sparseblocks::<name>``: ``implementation`` on every device (its annotations give the schema; it
    mutates no input) and ``fake`` for tracing (the outputs' shapes and dtypes). Returns the op, called as
    ``implementation`` is."""
    _LIBRARY.define(name + torch.library.infer_schema(implementation, mutates_args=()))
    _LIBRARY.impl(name, implementation, "CompositeExplicitAutograd")
    torch.library.register_fake(f"sparseblocks::{name}", fake, lib=_LIBRARY)
    return getattr(torch.ops.sparseblocks, name).default
