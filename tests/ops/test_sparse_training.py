"""Training with BlockSparseLinear: optimizers, autocast, pattern changes, torch.compile and DDP."""

import contextlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import relative_error
from sparseblocks import BlockSparseLinear, BlockSparseMatrix, reference
from sparseblocks.format import INDEX_NAMES


def _layer(seed=0, sparsity=0.5, block=16):
    torch.manual_seed(seed)
    return BlockSparseLinear(64, 48, sparsity=sparsity, block_size=block)


def test_any_optimizer_trains_only_kept_tiles():
    layer = _layer()
    mask = layer.matrix.block_mask()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    x, target = torch.randn(32, 64), torch.randn(32, 48)
    losses = []
    for _ in range(20):
        loss = nn.functional.mse_loss(layer(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    dense = layer.matrix.to_dense().detach()
    pruned = ~mask.repeat_interleave(16, 0).repeat_interleave(16, 1)
    assert torch.equal(dense[pruned], torch.zeros_like(dense[pruned])), "weight decay or a step touched a pruned tile"


def test_autocast_casts_like_linear_and_keeps_fp32_gradients():
    layer = _layer()
    x = torch.randn(8, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert layer.values.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    expected = reference.spmm(x.double(), layer.matrix.to(dtype=torch.float64), layer.bias.double())
    assert relative_error(out, expected) < 2e-2


def test_set_pattern_keeps_surviving_tiles_and_their_optimizer_state():
    layer = _layer(sparsity=0.5)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(16, 64)
    layer(x).square().sum().backward()
    optimizer.step()
    old_mask, old_dense = layer.matrix.block_mask(), layer.matrix.to_dense().detach().clone()
    old_moment = BlockSparseMatrix.from_parts(
        optimizer.state[layer.values]["exp_avg"], layer.matrix.shape, layer.matrix.index_tensors()
    ).to_dense()
    values_param = layer.values

    # Drop two kept tiles, grow three (the tile count changes too).
    new_mask = old_mask.clone()
    kept, pruned = old_mask.nonzero(), (~old_mask).nonzero()
    new_mask[kept[0, 0], kept[0, 1]] = new_mask[kept[1, 0], kept[1, 1]] = False
    for row, col in pruned[:3]:
        new_mask[row, col] = True
    layer.set_pattern(new_mask, optimizer)

    assert layer.values is values_param and torch.equal(layer.matrix.block_mask(), new_mask)
    tile = new_mask.repeat_interleave(16, 0).repeat_interleave(16, 1)
    survived = (old_mask & new_mask).repeat_interleave(16, 0).repeat_interleave(16, 1)
    grown = (new_mask & ~old_mask).repeat_interleave(16, 0).repeat_interleave(16, 1)
    new_dense = layer.matrix.to_dense().detach()
    assert torch.equal(new_dense[survived], old_dense[survived])
    assert torch.equal(new_dense[grown], torch.zeros_like(new_dense[grown]))
    assert torch.equal(new_dense[~tile], torch.zeros_like(new_dense[~tile]))
    state = optimizer.state[layer.values]
    assert state["exp_avg"].shape == layer.values.shape == state["exp_avg_sq"].shape
    new_moment = BlockSparseMatrix.from_parts(state["exp_avg"], layer.matrix.shape, layer.matrix.index_tensors())
    new_moment = new_moment.to_dense()
    assert torch.equal(new_moment[survived], old_moment[survived])
    assert torch.equal(new_moment[grown], torch.zeros_like(new_moment[grown]))

    layer(x).square().sum().backward()  # and training goes on
    optimizer.step()
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        layer.set_pattern(new_mask[:1])


def test_set_pattern_moves_factored_optimizer_state_with_its_tiles():
    """Adafactor keeps ``row_var`` ``(nnz, bn, 1)`` and ``col_var`` ``(nnz, 1, bk)``: per tile along dim 0, not
    shaped like ``values``; each surviving tile keeps its own, a grown tile starts at zero."""
    layer = _layer(sparsity=0.5)
    optimizer = torch.optim.Adafactor(layer.parameters(), lr=1e-2)
    x = torch.randn(16, 64)
    layer(x).square().sum().backward()
    optimizer.step()
    old_mask = layer.matrix.block_mask()
    old_tiles = [tuple(tile) for tile in old_mask.nonzero().tolist()]  # row-major: the stored order
    state = optimizer.state[layer.values]
    old_rows = dict(zip(old_tiles, state["row_var"].clone(), strict=True))
    old_cols = dict(zip(old_tiles, state["col_var"].clone(), strict=True))

    new_mask = old_mask.clone()
    new_mask[old_tiles[0]] = False  # every later tile moves down one slot
    grown = tuple((~old_mask).nonzero()[-1].tolist())
    new_mask[grown] = True
    layer.set_pattern(new_mask, optimizer)

    state = optimizer.state[layer.values]
    for slot, tile in enumerate(tuple(t) for t in new_mask.nonzero().tolist()):
        expected_rows = old_rows.get(tile, torch.zeros_like(state["row_var"][slot]))
        expected_cols = old_cols.get(tile, torch.zeros_like(state["col_var"][slot]))
        assert torch.equal(state["row_var"][slot], expected_rows), tile
        assert torch.equal(state["col_var"][slot], expected_cols), tile
    layer(x).square().sum().backward()  # and training goes on
    optimizer.step()


def test_set_pattern_resets_optimizer_state_it_cannot_move():
    """A state tensor neither per tile nor a scalar (here a flat copy of the values) cannot follow the tiles: the
    parameter's state starts afresh rather than keep another tile's statistics."""
    layer = _layer(sparsity=0.5)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer(torch.randn(16, 64)).square().sum().backward()
    optimizer.step()
    optimizer.state[layer.values]["flat"] = layer.values.detach().flatten().clone()
    mask = layer.matrix.block_mask()
    mask[tuple(mask.nonzero()[0].tolist())] = False
    layer.set_pattern(mask, optimizer)
    assert optimizer.state[layer.values] == {}
    layer(torch.randn(16, 64)).square().sum().backward()
    optimizer.step()
    assert optimizer.state[layer.values]["exp_avg"].shape == layer.values.shape


def test_training_step_compiles_through_the_custom_op():
    layer = _layer()
    x = torch.randn(8, 64, requires_grad=True)

    def step(x):
        out = layer(x)
        out.square().sum().backward()
        return out

    compiled = torch.compile(step, backend="aot_eager", fullgraph=False)
    compiled(x)
    grads = (x.grad.clone(), layer.values.grad.clone(), layer.bias.grad.clone())
    x.grad = layer.values.grad = layer.bias.grad = None
    step(x)
    for compiled_grad, eager_grad in zip(grads, (x.grad, layer.values.grad, layer.bias.grad), strict=True):
        assert torch.allclose(compiled_grad, eager_grad)


@pytest.mark.parametrize("fused", [True, False])
def test_plain_mlp_gradients_match_dense_autograd(fused):
    """A plain MLP trains through one autograd node whose backward keeps the hidden gradient on chip (``fused``),
    or through one node per product; both give dense autograd's gradients for x, both weights and both biases."""
    from sparseblocks.ops import sparse_mlp

    up, down = _layer(seed=4), BlockSparseLinear(48, 40, sparsity=0.5, block_size=16)
    x = torch.randn(2, 7, 64, requires_grad=True)
    out = sparse_mlp(x, up.matrix, down.matrix, up_bias=up.bias, down_bias=down.bias, activation="gelu", fused=fused)
    assert ("EagerPlainMLP" in type(out.grad_fn).__name__) == fused
    grad = torch.randn_like(out)
    out.backward(grad)
    x64 = x.detach().double().requires_grad_()
    dense = [t.detach().double().requires_grad_() for t in (up.matrix.to_dense(), up.bias, down.matrix.to_dense(),
                                                             down.bias)]  # fmt: skip
    hidden = nn.functional.gelu(nn.functional.linear(x64, dense[0], dense[1]))
    nn.functional.linear(hidden, dense[2], dense[3]).backward(grad.double())
    assert relative_error(x.grad, x64.grad) < 1e-5
    for layer, weight, bias in ((up, dense[0], dense[1]), (down, dense[2], dense[3])):
        kept = layer.matrix.block_mask().repeat_interleave(16, 0).repeat_interleave(16, 1)[: weight.shape[0]]
        grad_weight = BlockSparseMatrix.from_parts(layer.values.grad, layer.matrix.shape, layer.matrix.index_tensors())
        assert relative_error(grad_weight.to_dense(), weight.grad * kept) < 1e-5
        assert relative_error(layer.bias.grad, bias.grad) < 1e-5


def test_mlp_without_activation_trains_through_the_products():
    """No activation, no activation gradient: such an MLP keeps one autograd node per product."""
    from sparseblocks.ops import sparse_mlp

    up, down = _layer(seed=5), BlockSparseLinear(48, 40, sparsity=0.5, block_size=16)
    x = torch.randn(5, 64, requires_grad=True)
    out = sparse_mlp(x, up.matrix, down.matrix, up_bias=up.bias, down_bias=down.bias, activation=None)
    assert "EagerPlainMLP" not in type(out.grad_fn).__name__
    out.sum().backward()
    expected = down.matrix.to_dense().sum(0) @ up.matrix.to_dense()
    assert relative_error(x.grad[0], expected) < 1e-5


def test_ops_without_a_backward_refuse_inputs_that_need_gradients():
    """PyTorch's fallback for an op with no autograd kernel would only warn and leave the gradient out."""
    w = _layer().matrix
    grad = torch.randn(3, 48, requires_grad=True)
    args = (w.values.detach(), [getattr(w, name) for name in INDEX_NAMES], list(w.shape))
    with pytest.raises(RuntimeError, match="no backward"):
        torch.ops.sparseblocks.spmm_input_grad(grad, *args)
    with torch.no_grad():
        assert torch.ops.sparseblocks.spmm_input_grad(grad, *args).shape == (3, 64)


def test_float64_stays_float64_under_autocast_and_in_its_bias_gradient():
    """As F.linear: autocast leaves float64 alone; and the bias gradient is summed in float64, not fp32."""
    layer = _layer(block=16).double()
    x = torch.randn(4096, 64, dtype=torch.float64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.float64
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(layer.bias.grad, grad.sum(0))


def test_a_gate_bias_needs_a_gate():
    from sparseblocks.ops import sparse_mlp

    up, down = _layer(), BlockSparseLinear(48, 40, sparsity=0.5, block_size=16)
    with pytest.raises(ValueError, match="gate_bias needs a gate"):
        sparse_mlp(torch.randn(2, 64), up.matrix, down.matrix, gate_bias=torch.zeros(48))


def test_compiled_backward_keeps_eager_only_kernels_out(monkeypatch):
    """Inside a compiled backward tensors are fake: the bias gradient of a layer without activation must be traced
    PyTorch there, not the eager path's Triton column sum (which reads data pointers)."""
    import importlib

    from sparseblocks.ops import spmm

    def eager_only(*args):
        raise AssertionError("the eager column sum ran inside a compiled backward")

    spmm_module = importlib.import_module("sparseblocks.ops.spmm")
    monkeypatch.setattr(spmm_module, "_EAGER", spmm_module._EAGER._replace(column_sums=eager_only))
    layer = _layer()
    forward = torch.compile(lambda x: spmm(x, layer.matrix, layer.bias), backend="aot_eager")
    forward(torch.randn(8, 64)).sum().backward()
    assert torch.allclose(layer.bias.grad, torch.full_like(layer.bias, 8.0))


@pytest.mark.parametrize("compiled", [False, True])
def test_bias_gradient_through_an_activation_matches_dense_autograd(compiled):
    """With an activation the bias gradient comes from the activation-gradient op's column sums (eager path and
    custom op alike), over every leading dim."""
    from sparseblocks.ops import spmm

    layer = _layer(seed=3)
    x = torch.randn(2, 7, 64, requires_grad=True)
    forward = lambda x: spmm(x, layer.matrix, layer.bias, "gelu")
    if compiled:
        forward = torch.compile(forward, backend="aot_eager", fullgraph=True)
    out = forward(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    x64 = x.detach().double().requires_grad_()
    weight = layer.matrix.to_dense().detach().double().requires_grad_()
    bias = layer.bias.detach().double().requires_grad_()
    nn.functional.gelu(nn.functional.linear(x64, weight, bias)).backward(grad.double())
    assert relative_error(layer.bias.grad, bias.grad) < 1e-5
    assert relative_error(x.grad, x64.grad) < 1e-5


# ---------------------------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        layer = _layer(seed=0)  # same seed: same pattern and values on every rank
        model = nn.parallel.DistributedDataParallel(layer)
        x = torch.randn(world * 8, 64, generator=torch.Generator().manual_seed(1))
        model(x[rank * 8 : (rank + 1) * 8]).square().sum().backward()
        results[rank] = layer.values.grad.clone()
    finally:
        dist.destroy_process_group()


def test_ddp_all_reduces_the_gradient_over_gloo():
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(world, _free_port(), results), nprocs=world)
        grads = [results[rank] for rank in range(world)]
    layer = _layer(seed=0)
    x = torch.randn(world * 8, 64, generator=torch.Generator().manual_seed(1))
    layer(x).square().sum().backward()
    expected = layer.values.grad / world  # DDP averages the per-rank sums
    for grad in grads:
        assert torch.allclose(grad, expected, atol=1e-5)


def _sparse_gpt():
    """A tiny GPT whose MLPs (and attention) the patcher made block-sparse, MLPs fused: the same on every rank."""
    from sparseblocks import SparsityConfig, sparsify
    from sparseblocks.recipes.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=17, context=8, layers=2, heads=2, width=32))
    sparsify(model, SparsityConfig(0.5, 16, targets=["mlp", "attention"], fuse_mlp=True))
    return model


def _train_steps(model, tokens, steps=2):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(tokens[:, :-1], tokens[:, 1:])[1].backward()
        optimizer.step()
        optimizer.zero_grad()


def _ddp_model_worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _sparse_gpt()
        tokens = torch.randint(17, (world * 4, 9), generator=torch.Generator().manual_seed(1))
        _train_steps(nn.parallel.DistributedDataParallel(model), tokens[rank * 4 : (rank + 1) * 4])
        results[rank] = {name: p.detach().clone() for name, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()


def test_ddp_trains_a_sparsified_model_like_one_process_on_the_whole_batch():
    """Whole-model DDP: BlockSparseLinear and fused SparseMLP parameters all-reduce like any other."""
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_model_worker, args=(world, _free_port(), results), nprocs=world)
        ranks = [dict(results[rank]) for rank in range(world)]
    model = _sparse_gpt()
    _train_steps(model, torch.randint(17, (world * 4, 9), generator=torch.Generator().manual_seed(1)))
    for name, parameter in model.named_parameters():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.allclose(ranks[0][name], parameter, atol=1e-5), name


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_layer_on_the_second_gpu_while_the_first_is_current():
    """Triton launches on the current device: the ops switch to the tensors' device for their kernels."""
    torch.manual_seed(0)
    layer = BlockSparseLinear(256, 128, sparsity=0.5, block_size=64).to("cuda:1", torch.bfloat16)
    x = torch.randn(300, 256, device="cuda:1", dtype=torch.bfloat16, requires_grad=True)
    with torch.cuda.device(0):
        out = layer(x)
        out.float().square().sum().backward()
    x64 = x.detach().double().requires_grad_()
    weight = layer.matrix.to_dense().detach().double()
    ref = nn.functional.linear(x64, weight, layer.bias.detach().double())
    ref.square().sum().backward()
    assert relative_error(out, ref) < 1e-2
    assert relative_error(x.grad, x64.grad) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("gated", [False, True])
def test_fp32_mlp_trains_on_the_tensor_cores_on_gpu(gated, no_tf32):
    """Every kernel of an fp32 MLP's forward and backward (products, activation and hidden gradients, SDDMM) with
    tf32x3 tiles, staged in shared memory at 4 bytes an element, blocks of 128 (the largest): each launch finds a
    config that fits, and the gradients match the PyTorch reference's (IEEE fp32)."""
    from sparseblocks import fp32_precision
    from sparseblocks.backend import reference_mode
    from sparseblocks.ops import sparse_mlp

    torch.manual_seed(0)
    ups = [BlockSparseLinear(512, 1024, sparsity=0.7, block_size=128, device="cuda") for _ in range(1 + gated)]
    down = BlockSparseLinear(1024, 512, sparsity=0.7, block_size=128, device="cuda")
    x = torch.randn(512, 512, device="cuda", requires_grad=True)
    inputs = [x, *(p for layer in (*ups, down) for p in layer.parameters())]

    def gradients() -> tuple[torch.Tensor, ...]:
        gate, gate_bias = (ups[1].matrix, ups[1].bias) if gated else (None, None)
        out = sparse_mlp(x, ups[0].matrix, down.matrix, gate, ups[0].bias, down.bias, gate_bias,
                         activation="silu" if gated else "gelu")  # fmt: skip
        return torch.autograd.grad(out.square().sum(), inputs)

    with fp32_precision("tf32x3"):
        ours = gradients()
    with reference_mode():
        expected = gradients()
    for grad, reference_grad in zip(ours, expected, strict=True):
        assert relative_error(grad, reference_grad) < 1e-4


def _sparse_mlp_module():
    from sparseblocks import SparseMLP

    return SparseMLP(BlockSparseLinear(32, 48, 0.5, 16), BlockSparseLinear(48, 24, 0.5, 16), activation="gelu")


@pytest.mark.parametrize(
    "build", [lambda: BlockSparseLinear(32, 24, 0.5, 16), _sparse_mlp_module], ids=["linear", "mlp"]
)
def test_per_sample_gradients_by_torch_func_match_a_loop(build):
    from torch.func import functional_call, grad, vmap

    model = build().double()
    parameters = {name: p.detach() for name, p in model.named_parameters()}
    x = torch.randn(5, 3, 32, dtype=torch.float64)  # 5 samples of 3 tokens

    def loss(parameters, sample):
        return functional_call(model, parameters, (sample,)).sin().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(parameters, x)
    first = grad(loss)(parameters, x[0])
    for i, sample in enumerate(x):
        model.zero_grad()
        model(sample).sin().sum().backward()
        for name, p in model.named_parameters():
            assert torch.allclose(per_sample[name][i], p.grad, rtol=1e-12, atol=1e-12), (name, i)
            if i == 0:
                assert torch.allclose(first[name], p.grad, rtol=1e-12, atol=1e-12), name


@pytest.mark.parametrize("no_gradients", ["no_grad", "frozen"])
def test_hidden_dropout_applies_without_gradients(no_gradients):
    """``sparse_mlp(..., hidden_dropout=p)`` with nothing needing a gradient still drops hidden units: outputs differ
    from p=0 and their mean over many draws is p=0's (inverted dropout keeps the expectation)."""
    from sparseblocks.ops import sparse_mlp

    up, down = BlockSparseLinear(32, 64, 0.5, 16), BlockSparseLinear(64, 24, 0.5, 16)
    if no_gradients == "frozen":
        up.requires_grad_(False)
        down.requires_grad_(False)
    x = torch.randn(1, 32).expand(20_000, 32)  # one token, many dropout draws
    args = (x, up.matrix, down.matrix, None, up.bias, down.bias, None, "gelu")
    with torch.no_grad() if no_gradients == "no_grad" else contextlib.nullcontext():
        plain = sparse_mlp(*args, hidden_dropout=0.0)
        dropped = sparse_mlp(*args, hidden_dropout=0.5)
    assert not dropped.requires_grad
    assert not torch.allclose(dropped, plain)
    assert relative_error(dropped.mean(0), plain[0]) < 0.03
