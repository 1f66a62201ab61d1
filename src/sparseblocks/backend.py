"""Which implementation an op runs: Triton kernels on CUDA tensors, the PyTorch reference elsewhere."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import logging
import os
from collections.abc import Iterator

import torch

logger = logging.getLogger("sparseblocks")


# Looked up once, at import: torch.compile (2.11) refuses to trace find_spec, and the ops ask
# inside compiled models. Read as Triton reads it when it decorates the kernels at import.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Kept in a plain global rather than behind functools.cache, which torch.compile warns about when it traces it.
_triton_available: bool | None = None


def triton_available() -> bool:
    """Triton is importable and can compile for a CUDA GPU here (asked once: each CUDA query costs ~1 µs)."""
    global _triton_available
    if _triton_available is None:
        _triton_available = _TRITON_INSTALLED and torch.cuda.is_available()
    return _triton_available


def triton_interpreting() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors through its interpreter (tests)."""
    return _TRITON_INTERPRET


_forced_reference: contextvars.ContextVar[bool] = contextvars.ContextVar("sparseblocks_reference", default=False)


@contextlib.contextmanager
def reference_mode() -> Iterator[None]:
    """Within the block, every op runs the plain PyTorch reference, on the GPU too (to check a kernel's numerics).

    The switch is read each time an op runs, inside ``torch.compile``d models too (the ops are opaque to it).
    Per thread and per context (``contextvars``).
    """
    token = _forced_reference.set(True)
    try:
        yield
    finally:
        _forced_reference.reset(token)


FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")
# None: follow torch.backends.cuda.matmul.allow_tf32
_fp32_precision: contextvars.ContextVar[str | None] = contextvars.ContextVar("sparseblocks_fp32", default=None)


@contextlib.contextmanager
def fp32_precision(precision: str) -> Iterator[None]:
    """Within the block, the Triton kernels multiply fp32 tiles in ``precision``:

    - ``"ieee"``: fp32 products on the CUDA cores (what dense fp32 does when TF32 is off);
    - ``"tf32"``: one TF32 tensor-core product (about 1e-3 relative error, as dense with TF32 on);
    - ``"tf32x3"``: three TF32 products on each operand's high and low parts, fp32 accumulation: errors of the
      order of fp32's on random inputs, at tensor-core speed.

    Outside any block they follow ``torch.backends.cuda.matmul.allow_tf32`` ("tf32" or "ieee"), as dense does.
    The TF32 modes need an Ampere or later GPU. Read at each launch: a CUDA graph keeps the precision it was
    captured with. bf16 and fp16 are unaffected. Per thread and per context (``contextvars``).
    """
    if precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32 precision must be one of {FP32_PRECISIONS}, got {precision!r}")
    token = _fp32_precision.set(precision)
    try:
        yield
    finally:
        _fp32_precision.reset(token)


def fp32_dot_precision() -> str:
    """The precision fp32 tiles are multiplied in now: the innermost :func:`fp32_precision`, else what
    ``torch.backends.cuda.matmul.allow_tf32`` says."""
    precision = _fp32_precision.get()
    if precision is not None:
        return precision
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def on_device_of(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(t.device)`` where that is not the current device, else nothing: Triton launches on the
    current device whatever device the tensors are on (a model on ``cuda:1`` with device 0 current)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # float64 takes the reference, on any device


# Off unless asked for (SPARSEBLOCKS_PREPARED_LAUNCHES=1 for the process, prepared_launches(True) for a block): on an
# H100 they cut issuing a one-token spmm from 71 to 23 µs of CPU, but the two fixes after that run (no replay inside
# another op's capture; no capture after a key's second refusal, against a 23% slower eager ViT-B/16) have run on
# the CPU only, so the default waits for a GPU to confirm them.
_prepared_launches: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "sparseblocks_prepared_launches", default=os.environ.get("SPARSEBLOCKS_PREPARED_LAUNCHES", "0") == "1"
)


@contextlib.contextmanager
def prepared_launches(enabled: bool) -> Iterator[None]:
    """Within the block, eager inference calls of ``spmm`` and ``sparse_mlp`` on CUDA tensors replay the launches
    prepared by an earlier call with the same inputs' metadata (True) or always take the full path (False, the
    default; ``SPARSEBLOCKS_PREPARED_LAUNCHES=1`` makes True the process's default). Per thread and per context
    (``contextvars``); see docs/performance.md."""
    token = _prepared_launches.set(enabled)
    try:
        yield
    finally:
        _prepared_launches.reset(token)


def prepared_launches_enabled() -> bool:
    """Whether eager inference calls may replay prepared launches here (:func:`prepared_launches`)."""
    return _prepared_launches.get()


_interpreted_kernels: contextvars.ContextVar[bool] = contextvars.ContextVar("sparseblocks_interpreted", default=False)


@contextlib.contextmanager
def interpreted_kernels() -> Iterator[None]:
    """Within the block, under Triton's interpreter (``TRITON_INTERPRET=1``), ops on CPU tensors run the Triton
    kernels instead of the reference (``dispatch.force_plan`` enters it: a forced plan is meant to run)."""
    token = _interpreted_kernels.set(True)
    try:
        yield
    finally:
        _interpreted_kernels.reset(token)


def switches(dtype: torch.dtype) -> tuple:
    """This module's switches that can change what an op on ``dtype`` tensors runs: :func:`reference_mode`,
    :func:`interpreted_kernels`, and for fp32 :func:`fp32_dot_precision` (read for fp32 only, where it sets the
    kernels' dot precision). ``dispatch.path_context`` adds the forced plans; a new switch goes here."""
    precision = fp32_dot_precision() if dtype == torch.float32 else None
    return _forced_reference.get(), _interpreted_kernels.get(), precision


def use_triton(x: torch.Tensor) -> bool:
    """Whether ops on ``x`` take the Triton path; warns once when they fall back to the reference."""
    if _forced_reference.get():
        return False
    if x.dtype in KERNEL_DTYPES and (
        (x.is_cuda and triton_available())
        or (_TRITON_INTERPRET and x.device.type == "cpu" and _interpreted_kernels.get())
    ):
        return True
    _warn_reference_once(x.device.type, x.dtype)
    return False


@functools.cache
def _warn_reference_once(device_type: str, dtype: torch.dtype) -> None:
    kind = device_type if dtype in KERNEL_DTYPES else f"{str(dtype).removeprefix('torch.')} {device_type}"
    logger.warning(
        "sparseblocks: no Triton kernel for %s tensors; running the plain PyTorch reference "
        "(correct, not fast). The block-sparse kernels take float16, bfloat16 and float32 tensors on a CUDA GPU.",
        kind,
    )


def describe() -> str:
    """One line saying which path ops take on this machine (for ``sparseblocks info``)."""
    if triton_available():
        return f"Triton kernels on {torch.cuda.get_device_name()}; reference on CPU tensors"
    return "PyTorch reference (no CUDA GPU visible)"
