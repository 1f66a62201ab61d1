"""``sparseblocks bench train``: the speed of sparse training, in one run on one GPU.

* ``linear``: forward + backward (dX, dW, db) of one layer;
* ``mlp``: forward + backward of a whole MLP: ViT-B's GELU MLP at 256 images, Llama-3.2-1B's SwiGLU MLP at 8192
  tokens; each against dense cuBLAS and (block 128) stk; the GELU MLP both as separate ``spmm`` calls
  (``sparseblocks``) and through ``ops.sparse_mlp`` (``sparseblocks_mlp``, the hidden gradient kept on chip);
* ``train_step``: forward, backward and AdamW of a GPT-2-small-shaped model and of Llama-3.2-1B's shape (bf16
  autocast, fp32 weights), dense against 90%-sparse MLPs, with peak memory and the bytes of the MLPs' weights,
  gradients and optimizer state;
* ``convergence``: a few hundred steps of a character GPT on tinyshakespeare with the Triton kernels and with the
  PyTorch reference on the same mask: the loss curves must agree within bf16 noise.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sparseblocks import reference
from sparseblocks.backend import reference_mode
from sparseblocks.bench.harness import input_sets, start_run, time_ms
from sparseblocks.bench.results import write_result
from sparseblocks.bench.spmm import random_weight, stk_linear
from sparseblocks.format import BlockSparseMatrix
from sparseblocks.ops import sparse_mlp, spmm

SECTIONS = ("linear", "mlp", "train_step", "convergence")
# name -> (tokens, width, hidden, kind); the linear case times the MLP's first layer alone
MLP_SHAPES = {
    "vit_b": (50432, 768, 3072, "gelu"),
    "llama_1b": (8192, 2048, 8192, "swiglu"),
}
SPARSITIES = (0.5, 0.8, 0.9, 0.95)
BLOCKS = (32, 64, 128)

# A linear layer as the timed code sees it: (x, activation) -> y, differentiable w.r.t. x and its weights.
Linear = Callable[[torch.Tensor, str | None], torch.Tensor]


def _trainable(w: BlockSparseMatrix, bias: bool) -> tuple[BlockSparseMatrix, torch.Tensor | None]:
    """A copy of w whose values require gradients, and a zero bias that does (or None)."""
    b = torch.zeros(w.shape[0], device="cuda", dtype=w.dtype, requires_grad=True) if bias else None
    values = w.values.detach().clone().requires_grad_()
    return BlockSparseMatrix.from_parts(values, w.shape, w.index_tensors()), b


def make_linear(impl: str, w: BlockSparseMatrix, bias: bool) -> Linear | None:
    """A trainable layer holding w (as dense, as our tiles, or as stk's matrix); None where impl does not apply."""
    matrix, b = _trainable(w, bias)
    if impl == "dense":
        dense = w.to_dense().detach().requires_grad_()
        return lambda x, act: reference.ACTIVATIONS[act](F.linear(x, dense, b))
    if impl == "sparseblocks":
        return lambda x, act: spmm(x, matrix, b, act)
    product = stk_linear(matrix)  # stk: its own autograd through the same tiles
    if product is None:
        return None
    return lambda x, act: reference.ACTIVATIONS[act](product(x) if b is None else product(x) + b)


def mlp_forward(kind: str, layers: list[Linear]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fc2(gelu(fc1 x))`` (biases on) or ``down(silu(gate x) * up x)``; one layer: just that layer."""
    if len(layers) == 1:
        return lambda x: layers[0](x, None)
    if kind == "gelu":
        fc1, fc2 = layers
        return lambda x: fc2(fc1(x, "gelu"), None)
    gate, up, down = layers
    return lambda x: down(gate(x, "silu") * up(x, None), None)


def whole_mlp_forward(weights: list[BlockSparseMatrix]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A GELU MLP through ``ops.sparse_mlp``: one autograd node whose backward keeps the hidden gradient on chip."""
    (up, up_bias), (down, down_bias) = (_trainable(w, bias=True) for w in weights)
    return lambda x: sparse_mlp(x, up, down, up_bias=up_bias, down_bias=down_bias, activation="gelu")


def _layer_shapes(case: str, name: str) -> list[tuple[int, int]]:
    _, width, hidden, kind = MLP_SHAPES[name]
    if case == "linear":
        return [(hidden, width)]
    return [(hidden, width), (width, hidden)] if kind == "gelu" else [(hidden, width), (hidden, width), (width, hidden)]


def _time_forward_backward(forward: Callable[[torch.Tensor], torch.Tensor], tokens: int, width: int) -> dict:
    """Median ms of forward + backward (cycling input sets), and the peak memory of one such step."""
    # Random data from a CPU generator: a failed graph capture can leave the CUDA generator unusable.
    generator = torch.Generator().manual_seed(0)
    make_x = lambda: torch.randn(tokens, width, generator=generator).to("cuda", torch.bfloat16).requires_grad_()
    x = make_x()
    out = forward(x)
    grad = torch.randn(out.shape, generator=generator).to("cuda", out.dtype)
    del out
    forward(x).backward(grad)  # the first backward tunes its kernels: the peak below is a step's, not the tuner's
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    forward(x).backward(grad)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del x
    ms, timer = time_ms(lambda x: forward(x).backward(grad), input_sets(make_x, tokens * width * 2))
    return {"ms": ms, "timer": timer, "peak_mem_bytes": peak}


def run_layers(
    rows: list[dict], cases: tuple[str, ...], shapes: tuple[str, ...], quick: bool, save: Callable[[], None]
) -> None:
    """The ``linear`` and ``mlp`` sections (``cases``) on the ``MLP_SHAPES`` named in ``shapes``."""
    sparsities, blocks = ((0.9,), (64, 128)) if quick else (SPARSITIES, BLOCKS)
    for case, name in itertools.product(cases, shapes):
        tokens, width, hidden, kind = MLP_SHAPES[name]
        base = {"case": case, "shape": name, "M": tokens, "dtype": "bf16"}
        dense_ms = None
        for sparsity, block in [(0.0, None), *itertools.product(sparsities, blocks)]:
            generator = torch.Generator().manual_seed(0)
            weights = [random_weight(n, k, sparsity, block or 64, torch.bfloat16, generator)
                       for n, k in _layer_shapes(case, name)]  # fmt: skip
            impls = ("dense",) if block is None else ("sparseblocks", "stk")
            if block is not None and case == "mlp" and kind == "gelu":
                impls = ("sparseblocks", "sparseblocks_mlp", "stk")  # products one by one, and the whole-MLP op
            for impl in impls:
                if impl == "sparseblocks_mlp":
                    forward = whole_mlp_forward(weights)
                else:
                    layers = [make_linear(impl, w, bias=kind == "gelu") for w in weights]
                    if any(layer is None for layer in layers):
                        continue
                    forward = mlp_forward(kind, layers)
                row = {**base, "sparsity": sparsity, "block": block, "impl": impl}
                try:
                    row |= _time_forward_backward(forward, tokens, width)
                except Exception as error:  # a baseline that cannot run this case is recorded, not fatal
                    row |= {"ms": None, "error": str(error).splitlines()[0][:200]}
                rows.append(row)
                dense_ms = row["ms"] if impl == "dense" else dense_ms
                speedup = f"{dense_ms / row['ms']:.2f}x" if row["ms"] and dense_ms else row.get("error", "")
                print(
                    f"{case:<7} {name:<9} s={sparsity:.2f} b={block} {impl:<12} {row['ms']} ms  {speedup}", flush=True
                )
                del forward
                torch.cuda.empty_cache()
            save()


TRAIN_STEP_MODES = ("eager", "compiled", "cuda_graph")
TRAIN_STEP_BATCH = 8  # sequences of 1024 tokens: 8192 tokens a step, the MLP sections' Llama shape


class StepModel(NamedTuple):
    """A model of the ``train_step`` section: how to build it (fp32 weights, on the GPU), make its MLPs 90%/b64
    sparse, and compute its loss on ``tokens`` ``(B, T + 1)``; the modes it is timed in."""

    shape: str
    vocab_size: int
    context: int
    build: Callable[[], torch.nn.Module]
    sparsify: Callable[[torch.nn.Module], None]
    loss: Callable[[Callable, torch.Tensor], torch.Tensor]
    modes: tuple[str, ...]


def _gpt2_small(quick: bool) -> StepModel:
    from sparseblocks.recipes.gpt import GPT, GPTConfig, sparsify_mlps

    config = GPTConfig(vocab_size=50304, context=1024, layers=4 if quick else 12, heads=12, width=768)
    return StepModel(
        shape=f"gpt2_small_{config.layers}x768_T1024_B{TRAIN_STEP_BATCH}",
        vocab_size=config.vocab_size,
        context=config.context,
        build=lambda: GPT(config).cuda(),
        sparsify=lambda model: sparsify_mlps(model, 0.9, 64, torch.Generator().manual_seed(0)),
        loss=lambda forward, tokens: forward(tokens[:, :-1], tokens[:, 1:])[1],
        modes=TRAIN_STEP_MODES,
    )


def _llama_1b(quick: bool) -> StepModel:
    """Llama-3.2-1B's shape (16 layers; 4 with ``quick``) from its transformers config, random weights, sparsified
    by the patcher. Timed eager only: at 8192 tokens a step is ~100 ms of GPU work, which issuing it keeps up with."""
    from transformers import AutoModelForCausalLM

    from sparseblocks.bench.e2e import model_config
    from sparseblocks.integrations.sparsify import SparsityConfig, sparsify

    config = model_config("llama-3.2-1b")
    if quick:
        config.num_hidden_layers = 4

    def build() -> torch.nn.Module:
        with torch.device("cuda"):
            return AutoModelForCausalLM.from_config(config).train()

    def sparsify_mlps(model: torch.nn.Module) -> None:
        sparsify(model, SparsityConfig(0.9, 64, targets="mlp"))

    def loss(forward: Callable, tokens: torch.Tensor) -> torch.Tensor:
        logits = forward(input_ids=tokens[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())

    return StepModel(
        shape=f"llama_3.2_1b_{config.num_hidden_layers}x2048_T1024_B{TRAIN_STEP_BATCH}",
        vocab_size=config.vocab_size,
        context=1024,
        build=build,
        sparsify=sparsify_mlps,
        loss=loss,
        modes=("eager",),
    )


TRAIN_STEP_MODELS = {"gpt2_small": _gpt2_small, "llama-3.2-1b": _llama_1b}


def _mlp_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes the MLPs (modules named ``*.mlp``) hold in training: parameters, their gradients, optimizer state,
    index buffers."""
    total = 0
    for name, mlp in model.named_modules():
        if name.rsplit(".", 1)[-1] != "mlp":
            continue
        for parameter in mlp.parameters():
            tensors = [parameter, parameter.grad, *optimizer.state[parameter].values()]
            total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        total += sum(b.numel() * b.element_size() for b in mlp.buffers())
    return total


def _time_train_step(
    model: torch.nn.Module,
    loss_fn: Callable[[Callable, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
    mode: str,
    repeats: int,
) -> tuple[float, int]:
    """Median ms of one forward/backward/AdamW step on ``tokens`` ``(B, T + 1)``, and the peak memory.

    Modes, the same on both sides: ``eager``; ``compiled``, forward and backward through ``torch.compile``
    (Inductor, default mode; ``mode="reduce-overhead"`` fails on the GPT in torch 2.11 even dense: the tied
    embedding's gradient reads a CUDA-graph output that a later partition overwrote); ``cuda_graph``, the whole
    step (forward, backward, AdamW with ``capturable=True``) captured once and replayed, which removes the CPU
    cost of issuing it.
    """
    forward = torch.compile(model) if mode == "compiled" else model

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(forward, tokens)
        loss.backward()
        optimizer.step()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as graph capture requires
        for _ in range(5):  # compilation, autotuning, optimizer state
            optimizer.zero_grad(set_to_none=mode == "cuda_graph")
            step()
    torch.cuda.current_stream().wait_stream(stream)
    run = step
    if mode == "cuda_graph":
        graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph's memory pool
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        if mode != "cuda_graph":  # the graph's backward overwrites its gradients in place
            optimizer.zero_grad(set_to_none=False)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated()


def run_train_step(rows: list[dict], models: tuple[str, ...], quick: bool, save: Callable[[], None]) -> None:
    """The ``train_step`` section: each of ``models`` (:data:`TRAIN_STEP_MODELS`) dense and with 90%/b64 sparse
    MLPs, batch 8 x 1024 tokens, bf16 autocast, fused AdamW, in each of the model's modes."""
    for name in models:
        if name not in TRAIN_STEP_MODELS:
            raise ValueError(f"train-step models are {', '.join(TRAIN_STEP_MODELS)}, got {name!r}")
        spec = TRAIN_STEP_MODELS[name](quick)
        dense_ms = {}
        for mode, sparse in itertools.product(spec.modes, (False, True)):
            torch.manual_seed(0)
            model = spec.build()
            if sparse:
                spec.sparsify(model)
            optimizer = torch.optim.AdamW(
                model.parameters(), lr=1e-4, weight_decay=0.1, fused=True, capturable=mode == "cuda_graph"
            )
            tokens = torch.randint(spec.vocab_size, (TRAIN_STEP_BATCH, spec.context + 1)).cuda()
            ms, peak = _time_train_step(model, spec.loss, optimizer, tokens, mode, 5 if quick else 15)
            dense_ms.setdefault(mode, ms)
            rows.append({"case": "train_step", "shape": spec.shape, "dtype": "bf16", "mode": mode,
                         "sparsity": 0.9 if sparse else 0.0, "block": 64 if sparse else None,
                         "impl": "sparseblocks" if sparse else "dense", "ms": ms,
                         "timer": "cuda_graph" if mode == "cuda_graph" else "eager",
                         "peak_mem_bytes": peak, "mlp_state_bytes": _mlp_state_bytes(model, optimizer)})  # fmt: skip
            print(f"train_step {spec.shape} {mode} sparse={sparse}: {ms:.1f} ms ({dense_ms[mode] / ms:.2f}x), "
                  f"MLP state {rows[-1]['mlp_state_bytes'] / 2**20:.0f} MiB", flush=True)  # fmt: skip
            del model, optimizer
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            save()


def run_convergence(steps: int, data_path: Path) -> dict:
    """Train the same 90%-sparse character GPT twice, Triton kernels vs reference ops; both loss curves."""
    from sparseblocks.recipes.gpt import GPT, CharData, GPTConfig, sparsify_mlps, train

    data = CharData(data_path)
    config = GPTConfig(vocab_size=data.vocab_size, context=256, layers=6, heads=6, width=384)
    curves = {}
    for path in ("triton", "reference"):
        torch.manual_seed(0)
        model = GPT(config).cuda()
        sparsify_mlps(model, 0.9, 32, torch.Generator().manual_seed(0))
        if path == "reference":
            with reference_mode():
                curves[path] = train(model, data, steps, batch_size=32, lr=1e-3)
        else:
            curves[path] = train(model, data, steps, batch_size=32, lr=1e-3)
    window = 20
    tail = {path: statistics.fmean(curve[-window:]) for path, curve in curves.items()}
    return {
        "model": "gpt 6x384, context 256, batch 32, MLPs 90% sparse, block 32, AdamW lr 1e-3, bf16 autocast",
        "steps": steps,
        "losses": curves,
        "final_loss_mean_last_20": tail,
        "max_abs_step_difference": max(abs(a - b) for a, b in zip(*curves.values(), strict=True)),
    }


def run(
    quick: bool,
    sections: tuple[str, ...],
    shapes: tuple[str, ...],
    models: tuple[str, ...],
    steps: int,
    data: Path,
    out_dir: Path | None,
    name: str,
    command: str,
) -> dict:
    """Run the sections; write ``<out_dir or benchmarks/results/<gpu>>/<name>.json`` and plots."""
    payload, folder = start_run("train", command, out_dir)
    save = lambda: write_result(folder / f"{name}.json", payload)
    layer_cases = tuple(case for case in ("linear", "mlp") if case in sections)
    if layer_cases:
        run_layers(payload["rows"], layer_cases, shapes, quick, save)
    if "train_step" in sections:
        run_train_step(payload["rows"], models, quick, save)
    if "convergence" in sections:
        payload["convergence"] = run_convergence(steps, data)
        print("convergence:", payload["convergence"]["final_loss_mean_last_20"], flush=True)
        save()
    from sparseblocks.bench.plots import train_report

    train_report(folder / f"{name}.json")
    return payload
