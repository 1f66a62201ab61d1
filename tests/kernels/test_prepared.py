"""Prepared launches (``kernels/prepared.py``) on the CPU: a fake compiled kernel stands in for Triton's, the binder
and its specialization are Triton's own (built for a CUDA target without a GPU). The GPU tests that replay real
launches are in ``tests/ops/test_prepared_calls.py``."""

import pytest
import torch
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.runtime.jit import JITFunction, create_function_from_signature
from triton.tools.tensor_descriptor import TensorDescriptor

from sparseblocks.kernels import prepared


def _scale(x_ptr, y_ptr, n, stride, BLOCK: tl.constexpr):  # the signature of a kernel, never compiled here
    pass


KERNEL = JITFunction(_scale)
BINDER = create_function_from_signature(KERNEL.signature, KERNEL.params, CUDABackend(GPUTarget("cuda", 90, 32)))


class FakeCompiled:
    """A ``CompiledKernel``'s launch surface: ``run`` records its arguments instead of launching."""

    function, packed_metadata = 1234, (4, 1, 0)

    def __init__(self):
        self.calls = []

    def run(self, *args):
        self.calls.append(args)


def _captured(x: torch.Tensor):
    """A call on ``x`` that launched the fake kernel once, on x and a fresh output."""
    compiled = FakeCompiled()
    with prepared.capture() as record:
        y = torch.empty_like(x)
        prepared.allocated(y)
        args = (x, y, x.numel(), x.stride(0))
        prepared.launched(KERNEL, compiled, lambda meta: (x.numel() // meta["BLOCK"],), args, {"BLOCK": 16})
    return compiled, record, y


def test_a_replay_launches_the_captured_kernel_on_the_new_pointers():
    x = torch.randn(64)
    compiled, record, y = _captured(x)
    call = prepared.prepare(record, x, y, [], bind=lambda kernel: BINDER)
    assert call is not None
    new_x = torch.randn(64)
    out = call.run(new_x, stream=7)
    assert out.shape == y.shape and out.dtype == y.dtype
    (args,) = compiled.calls
    grid, stream, function, metadata, hooks = args[:3], args[3], args[4], args[5], args[6:9]
    assert grid == (4, 1, 1) and stream == 7 and function == 1234 and metadata == (4, 1, 0)
    assert hooks == (None, None, None)  # no launch metadata, no hooks: the replay refuses while hooks are installed
    assert args[9:] == (new_x.data_ptr(), out.data_ptr(), 64, 1, 16)  # every parameter, the constexpr included


def test_a_pointer_triton_would_specialize_otherwise_is_not_replayed():
    """Captured on a 16-byte aligned x; a view one element in (4 bytes off) would compile another kernel, so the
    replay refuses it before launching anything. (Planting the bug, dropping the check in ``PreparedCall.run``,
    makes this test fail.)"""
    storage = torch.randn(65)
    x = storage[:64]
    assert x.data_ptr() % 16 == 0
    compiled, record, y = _captured(x)
    call = prepared.prepare(record, x, y, [], bind=lambda kernel: BINDER)
    misaligned = storage[1:]
    assert BINDER(misaligned, y, 64, 1, BLOCK=16)[1][0] == ("*fp32", "")  # what Triton would specialize on
    assert call.run(misaligned, stream=0) is None
    assert compiled.calls == []
    assert call.run(torch.randn(64), stream=0) is not None


def test_a_capture_on_a_misaligned_input_replays_only_misaligned_ones():
    storage = torch.randn(65)
    compiled, record, y = _captured(storage[1:])
    call = prepared.prepare(record, storage[1:], y, [], bind=lambda kernel: BINDER)
    assert call.run(torch.randn(64), stream=0) is None
    assert call.run(torch.randn(65)[1:], stream=0) is not None


def test_what_cannot_be_replayed_is_not_prepared():
    x = torch.randn(64)
    bind = lambda kernel: BINDER
    compiled = FakeCompiled()
    # a tensor made in the call that no launch site declared (a copy of the input)
    with prepared.capture() as record:
        y = torch.empty_like(x)
        prepared.allocated(y)
        prepared.launched(KERNEL, compiled, (4,), (x.clone(), y, 64, 1), {"BLOCK": 16})
    assert prepared.prepare(record, x, y, [], bind) is None
    # work the replay would not repeat, and a launch under the interpreter (no compiled kernel)
    for refuse in (lambda: prepared.not_replayable("autotuned"), lambda: prepared.launched(KERNEL, None, (4,), (), {})):
        with prepared.capture() as record:
            y = torch.empty_like(x)
            prepared.allocated(y)
            prepared.launched(KERNEL, compiled, (4,), (x, y, 64, 1), {"BLOCK": 16})
            refuse()
        assert prepared.prepare(record, x, y, [], bind) is None
    # an object built per call (a tensor descriptor)
    with prepared.capture() as record:
        y = torch.empty_like(x)
        prepared.allocated(y)
        descriptor = TensorDescriptor(x.view(8, 8), [8, 8], [8, 1], [8, 8])
        prepared.launched(KERNEL, compiled, (4,), (x, y, 64, descriptor), {"BLOCK": 16})
    assert prepared.prepare(record, x, y, [], bind) is None
    # nothing launched
    with prepared.capture() as record:
        y = torch.empty_like(x)
    assert prepared.prepare(record, x, y, [], bind) is None


def test_fixed_and_persistent_tensors_pass_as_their_pointers_and_scratch_comes_from_one_workspace():
    x, weight, counters = torch.randn(64), torch.randn(64), torch.zeros(8, dtype=torch.int32)
    compiled = FakeCompiled()
    with prepared.capture() as record:
        y, scratch = torch.empty_like(x), torch.empty(100)
        prepared.allocated(y, scratch)
        prepared.persistent(counters)
        prepared.launched(KERNEL, compiled, (1,), (weight, scratch, 64, 1), {"BLOCK": 16})
        prepared.launched(KERNEL, compiled, (2,), (scratch, counters, 64, 1), {"BLOCK": 16})
        prepared.launched(KERNEL, compiled, (3,), (x, y, 64, 1), {"BLOCK": 16})
    call = prepared.prepare(record, x, y, [weight], bind=lambda kernel: BINDER)
    assert call.workspace_bytes == 512  # 400 bytes, in whole 256-byte slots
    new_x = torch.randn(64)
    out = call.run(new_x, stream=0)
    first, second, third = (args[9:11] for args in compiled.calls)
    assert first[0] == weight.data_ptr() and second[1] == counters.data_ptr()
    assert first[1] == second[0]  # the same scratch slot in both launches
    assert third == (new_x.data_ptr(), out.data_ptr())


def test_no_replay_while_a_launch_hook_is_installed():
    x = torch.randn(64)
    compiled, record, y = _captured(x)
    call = prepared.prepare(record, x, y, [], bind=lambda kernel: BINDER)
    hook = lambda metadata: None
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert prepared.hooks_installed()
        assert call.run(torch.randn(64), stream=0) is None
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert not prepared.hooks_installed()
    assert compiled.calls == []


@pytest.mark.parametrize("value", [True, False])
def test_triton_flags_follow_the_debug_knob(value):
    default = knobs.runtime.debug
    knobs.runtime.debug = value
    try:
        assert prepared.triton_flags()[0] is value
    finally:
        knobs.runtime.debug = default


def test_allocated_tensors_sharing_memory_are_not_given_separate_slots():
    """Two declared allocations that are views of one buffer (the output and a reshaped alias a launch writes
    through) must map to one piece of memory in a replay; carved as separate slots, the launch would write the
    workspace and the returned output would stay uninitialized."""
    x = torch.randn(64)
    compiled = FakeCompiled()
    with prepared.capture() as record:
        y = torch.empty(64)
        alias = y.view(8, 8)
        prepared.allocated(y, alias)
        prepared.launched(KERNEL, compiled, (4,), (x, alias, 64, 1), {"BLOCK": 16})
    call = prepared.prepare(record, x, y, [], bind=lambda kernel: BINDER)
    if call is not None:  # refusing is fine; replaying into other memory is not
        out = call.run(torch.randn(64), stream=0)
        assert compiled.calls[-1][10] == out.data_ptr()
