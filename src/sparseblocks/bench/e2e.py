"""``sparseblocks bench e2e``: whole models, dense against PyTorch's BSR path and ours, in one run.

Models (random weights from their configs unless a folder holds weights):

* ``vit_b_16``: Hugging Face ``ViTForImageClassification`` with ``ViTConfig()`` — ViT-B/16 at 224 px, the shapes
  of torchvision's ``vit_b_16``. (torchvision's own attention packs q, k and v into ``nn.MultiheadAttention``,
  which the patcher cannot make sparse; this one has a linear per projection.) Metric: images/s per batch.
* ``llama-3.2-1b``, ``llama-3.1-8b`` (or a Hugging Face folder of a causal LM): decode tokens/s at batch 1 and 8
  (one step with a static KV cache, captured in a CUDA graph), and the time of a 2048-token prefill (eager, and
  compiled too when the grid has a compiled mode; none when the grid's ``prefill_tokens`` is 0).
* a Hugging Face folder of a BERT-style encoder (``bert``, ``roberta``, ``xlm-roberta``; e.g. the sentence-transformers
  all-MiniLM-L6-v2): sentences/s of a forward over a batch of ``sequence``-token inputs.

Each side runs in the same mode: ``eager``, ``compiled`` (``torch.compile`` of the whole model), ``cuda_graph``
(eager modules replayed from a CUDA graph) or ``compiled_graph`` (the compiled model replayed from a CUDA graph:
a lean decode loop, small kernels fused and no launch cost).
Sparse models are made by the patcher (magnitude, MLPs fused where ``SparseMLP`` knows them); the BSR model is
the same tiles as ``torch.sparse_bsr`` weights under ``F.linear``. ``dense_fp8`` is the dense model with the same
targeted linears in dense fp8 × fp8 (:mod:`sparseblocks.bench.baselines`), the baseline of ours on quantized tiles.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparseblocks.backend import fp32_precision
from sparseblocks.bench.baselines import FP8_NOTE, dense_fp8_runs, fp8_cells, fp8_header, quantize_dense_fp8
from sparseblocks.bench.harness import results_folder, time_ms
from sparseblocks.bench.plots import e2e_plot
from sparseblocks.bench.results import markdown_table, new_result, ratio_cell, read_result, versions, write_result
from sparseblocks.format import normalize_block_size
from sparseblocks.integrations.sparsify import SparsityConfig, fuse_mlps, model_size, replace_module, sparsify
from sparseblocks.nn import BlockSparseLinear

IMPLS = ("dense", "torch_bsr", "sparseblocks", "sparseblocks_int8", "sparseblocks_fp8", "sparseblocks_fp8_w8a8",
         "dense_fp8")  # fmt: skip
QUANTIZED_IMPLS = {impl: impl.removeprefix("sparseblocks_").replace("_", "-") for impl in IMPLS[3:6]}  # -> kind
MODES = ("eager", "compiled", "cuda_graph", "compiled_graph")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Grid:
    """What one run covers; :data:`DEFAULT_GRIDS` holds each model kind's default."""

    batches: tuple[int, ...]
    dtypes: tuple[str, ...]
    sparsities: tuple[float, ...]
    blocks: tuple[int, ...]
    targets: tuple[str, ...]  # each a "+"-joined list of patcher presets, e.g. "mlp" or "mlp+attention"
    modes: tuple[str, ...]
    context: int = 512  # decode: tokens already in the KV cache
    sequence: int = 128  # encoder: tokens per sentence
    prefill_tokens: int = 2048
    impls: tuple[str, ...] = IMPLS[1:3]  # the paths timed beside dense (quantized tiles, dense fp8 when named)

    def __post_init__(self) -> None:
        for field, allowed in [("modes", MODES), ("dtypes", tuple(DTYPES)), ("impls", IMPLS[1:])]:
            unknown = set(getattr(self, field)) - set(allowed)
            if unknown:
                raise ValueError(f"unknown {field} {sorted(unknown)}; known: {', '.join(allowed)}")
        if not all(0.0 <= sparsity < 1.0 for sparsity in self.sparsities):
            raise ValueError(f"sparsities must lie in [0, 1), got {self.sparsities}")
        if not all(batch >= 1 for batch in self.batches):
            raise ValueError(f"batches must be at least 1, got {self.batches}")
        if self.prefill_tokens < 0:
            raise ValueError(f"prefill_tokens must be at least 0, got {self.prefill_tokens}")
        for block in self.blocks:
            normalize_block_size(block)


DEFAULT_GRIDS = {
    "vit": Grid(
        (1, 16, 64, 256, 512),
        ("bf16", "fp32"),
        (0.7, 0.8, 0.9),
        (16, 32, 64),
        ("mlp", "mlp+attention"),
        ("eager", "compiled"),
    ),  # fmt: skip
    "causal_lm": Grid((1, 8), ("bf16",), (0.8, 0.9, 0.95), (64,), ("mlp",), ("cuda_graph",)),
    "encoder": Grid((1, 32, 256), ("bf16", "fp32"), (0.5, 0.7, 0.9), (16, 32), ("mlp",), ("eager", "cuda_graph")),
}
DRY_RUN = {"batches": (1, 2), "context": 8, "prefill_tokens": 16, "sequence": 8}
ENCODERS = ("bert", "roberta", "xlm-roberta")  # model types the patcher's presets know as encoders


def model_config(name: str):
    """A transformers config for a preset name, or the ``config.json`` of a folder."""
    from transformers import AutoConfig, LlamaConfig, ViTConfig

    llama = dict(num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0)
    presets = {
        "vit_b_16": lambda: ViTConfig(),
        "llama-3.2-1b": lambda: LlamaConfig(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            head_dim=64,
            tie_word_embeddings=True,
            **llama,
        ),  # fmt: skip
        "llama-3.1-8b": lambda: LlamaConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, head_dim=128, **llama
        ),  # fmt: skip
    }
    if name in presets:
        return presets[name]()
    if not (Path(name) / "config.json").is_file():
        raise ValueError(f"--model must be one of {', '.join(presets)} or a Hugging Face folder, got {name!r}")
    return AutoConfig.from_pretrained(name, local_files_only=True)


def model_kind(config) -> str:
    """``"vit"`` (image classifier), ``"encoder"`` (sentence encoder) or ``"causal_lm"``, from a transformers config."""
    if config.model_type == "vit":
        return "vit"
    return "encoder" if config.model_type in ENCODERS else "causal_lm"


def build_model(name: str, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, str]:
    """(model in eval mode, its :func:`model_kind`)."""
    from transformers import AutoModel, AutoModelForCausalLM, ViTForImageClassification

    config = model_config(name)
    kind = model_kind(config)
    model_class = {"vit": ViTForImageClassification, "encoder": AutoModel, "causal_lm": AutoModelForCausalLM}[kind]
    if any(Path(name).glob("*.safetensors")):
        model = model_class.from_pretrained(name, dtype=dtype, local_files_only=True).to(device)
    else:
        with torch.device(device):
            model = (model_class(config) if kind == "vit" else model_class.from_config(config)).to(dtype)
    return model.eval(), kind


class TorchBSRLinear(nn.Module):
    """``F.linear`` with a ``torch.sparse_bsr`` weight: PyTorch's own block-sparse path, for comparison."""

    def __init__(self, layer: BlockSparseLinear) -> None:
        super().__init__()
        self.register_buffer("weight", layer.matrix.to_torch_bsr())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)  # the BSR product takes 2-D inputs
        return y.reshape(*x.shape[:-1], y.shape[-1])


def nbytes(model: nn.Module) -> int:
    """Parameter and buffer bytes, a BSR weight counted as its values and indices."""
    total = model_size(model)[1]
    for module in model.modules():
        if isinstance(module, TorchBSRLinear):
            w = module.weight
            total += sum(t.numel() * t.element_size() for t in (w.values(), w.crow_indices(), w.col_indices()))
    return total


def sparse_models(
    dense: nn.Module, sparsity: float, block: int, targets: str, impls: tuple[str, ...] = ()
) -> tuple[dict[str, nn.Module], dict]:
    """impl -> model for ``torch_bsr`` and ``sparseblocks`` (same tiles) and, for the quantized ``impls``
    (``sparseblocks_int8`` ...), ours with those tiles quantized; and the bytes of the targeted layers before and
    after."""
    from sparseblocks.integrations.quantized import quantize_model

    config = SparsityConfig(sparsity, block, targets=targets.split("+"))
    ours = copy.deepcopy(dense)
    report = sparsify(ours, config)
    bsr = copy.deepcopy(ours)
    for name, module in list(bsr.named_modules()):
        if isinstance(module, BlockSparseLinear):
            replace_module(bsr, name, TorchBSRLinear(module))
    fuse_mlps(ours)  # after the BSR copy: that one keeps separate linears
    layer_bytes = {"before": sum(r.bytes_before for r in report.layers),
                   "after": sum(r.bytes_after for r in report.layers)}  # fmt: skip
    models = {"torch_bsr": bsr, "sparseblocks": ours}
    for impl in (impl for impl in impls if impl in QUANTIZED_IMPLS):
        models[impl] = copy.deepcopy(ours)
        quantize_model(models[impl], QUANTIZED_IMPLS[impl])
    return models, layer_bytes


def dense_fp8_model(dense: nn.Module, targets: str) -> nn.Module:
    """A copy of ``dense`` with the linears that :func:`sparse_models` makes sparse for ``targets`` in dense fp8
    (sparsity and block do not change which: the patcher reads targets and exclusions only)."""
    model = copy.deepcopy(dense)
    quantize_dense_fp8(model, SparsityConfig(targets=targets.split("+")))
    return model


def _time_eager_ms(fn: Callable[[torch.Tensor], object], inputs: list[torch.Tensor], repeats: int) -> float:
    """Median wall time of one call (CUDA events on a GPU), cycling over ``inputs``, after a warm-up."""
    for x in inputs:
        fn(x)
    times = []
    for i in range(repeats):
        if inputs[0].is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(inputs[i % len(inputs)])
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn(inputs[i % len(inputs)])
            times.append(1e3 * (time.perf_counter() - start_s))
    return statistics.median(times)


def time_mode_ms(fn: Callable[[torch.Tensor], object], inputs: list[torch.Tensor], mode: str, repeats: int) -> float:
    """Milliseconds per call in ``mode``: eager or compiled (``fn`` already compiled) calls, or graph replays."""
    if mode.endswith("graph") and inputs[0].is_cuda:
        ms, timer = time_ms(fn, inputs)
        if timer != "cuda_graph":
            raise RuntimeError("the model could not be captured in a CUDA graph")
        return ms
    return _time_eager_ms(fn, inputs, repeats)


def _call_bytes(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> int | None:
    """GPU memory one call allocates at its peak beyond what was allocated before it (activations, workspaces)."""
    if not x.is_cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn(x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def vit_measurements(model: nn.Module, batch: int, dtype: torch.dtype, mode: str, repeats: int) -> list[dict]:
    """images/s of a forward over ``batch`` random images."""
    config = model.config
    device = next(model.parameters()).device
    shape = (batch, config.num_channels, config.image_size, config.image_size)
    inputs = [torch.randn(shape, device=device, dtype=dtype) for _ in range(2)]
    forward = torch.compile(model) if mode.startswith("compiled") else model
    fn = lambda x: forward(pixel_values=x).logits
    ms = time_mode_ms(fn, inputs, mode, repeats)
    return [{"metric": "images_per_s", "value": batch / (ms * 1e-3), "ms": ms,
             "call_bytes": _call_bytes(fn, inputs[0])}]  # fmt: skip


def encoder_measurements(model: nn.Module, batch: int, grid: Grid, mode: str, repeats: int) -> list[dict]:
    """sentences/s of a forward over ``batch`` random sentences of ``grid.sequence`` tokens."""
    device = next(model.parameters()).device
    inputs = [torch.randint(model.config.vocab_size, (batch, grid.sequence), device=device) for _ in range(2)]
    forward = torch.compile(model) if mode.startswith("compiled") else model
    fn = lambda ids: forward(input_ids=ids).last_hidden_state
    ms = time_mode_ms(fn, inputs, mode, repeats)
    return [{"metric": "sentences_per_s", "value": batch / (ms * 1e-3), "ms": ms, "tokens": grid.sequence,
             "call_bytes": _call_bytes(fn, inputs[0])}]  # fmt: skip


def decode_call(model: nn.Module, batch: int, grid: Grid, mode: str) -> tuple[Callable, list[torch.Tensor]]:
    """One decode step after ``grid.context`` cached tokens (static cache, prompt already run), compiled when
    ``mode`` is, and two ``(batch, 1)`` token inputs for it."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    cache = StaticCache(config=model.config, max_cache_len=grid.context + 1)
    prompt = torch.randint(vocab, (batch, grid.context), device=device)
    model(prompt, past_key_values=cache, cache_position=torch.arange(grid.context, device=device), use_cache=True)
    position = torch.tensor([grid.context], device=device)
    tokens = [torch.randint(vocab, (batch, 1), device=device) for _ in range(2)]
    step = torch.compile(model) if mode.startswith("compiled") else model

    def fn(token: torch.Tensor) -> torch.Tensor:
        # Every timed step decodes the same position: newer transformers keep the cache's length on the device
        # and advance it per call, older ones read cache_position; both are set here, inside any graph.
        for layer in getattr(cache, "layers", ()):
            if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
                layer.cumulative_length.fill_(grid.context)
        return step(token, past_key_values=cache, cache_position=position, use_cache=True, logits_to_keep=1).logits

    return fn, tokens


def decode_measurements(model: nn.Module, batch: int, grid: Grid, mode: str, repeats: int) -> list[dict]:
    """tokens/s of one decode step after ``grid.context`` cached tokens."""
    fn, tokens = decode_call(model, batch, grid, mode)
    ms = time_mode_ms(fn, tokens, mode, repeats)
    return [{"metric": "tokens_per_s", "value": batch / (ms * 1e-3), "ms": ms,
             "call_bytes": _call_bytes(fn, tokens[0])}]  # fmt: skip


def prefill_modes(grid: Grid) -> list[str]:
    """The modes a causal LM's prefill is timed in: none for ``prefill_tokens`` 0 (a decode-only run), else eager,
    and compiled too when the grid times any compiled mode (a 2048-token prefill is not replayed from a CUDA graph
    here: compiled is its fast mode)."""
    if not grid.prefill_tokens:
        return []
    return ["eager"] + (["compiled"] if any(mode.startswith("compiled") for mode in grid.modes) else [])


def prefill_call(model: nn.Module, grid: Grid, mode: str) -> tuple[Callable, list[torch.Tensor]]:
    """One forward over ``grid.prefill_tokens`` tokens (batch 1, last position's logits), through
    ``torch.compile`` when ``mode`` is "compiled" (compiled at its first call), and two inputs for it."""
    device = next(model.parameters()).device
    ids = [torch.randint(model.config.vocab_size, (1, grid.prefill_tokens), device=device) for _ in range(2)]
    forward = torch.compile(model) if mode == "compiled" else model
    return (lambda t: forward(t, use_cache=False, logits_to_keep=1).logits), ids


def prefill_measurement(model: nn.Module, grid: Grid, repeats: int, mode: str = "eager") -> dict:
    """Milliseconds of one prefill (:func:`prefill_call`), eager or compiled (compiled during the warm-up)."""
    prefill, ids = prefill_call(model, grid, mode)
    ms = _time_eager_ms(prefill, ids, repeats)
    return {"metric": "prefill_ms", "value": ms, "ms": ms, "mode": mode, "batch": 1,
            "tokens": grid.prefill_tokens, "call_bytes": _call_bytes(prefill, ids[0])}  # fmt: skip


def run(
    model_name: str,
    grid: Grid | None,
    dry_run: bool,
    out_dir: Path | None,
    name: str,
    command: str,
    fp32: str = "ieee",
) -> dict:
    """Time every case of ``grid`` (the model kind's default grid when None); write ``<name>.json`` and ``.md``.

    ``dry_run``: tiny inputs and two repeats, on the CPU when there is no GPU (for tests of the whole path).
    ``fp32``: how our kernels multiply fp32 tiles, "ieee" or "tf32x3" (only they read it: dense, PyTorch BSR and
    cuDNN follow PyTorch's own TF32 switches).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not dry_run:
        raise RuntimeError("bench e2e times GPU kernels: it needs a CUDA GPU (or --dry-run)")
    payload = new_result("e2e", command, model=model_name, fp32_precision=fp32)
    folder = out_dir or results_folder(payload)
    repeats = 2 if dry_run else 20
    kind = model_kind(model_config(model_name))
    grid = grid or DEFAULT_GRIDS[kind]
    if dry_run:
        grid = Grid(**{**grid.__dict__, **DRY_RUN})
    time_fp8 = dense_fp8_runs("dense_fp8" in grid.impls, device)

    def measure(model: nn.Module, base: dict) -> None:
        """Every (mode, batch) of one model into the payload; a case that fails is recorded with its error."""
        # not inference_mode: PyTorch's BSR F.linear fails on inference tensors
        with torch.no_grad(), fp32_precision(fp32):
            cases = [(mode, batch) for mode, batch in itertools.product(grid.modes, grid.batches)]
            prefills = [(f"prefill {mode}", 1) for mode in prefill_modes(grid)] if kind == "causal_lm" else []
            for mode, batch in cases + prefills:
                try:
                    if mode.startswith("prefill"):
                        rows = [prefill_measurement(model, grid, repeats, mode.split()[1])]
                    elif kind == "vit":
                        rows = vit_measurements(model, batch, DTYPES[base["dtype"]], mode, repeats)
                    elif kind == "encoder":
                        rows = encoder_measurements(model, batch, grid, mode, repeats)
                    else:
                        rows = decode_measurements(model, batch, grid, mode, repeats)
                except Exception as error:  # e.g. a path that does not compile: recorded, the run goes on
                    rows = [{"metric": None, "value": None, "error": f"{type(error).__name__}: {str(error)[:200]}"}]
                for row in rows:
                    # the model's own bytes and its call's peak: other models resident in the run do not count
                    call_bytes = row.pop("call_bytes", None)
                    peak = None if call_bytes is None else base["model_bytes"] + call_bytes
                    payload["rows"].append({**base, "mode": mode, "batch": batch, "peak_mem_bytes": peak, **row})
                    shown = f"{row['value']:.1f} {row['metric']}" if row["value"] else row["error"]
                    print(f"{base['impl']:<12} {base['dtype']} {mode:<10} batch {batch:<4} s={base['sparsity']} "
                          f"b={base['block']} {base['targets']:<14} {shown}", flush=True)  # fmt: skip
                torch._dynamo.reset()  # compiled graphs hold their model alive
        write_result(folder / f"{name}.json", payload)

    for dtype_name in grid.dtypes:
        dense, _ = build_model(model_name, DTYPES[dtype_name], device)
        base = {"model": model_name, "dtype": dtype_name}
        measure(dense, {**base, "sparsity": 0.0, "block": None, "targets": "", "impl": "dense",
                        "model_bytes": nbytes(dense)})  # fmt: skip
        for targets in grid.targets if time_fp8 else ():  # once per target set: sparsity and block do not change it
            model = dense_fp8_model(dense, targets)
            measure(model, {**base, "sparsity": 0.0, "block": None, "targets": targets, "impl": "dense_fp8",
                            "model_bytes": nbytes(model)})  # fmt: skip
            del model
        for sparsity, block, targets in itertools.product(grid.sparsities, grid.blocks, grid.targets):
            models, layer_bytes = sparse_models(dense, sparsity, block, targets, grid.impls)
            for impl in (impl for impl in grid.impls if impl in models):
                model = models[impl]
                measure(model, {**base, "sparsity": sparsity, "block": block, "targets": targets, "impl": impl,
                                "model_bytes": nbytes(model), "target_layer_bytes": layer_bytes})  # fmt: skip
            del models
        del dense
    write_table(folder / f"{name}.json")
    e2e_plot(folder / f"{name}.json")
    return payload


def speedup(row: dict, dense: dict) -> float:
    """How many times faster ``row`` is than the ``dense`` row of the same case (prefill rows are times)."""
    return dense["value"] / row["value"] if row["metric"] == "prefill_ms" else row["value"] / dense["value"]


def write_table(json_path: Path) -> Path:
    """``<stem>.md``: each sparse case's metric and its ratio to dense in the same mode, dtype and batch; where the
    run timed quantized tiles or dense fp8, their speedups over dense, each of ours over dense fp8 (same targets) and
    their model bytes over dense's."""
    payload = read_result(json_path)
    env, rows = payload["env"], [r for r in payload["rows"] if r["value"]]
    key = lambda r: (r["mode"], r["dtype"], r["batch"], r["metric"])
    dense = {key(r): r for r in rows if r["impl"] == "dense"}
    dense_fp8 = {(*key(r), r["targets"]): r for r in rows if r["impl"] == "dense_fp8"}
    cases: dict[tuple, dict[str, dict]] = {}  # (key, sparsity, block, targets) -> sparse impl -> row
    for r in rows:
        if r["impl"] in IMPLS[1:6] and key(r) in dense:
            cases.setdefault((*key(r), r["sparsity"], r["block"], r["targets"]), {})[r["impl"]] = r
    quantized = [impl for impl in QUANTIZED_IMPLS if any(impl in impls for impls in cases.values())]
    versus = ["sparseblocks", *quantized]  # what is compared with dense fp8
    priced = [*quantized, *(["dense_fp8"] if dense_fp8 else [])]  # with a model bytes column of their own
    table = []
    for impls in cases.values():
        r = next(iter(impls.values()))  # the case's metric, mode, ... and targeted layers (the same in each row)
        base, ours, theirs = dense[key(r)], impls.get("sparseblocks"), impls.get("torch_bsr")
        layers = r["target_layer_bytes"]
        cells = [
            r["metric"], r["mode"], r["dtype"], r["batch"], r["targets"], r["sparsity"], r["block"],
            f"{base['value']:.1f}", f"{theirs['value']:.1f}" if theirs else "—",
            f"{ours['value']:.1f}" if ours else "—",
            f"{speedup(theirs, base):.2f}x" if theirs else "—", f"**{speedup(ours, base):.2f}x**" if ours else "—",
            f"{ours['model_bytes'] / base['model_bytes']:.3f}" if ours else "—",
            f"{layers['after'] / layers['before']:.3f}",
        ]  # fmt: skip
        fp8 = dense_fp8.get((*key(r), r["targets"]))
        measured = {**impls, **({"dense_fp8": fp8} if fp8 else {})}
        ms = {impl: row["ms"] for impl, row in measured.items()}  # a call's time, whatever the metric
        cells += [ratio_cell(base["ms"], ms.get(impl)) for impl in quantized]
        if dense_fp8:
            cells += fp8_cells(base["ms"], ms.get("dense_fp8"), [ms.get(impl) for impl in versus])
        cells += [f"{measured[i]['model_bytes'] / base['model_bytes']:.3f}" if i in measured else "—" for i in priced]
        table.append(cells)
    lines = [
        f"# {payload['model']} end to end on {env['gpu']}\n",
        f"One run ({versions(env)}). Command: `{env['command']}`\n",
        "Speedup: the sparse model's images/s or tokens/s over dense's (prefill: dense's time over its), same "
        "mode, dtype and batch. Bytes: the whole model's, ours over dense; and the targeted layers', after over "
        "before (indices included)."
        + (" `sparseblocks_<kind>`: ours on the same tiles quantized, as a speedup over dense; `<impl> bytes`: that "
           "model's bytes over dense's." if quantized or dense_fp8 else "")
        + "\n",
        *([FP8_NOTE] if dense_fp8 else []),
        *markdown_table(["metric", "mode", "dtype", "batch", "targets", "sparsity", "block", "dense", "torch_bsr",
                         "sparseblocks", "BSR speedup", "our speedup", "model bytes", "targeted layers' bytes",
                         *quantized, *(fp8_header(versus) if dense_fp8 else []),
                         *(f"{impl} bytes" for impl in priced)], table),
    ]  # fmt: skip
    path = Path(json_path).with_suffix(".md")
    path.write_text("\n".join(lines) + "\n")
    return path
