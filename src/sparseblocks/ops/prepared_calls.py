"""Prepared eager inference calls: an ``spmm`` or ``sparse_mlp`` called again, eagerly on CUDA with no gradient to
record, with inputs of the same metadata, replays the launches its first call ran (``kernels/prepared.py``) instead
of running the op's checks, dispatch rules and argument building and Triton's binder.

Each weight (its ``values`` tensor) keeps up to ``MAX_CALLS`` prepared calls, by a key holding everything the full
path reads besides the contents of the tensors: x's shape, strides, dtype, device and 16-byte alignment, the stream,
the activation, every weight's and bias's shape, dtype and pointer (the launches take them as raw pointers), and the
switches of :func:`context`. A key that misses runs the full path while the launches are captured, and keeps the
result. In-place edits of a weight (its ``_version``) change nothing a launch takes: the kernels read the memory
as it is when they run, as on the full path; a ``set_pattern`` gives the tiles new memory (new pointers and
shapes), so it misses.

Measured on CPU with launches stubbed (``benchmarks/diagnose/host_cost.py``): see docs/performance.md.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch

from sparseblocks import dispatch
from sparseblocks.format import BlockSparseMatrix
from sparseblocks.kernels import one_token, prepared
from sparseblocks.kernels.tuning import stream_capturing

# Prepared calls kept per weight: enough for a decode step's one token and a prefill's few shapes; a model fed ever
# new token counts clears them rather than grow.
MAX_CALLS = 8

# A key whose capture could not be prepared holds one of these instead of a call. The first call of a shape may
# autotune (not replayable) and the second prepare; a key refused twice takes the full path without capturing
# again: capturing and trying to prepare every call of a descriptor-plan layer made ViT-B/16 at 32 images 23%
# slower eagerly on an H100 (4778 -> 3692 images/s).
REFUSED_ONCE, FULL_PATH = "refused once", "full path"

# By id of the weight's values tensor: (a weak reference to it, its calls by key). The weak reference's callback
# drops the entry with the tensor; a prepared call holds raw pointers only, never the tensors.
_CALLS: dict[int, tuple[weakref.ref, dict[tuple, prepared.PreparedCall | str]]] = {}


def context(dtype: torch.dtype) -> tuple:
    """Every switch that can change what the full path launches for ``dtype`` inputs: ``dispatch.path_context``
    (forced plans, reference mode, fp32 precision...), Triton's own (``prepared.triton_flags``) and the one-token
    MLP's programmatic launches. A new switch goes into one of those."""
    return *dispatch.path_context(dtype), *prepared.triton_flags(), one_token.PROGRAMMATIC_LAUNCH


def _stream(x: torch.Tensor) -> int | None:
    """The raw handle of the current stream of x's device, or None where another device is current (the full path
    switches devices for its launches; a replay does not)."""
    device = x.get_device()
    if torch.cuda.current_device() != device:
        return None
    return torch._C._cuda_getCurrentRawStream(device)


def matrix_key(w: BlockSparseMatrix) -> tuple:
    """What the launches take of ``w`` besides its memory's contents: shapes, dtypes and pointers of the arrays the
    forward kernels read."""
    values, scales = w.values, w.scales
    arrays = (w.crow_indices, w.col_indices, w.row_indices_of_block, w.row_order)
    return (
        w.shape, values.shape, values.dtype, values.data_ptr(), w.fp8_activations,
        None if scales is None else (scales.data_ptr(), scales.dtype, scales.shape),
        *[(a.data_ptr(), a.dtype) for a in arrays],
    )  # fmt: skip


def fixed_tensors(w: BlockSparseMatrix | None) -> list[torch.Tensor]:
    """The tensors of ``w`` that :func:`matrix_key` pins (passed to the launches as raw pointers)."""
    if w is None:
        return []
    tensors = [w.values, w.crow_indices, w.col_indices, w.row_indices_of_block, w.row_order]
    return tensors + ([w.scales] if w.scales is not None else [])


def bias_key(bias: torch.Tensor | None) -> tuple | None:
    return None if bias is None else (bias.data_ptr(), bias.dtype, bias.shape, bias.stride())


def replayed(
    x: torch.Tensor,
    owner: BlockSparseMatrix,
    key: tuple,
    fixed: Callable[[], Sequence[torch.Tensor | None]],
    full_path: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """The output of a call on ``x``: replayed from the call prepared under ``key`` (extended by the stream and x's
    alignment) among ``owner``'s, else from ``full_path()``, whose launches are captured and kept under ``key``
    where they can be replayed. ``fixed()``: the tensors the key pins by pointer (weights, biases)."""
    stream = _stream(x)
    if stream is None or prepared.capturing():  # inside another op's capture, the launches are that op's
        return full_path()
    key = (*key, x.shape, x.stride(), x.dtype, x.get_device(), x.data_ptr() % 16 == 0, stream)
    values = owner.values
    entry = _CALLS.get(id(values))
    call = entry[1].get(key) if entry is not None and entry[0]() is values else None
    if call is FULL_PATH:
        return full_path()
    if call is not None and call is not REFUSED_ONCE:
        y = call.run(x, stream)
        if y is not None:
            return y
    with prepared.capture() as record:
        y = full_path()
    if stream_capturing():  # memory allocated in a CUDA-graph capture belongs to the graph
        return y
    prepared_call = prepared.prepare(record, x, y, fixed())
    if prepared_call is None:
        prepared_call = FULL_PATH if call is REFUSED_ONCE else REFUSED_ONCE
    _store(values, key, prepared_call)
    return y


def _store(values: torch.Tensor, key: tuple, call: prepared.PreparedCall | str) -> None:
    """Keep ``call`` under ``key`` among the prepared calls of the weight holding ``values``; a new key when
    ``MAX_CALLS`` are kept empties them first (replacing a key's entry keeps the others)."""
    owner = id(values)
    entry = _CALLS.get(owner)
    if entry is None or entry[0]() is not values:

        def forget(reference: weakref.ref, owner: int = owner) -> None:
            if _CALLS.get(owner, (None,))[0] is reference:
                del _CALLS[owner]

        entry = _CALLS[owner] = (weakref.ref(values, forget), {})
    calls = entry[1]
    if key not in calls and len(calls) >= MAX_CALLS:
        calls.clear()
    calls[key] = call


def forget_all() -> None:
    """Drop every prepared call (tests, benchmarks)."""
    _CALLS.clear()
