"""Prepared launches: the Triton launches of one eager call, captured once and replayed on the next call's tensors
without our argument building and without Triton's binder (specialization, cache key), for eager inference.

A normal launch goes through ``JITFunction.run``: it binds and specializes every argument, builds the cache key, finds
the ``CompiledKernel`` and calls its launcher. :func:`capture` records, from one normal call, each launch's compiled
kernel, grid and full argument list (constexprs included: the launcher takes every parameter, Triton 3.6's
``make_launcher`` skips the constexprs itself), and :func:`prepare` turns them into a :class:`PreparedCall` whose
:meth:`~PreparedCall.run` calls the launchers straight away, with the per-call pointers substituted.

Why each replay equals the normal call (what the caller must guarantee is in :func:`prepare`'s docstring):

* Every tensor argument has one of four roles, or nothing is prepared: a *fixed* tensor the caller names (weights,
  biases), passed as its raw pointer, which the caller's cache key holds; the *input* (x, by its pointer), substituted
  per call; a tensor *allocated* in the call (the output, scratch, a hidden activation handed from one launch to
  the next; launch sites say so through :func:`allocated`), carved per call from a fresh output tensor and one fresh
  workspace; a *persistent* buffer (the decode kernels' arrival counters, zero between launches on one stream;
  :func:`persistent`), passed as its pointer, the caller's key holding the stream. Any other tensor (a copy made in
  the call, a TMA descriptor) and any launch we did not see (autotuning, a config pre-hook, PyTorch work between
  launches: :func:`not_replayable`) leave the capture unprepared.
* Triton specializes each pointer on its 16-byte alignment. For the per-call pointers the alignment the binder
  computed at capture is kept, and a replay on a pointer that would specialize otherwise returns None before
  launching anything (the caller then takes the normal path). Integers and the fixed pointers are set by the
  caller's key, so they specialize as they did.
* With a launch hook installed (a profiler: ``triton.knobs.runtime.launch_enter_hook``), replays return None: the
  normal path calls the hooks.

Not covered: a kernel's used globals are not re-checked (``JITFunction.run`` raises when one changed since the
compile), and a config the autotuner is told to forget keeps running in replays until the caller's cache drops it
(a slower choice at worst, never a wrong result: the grid was captured with it).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from triton import knobs

# Pointers carved from the per-call workspace start at multiples of this many bytes (the caching allocator's blocks
# are 512-byte aligned), so a slot is 16-byte aligned whenever the workspace is.
WORKSPACE_ALIGNMENT = 256
# Argument types baked into a prepared launch as they were (the caller's key fixes them).
_PLAIN = (int, float, bool, str, type(None), torch.dtype)


@dataclass
class Capture:
    """What the launch sites reported during one call (:func:`capture`)."""

    launches: list[tuple[Any, Any, Any, tuple, dict]] = field(default_factory=list)
    allocated: dict[int, torch.Tensor] = field(default_factory=dict)  # by id
    persistent: set[int] = field(default_factory=set)  # ids
    refused: str | None = None  # why the call cannot be replayed, if it cannot


_capture: contextvars.ContextVar[Capture | None] = contextvars.ContextVar("sparseblocks_capture", default=None)


@contextlib.contextmanager
def capture() -> Iterator[Capture]:
    """Within the block, launch sites report their launches to the :class:`Capture` yielded."""
    record = Capture()
    token = _capture.set(record)
    try:
        yield record
    finally:
        _capture.reset(token)


def capturing() -> bool:
    """Whether a :func:`capture` is active here (an op called inside another op's captured call)."""
    return _capture.get() is not None


def allocated(*tensors: torch.Tensor | None) -> None:
    """Launch sites: these tensors were allocated in this call (output, scratch), ``torch.empty`` each call."""
    record = _capture.get()
    if record is not None:
        record.allocated.update((id(t), t) for t in tensors if t is not None)


def persistent(tensor: torch.Tensor) -> None:
    """Launch sites: this buffer outlives the call and is the same for every call on this device and stream."""
    record = _capture.get()
    if record is not None:
        record.persistent.add(id(tensor))


def not_replayable(reason: str) -> None:
    """Launch sites: this call did work a replay would not repeat (``reason`` says what)."""
    record = _capture.get()
    if record is not None and record.refused is None:
        record.refused = reason


def launched(kernel: Any, compiled: Any, grid: Any, args: Sequence, kwargs: dict) -> None:
    """Launch sites: ``kernel[grid](*args, **kwargs)`` ran and returned ``compiled`` (None under the interpreter,
    which compiles nothing)."""
    record = _capture.get()
    if record is None:
        return
    if compiled is None:
        not_replayable("no compiled kernel (Triton's interpreter)")
    else:
        record.launches.append((kernel, compiled, grid, tuple(args), dict(kwargs)))


def launch(kernel: Any, grid: Any, args: Sequence, kwargs: dict) -> None:
    """``kernel[grid](*args, **kwargs)``, reported to the capture in progress (:func:`launched`): how launch sites
    launch."""
    launched(kernel, kernel[grid](*args, **kwargs), grid, args, kwargs)


def binder(kernel: Any) -> Callable:
    """Triton's argument binder of the JIT function ``kernel`` on the current device, the one ``JITFunction.run``
    calls: ``binder(*args, **kwargs)`` returns the bound arguments (every parameter, in order), their
    specialization (``("*bf16", "D")`` for a 16-byte aligned bf16 pointer) and the options."""
    from triton.runtime.driver import driver

    return kernel.device_caches[driver.active.get_current_device()][4]


def hooks_installed() -> bool:
    """Whether a Triton launch hook is installed (a profiler): then launches take the normal path, which calls it.
    Triton 3.6 keeps the hooks in a ``HookChain``, empty by default; older versions kept None."""
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return (enter is not None and bool(getattr(enter, "calls", True))) or (
        leave is not None and bool(getattr(leave, "calls", True))
    )


def triton_flags() -> tuple:
    """Triton's global settings that change which kernel ``JITFunction.run`` picks (they are part of its options):
    a caller's cache key holds them, so changing one prepares anew."""
    return knobs.runtime.debug, knobs.compilation.instrumentation_mode


# Per-call pointer roles.
INPUT, OUTPUT, WORKSPACE = 0, 1, 2


class _Slot(NamedTuple):
    """A per-call pointer argument: its position, whose pointer (``INPUT``, ``OUTPUT``, ``WORKSPACE``), the byte
    offset into it, and whether Triton saw it 16-byte aligned at capture."""

    position: int
    role: int
    offset: int
    aligned: bool


class _Launch(NamedTuple):
    run: Any  # the CompiledKernel's launcher
    grid: tuple[int, int, int]
    function: int
    packed_metadata: Any
    template: tuple  # every argument, the per-call pointers as None
    slots: tuple[_Slot, ...]


class PreparedCall:
    """The launches of one captured call, replayed by :meth:`run` on a new input of the same key.

    ``output``: the shape and dtype of the tensor the call returns (allocated per call, contiguous);
    ``workspace_bytes``: the size of the one uint8 buffer the other allocations of the call are carved from.
    """

    __slots__ = ("launches", "output_dtype", "output_shape", "workspace_bytes")

    def __init__(self, launches: list[_Launch], output_shape: torch.Size, output_dtype: torch.dtype,
                 workspace_bytes: int) -> None:  # fmt: skip
        self.launches = launches
        self.output_shape, self.output_dtype, self.workspace_bytes = output_shape, output_dtype, workspace_bytes

    def run(self, x: torch.Tensor, stream: int) -> torch.Tensor | None:
        """The call's output for input ``x`` (of the captured call's key), its launches issued on ``stream`` (a raw
        CUDA stream handle); None, with nothing launched, where a pointer would specialize otherwise than at capture
        or a launch hook is installed."""
        if hooks_installed():
            return None
        out = torch.empty(self.output_shape, dtype=self.output_dtype, device=x.device)
        workspace = None
        bases = [x.data_ptr(), out.data_ptr(), 0]
        if self.workspace_bytes:
            workspace = torch.empty(self.workspace_bytes, dtype=torch.uint8, device=x.device)
            bases[WORKSPACE] = workspace.data_ptr()
        calls = []
        for launch in self.launches:
            args = list(launch.template)
            for slot in launch.slots:
                pointer = bases[slot.role] + slot.offset
                if (pointer % 16 == 0) is not slot.aligned:
                    return None
                args[slot.position] = pointer
            calls.append(args)
        for launch, args in zip(self.launches, calls, strict=True):
            grid = launch.grid
            launch.run(grid[0], grid[1], grid[2], stream, launch.function, launch.packed_metadata, None, None, None,
                       *args)  # fmt: skip
        del workspace  # freed on the stream the launches use: the caching allocator reuses it after them
        return out


def prepare(
    record: Capture,
    x: torch.Tensor,
    output: torch.Tensor,
    fixed: Sequence[torch.Tensor | None],
    bind: Callable[[Any], Callable] | None = None,
) -> PreparedCall | None:
    """A :class:`PreparedCall` replaying the launches of ``record``, the capture of one call on input ``x`` that
    returned ``output``; None where that call cannot be replayed (see the module docstring).

    The caller's cache key must determine everything but the per-call tensors: every integer argument (shapes,
    strides), the grid, which launches run, and each ``fixed`` tensor's pointer and dtype (they are passed as raw
    pointers). The full path must not change, outside a launch, a tensor a launch reads or writes (ours do not).
    ``bind``: how to find a kernel's binder (:func:`binder`; tests pass one for a fake kernel).
    """
    bind = bind or binder
    if record.refused is not None or not record.launches or not output.is_contiguous():
        return None
    fixed_ids = {id(t) for t in fixed if t is not None}
    # the output: the allocated tensor it is, or views (same start, same size)
    output_id = next((key for key, t in record.allocated.items()
                      if t.data_ptr() == output.data_ptr() and t.numel() == output.numel()), None)  # fmt: skip
    if output_id is None:
        return None
    # each allocated tensor gets its own slot: two declared views of one buffer would be carved apart
    storages = [t.untyped_storage().data_ptr() for t in record.allocated.values() if t.numel()]
    if len(set(storages)) != len(storages):
        return None
    offsets: dict[int, int] = {}
    workspace_bytes = 0
    launches = []
    for kernel, compiled, grid, args, kwargs in record.launches:
        bound, specialization, _ = bind(kernel)(*args, **kwargs)
        values = list(bound.values())
        if callable(grid):
            grid = grid(bound)
        grid = (*grid, 1, 1)[:3]
        template, slots = [], []
        for position, value in enumerate(values):
            if isinstance(value, _PLAIN):
                template.append(value)
                continue
            if not isinstance(value, torch.Tensor):
                return None  # a descriptor or other object built per call
            pointer = value.data_ptr()
            aligned = specialization[position][1] == "D"
            if aligned is not (pointer % 16 == 0):
                return None  # Triton did not specialize this pointer on its alignment as we expect: do not guess
            key = id(value)
            if key in fixed_ids or key in record.persistent:
                template.append(pointer)
                continue
            if key == output_id:
                slot = _Slot(position, OUTPUT, 0, aligned)
            elif key in record.allocated:
                if not value.is_contiguous():
                    return None
                if key not in offsets:
                    offsets[key] = workspace_bytes
                    size = value.numel() * value.element_size()
                    workspace_bytes += -(-size // WORKSPACE_ALIGNMENT) * WORKSPACE_ALIGNMENT
                slot = _Slot(position, WORKSPACE, offsets[key], aligned)
            elif pointer == x.data_ptr() and value.dtype == x.dtype:
                slot = _Slot(position, INPUT, 0, aligned)
            else:
                return None  # a tensor made in the call that no launch site declared (a copy of an input)
            template.append(None)
            slots.append(slot)
        compiled = compiled.result() if hasattr(compiled, "result") else compiled
        run = compiled.run  # loads the binary if it is not yet
        launches.append(_Launch(run, grid, compiled.function, compiled.packed_metadata, tuple(template),
                                tuple(slots)))  # fmt: skip
    return PreparedCall(launches, output.shape, output.dtype, workspace_bytes)
