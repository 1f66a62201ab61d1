"""Prepared eager calls (``ops/prepared_calls.py``): what the cache key holds, when calls bypass it (CPU), and, on a
GPU, replays equal to the full path, a misaligned input included."""

import sys

import pytest
import torch
from triton import knobs

from sparseblocks import BlockSparseLinear, BlockSparseMatrix, fp32_precision
from sparseblocks.backend import interpreted_kernels, prepared_launches, reference_mode
from sparseblocks.dispatch import force_plan
from sparseblocks.kernels import one_token, prepared
from sparseblocks.ops import prepared_calls, sparse_mlp, spmm
from sparseblocks.ops.spmm import eager_inference


@pytest.fixture(autouse=True)
def prepared_launches_on():
    """This module's tests turn prepared launches on themselves, whatever the default."""
    with prepared_launches(True):
        yield


def test_every_switch_changes_the_context():
    """Each switch the full path reads gives another key (for fp32, where the dot precision is read)."""
    base = prepared_calls.context(torch.float32)
    changed = []
    for switch in (lambda: force_plan(forward="rows"), reference_mode, interpreted_kernels,
                   lambda: fp32_precision("tf32x3")):  # fmt: skip
        with switch():
            changed.append(prepared_calls.context(torch.float32))
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = not allow_tf32
    try:
        changed.append(prepared_calls.context(torch.float32))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    for module, name, value in ((knobs.runtime, "debug", True), (one_token, "PROGRAMMATIC_LAUNCH", False)):
        default = getattr(module, name)
        setattr(module, name, value if default != value else not value)
        try:
            changed.append(prepared_calls.context(torch.float32))
        finally:
            setattr(module, name, default)
    assert all(context != base for context in changed)
    assert len(set(changed)) == len(changed)
    assert prepared_calls.context(torch.float32) == base


def test_the_matrix_key_follows_a_new_pattern():
    layer = BlockSparseLinear(128, 128, sparsity=0.5, block_size=32)
    before = prepared_calls.matrix_key(layer.matrix)
    assert prepared_calls.matrix_key(layer.matrix) == before  # a new matrix object each call, the same key
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = True
    layer.set_pattern(mask)
    assert prepared_calls.matrix_key(layer.matrix) != before


def test_calls_that_cannot_replay_take_the_full_path():
    layer = BlockSparseLinear(64, 64, sparsity=0.5, block_size=32)
    w, x, bias = layer.matrix, torch.randn(1, 64), layer.bias.detach()
    assert not eager_inference(x, (w,), (bias,), None)  # a CPU tensor
    if not torch.cuda.is_available():
        return
    w = w.to("cuda")
    x, w, bias = x.cuda(), BlockSparseMatrix.from_parts(w.values.detach(), w.shape, w.index_tensors()), bias.cuda()
    assert eager_inference(x, (w,), (bias,), "gelu")
    assert not eager_inference(x.requires_grad_(), (w,), (bias,), None)  # autograd records it
    x = x.detach()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert not eager_inference(x, (w,), (bias,), None)
    with prepared_launches(False):
        assert not eager_inference(x, (w,), (bias,), None)
    assert not eager_inference(x, ("not a matrix",), (bias,), None)
    assert not eager_inference(x, (w,), (bias,), ["gelu"])


def _replays(monkeypatch) -> list[bool]:
    """Whether each prepared call's replay ran (True) or refused (False), in order."""
    seen, run = [], prepared.PreparedCall.run

    def counted(self, x, stream):
        out = run(self, x, stream)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(prepared.PreparedCall, "run", counted)
    return seen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 8, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_replays_equal_the_full_path_on_gpu(m, dtype, monkeypatch, no_tf32):
    """A replay gives the full path's bits; then x at storage offset 1 (misaligned, same shape) is not replayed on
    the aligned capture, and its result still equals the reference."""
    torch.manual_seed(0)
    layer = BlockSparseLinear(768, 3072, sparsity=0.9, block_size=64, device="cuda", dtype=dtype)
    w, bias = layer.matrix, layer.bias.detach()
    replays = _replays(monkeypatch)
    storage = torch.randn(m * 768 + 1, device="cuda", dtype=dtype)
    x, misaligned = storage[: m * 768].view(m, 768), storage[1:].view(m, 768)
    with torch.no_grad():
        with prepared_launches(False):
            full, full_misaligned = spmm(x, w, bias, "gelu"), spmm(misaligned, w, bias, "gelu")
        first, second = spmm(x, w, bias, "gelu"), spmm(x, w, bias, "gelu")
        assert replays == [True] or replays == []  # the first call prepared after tuning: the second replays
        assert torch.equal(first, full) and torch.equal(second, full)
        out = spmm(misaligned, w, bias, "gelu")
        assert torch.equal(out, full_misaligned)
        assert torch.equal(spmm(misaligned, w, bias, "gelu"), full_misaligned)  # replayed from its own capture
        reference = torch.nn.functional.gelu(misaligned.double() @ w.to_dense().double().T + bias.double())
    assert (out.double() - reference).norm() / reference.norm() < (1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert any(replays)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 4, 128])
@pytest.mark.parametrize("gated", [False, True])
def test_mlp_replays_equal_the_full_path_on_gpu(m, gated, monkeypatch):
    torch.manual_seed(0)
    make = lambda k, n: BlockSparseLinear(k, n, sparsity=0.9, block_size=64, device="cuda", dtype=torch.bfloat16)
    up, down, gate = make(512, 2048), make(2048, 512), make(512, 2048) if gated else None
    args = (up.matrix, down.matrix, gate.matrix if gated else None, up.bias.detach(), down.bias.detach())
    replays = _replays(monkeypatch)
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        with prepared_launches(False):
            full = sparse_mlp(x, *args, activation="silu")
        for _ in range(3):
            assert torch.equal(sparse_mlp(x, *args, activation="silu"), full)
        # the weights edited in place: a replay reads them as they are now
        up.values.data.mul_(2)
        with prepared_launches(False):
            full = sparse_mlp(x, *args, activation="silu")
        assert torch.equal(sparse_mlp(x, *args, activation="silu"), full)
    assert any(replays)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_new_pattern_and_a_side_stream_are_prepared_anew_on_gpu(monkeypatch):
    torch.manual_seed(0)
    layer = BlockSparseLinear(256, 512, sparsity=0.5, block_size=64, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(3):
            layer(x)
        mask = torch.zeros(8, 4, dtype=torch.bool, device="cuda")
        mask[::2, 1] = True
        layer.set_pattern(mask)
        with prepared_launches(False):
            full = layer(x)
        assert torch.equal(layer(x), full) and torch.equal(layer(x), full)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            outs = [layer(x) for _ in range(3)]
        torch.cuda.current_stream().wait_stream(stream)
        assert all(torch.equal(out, full) for out in outs)


def test_a_key_refused_twice_takes_the_full_path_without_capturing(monkeypatch):
    """The first call of a shape may autotune (refused), the second prepares; a key refused twice (a descriptor
    plan) stops capturing, which cost every call of such a layer its capture and a binder run."""
    monkeypatch.setattr(prepared_calls, "_stream", lambda x: 0)
    attempts = []
    monkeypatch.setattr(prepared, "prepare", lambda *args: attempts.append(args))  # None: refused
    w, x = BlockSparseLinear(64, 64, sparsity=0.5, block_size=32).matrix, torch.randn(1, 64)
    try:
        outs = [prepared_calls.replayed(x, w, ("test",), lambda: [], lambda: x + 1) for _ in range(4)]
    finally:
        prepared_calls.forget_all()
    assert len(attempts) == 2 and all(torch.equal(out, x + 1) for out in outs)


def test_an_op_inside_another_ops_capture_takes_the_full_path(monkeypatch):
    """An ``spmm`` inside ``sparse_mlp``'s capture launches through the full path: a replay there would hide its
    launches from the outer capture."""
    monkeypatch.setattr(prepared_calls, "_stream", lambda x: 0)
    monkeypatch.setattr(prepared.PreparedCall, "run", lambda *args: pytest.fail("replayed inside a capture"))
    monkeypatch.setattr(prepared, "prepare", lambda *args: pytest.fail("prepared inside a capture"))
    w, x = BlockSparseLinear(64, 64, sparsity=0.5, block_size=32).matrix, torch.randn(1, 64)
    with prepared.capture():
        assert torch.equal(prepared_calls.replayed(x, w, ("test",), lambda: [], lambda: x + 1), x + 1)


def test_compiled_code_never_reads_the_switch(monkeypatch):
    """Under torch.compile the eligibility check stops at ``is_compiling`` before the switch (a ContextVar, which
    dynamo cannot trace: a graph break at every sparse layer), also where the device could replay."""
    # the module, not the function of the same name that sparseblocks.ops exports
    monkeypatch.setattr(sys.modules["sparseblocks.ops.spmm"], "_replay_device", lambda x: True)  # as on CUDA
    layer = BlockSparseLinear(64, 48, sparsity=0.5, block_size=16)
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer.to_linear()(x))


def test_a_full_cache_is_emptied_for_a_new_key_only(monkeypatch):
    """``MAX_CALLS`` keys kept: a key's second refusal replaces its entry and keeps the others; a new key empties
    them (a model fed ever new token counts does not grow the cache)."""
    monkeypatch.setattr(prepared_calls, "_stream", lambda x: 0)
    monkeypatch.setattr(prepared, "prepare", lambda *args: None)
    w, x = BlockSparseLinear(64, 64, sparsity=0.5, block_size=32).matrix, torch.randn(1, 64)
    kept = lambda: len(prepared_calls._CALLS[id(w.values)][1])
    try:
        for i in range(prepared_calls.MAX_CALLS):
            prepared_calls.replayed(x, w, (i,), lambda: [], lambda: x)
        prepared_calls.replayed(x, w, (0,), lambda: [], lambda: x)  # refused again: FULL_PATH replaces its entry
        assert kept() == prepared_calls.MAX_CALLS
        prepared_calls.replayed(x, w, ("new",), lambda: [], lambda: x)
        assert kept() == 1
    finally:
        prepared_calls.forget_all()
