"""Distributed measurements owed by the GPU run (docs/distributed.md): an FSDP2 training step of a
Llama-3.2-1B-shaped model (MLPs 90%/b64 vs dense), TP decode of Llama-3.1-8B at batch 1, DCP save at N ranks and
load at 1. Random weights (the shapes are what count). ``--toy`` runs the same code at tiny sizes on CPUs (gloo),
as the tests do.

    torchrun --nproc-per-node 2 benchmarks/distributed_step.py fsdp            # 2 GPUs, NCCL
    torchrun --nproc-per-node 2 benchmarks/distributed_step.py tp --compile
    torchrun --nproc-per-node 2 benchmarks/distributed_step.py dcp-save --checkpoint /tmp/ckpt
    python benchmarks/distributed_step.py dcp-load --checkpoint /tmp/ckpt      # one process
    torchrun --nproc-per-node 2 benchmarks/distributed_step.py fsdp --toy      # CPUs, gloo

Each measurement prints one JSON line (rank 0): section, variant, median milliseconds, world size, device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

SIZES = {  # (hidden, intermediate, layers, heads, kv heads, vocab)
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256),
    "toy": (64, 256, 2, 4, 2, 128),
}


def start() -> torch.device:
    if "RANK" not in os.environ:  # one process without torchrun
        os.environ.update(RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def llama(size: str, sparse: bool, block: int, device: torch.device, dtype: torch.dtype):
    """A random Llama of ``size`` (same seed on every rank), its MLPs at 90% in ``block`` tiles when ``sparse``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparseblocks import SparsityConfig, sparsify

    hidden, intermediate, layers, heads, kv_heads, vocab = SIZES[size]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=4096)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    if sparse:
        sparsify(model, SparsityConfig(0.9, block, targets="mlp"))
    return model


def timed(step, repeats: int, device: torch.device) -> float:
    """Median milliseconds of ``step()`` over ``repeats`` runs after two warm-up runs (ranks in step)."""
    times = []
    for index in range(repeats + 2):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= 2:
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def report(section: str, variant: str, ms: float, device: torch.device, **extra) -> None:
    if dist.get_rank() == 0:
        row = {"section": section, "variant": variant, "ms": round(ms, 3), "world": dist.get_world_size(),
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", **extra}  # fmt: skip
        print(json.dumps(row), flush=True)


def fsdp(args, device: torch.device) -> None:
    """One FSDP2 training step (forward, backward, AdamW) of each rank's batch x sequence tokens."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from sparseblocks.integrations.distributed import shard_sparse_model

    size, (batch, length) = ("toy", (2, 32)) if args.toy else ("llama-3.2-1b", (8, 1024))
    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if device.type == "cuda" else None
    for sparse in (False, True):
        model = shard_sparse_model(llama(size, sparse, 16 if args.toy else 64, device, torch.float32), mp_policy=policy)
        generator = torch.Generator(device).manual_seed(dist.get_rank())
        ids = torch.randint(SIZES[size][5], (batch, length), device=device, generator=generator)
        ms = timed(training_step(model, ids), args.repeats, device)
        report("fsdp_step", "sparse_mlp_90" if sparse else "dense", ms, device, model=size,
               tokens_per_rank=batch * length)  # fmt: skip
        del model


def training_step(model, ids: torch.Tensor):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def tp(args, device: torch.device) -> None:
    """Decode at batch 1: milliseconds per generated token, MLPs 90%/b64 and dense, split by llama_plan."""
    from sparseblocks.integrations.distributed import llama_plan, parallelize_sparse

    size = "toy" if args.toy else "llama-3.1-8b"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for sparse in (False, True):
        model = llama(size, sparse, 16 if args.toy else 64, device, dtype).eval()
        parallelize_sparse(model, llama_plan())
        forward = torch.compile(model, mode="reduce-overhead") if args.compile else model
        ms = timed(decoding(forward, args.tokens, device), args.repeats, device) / args.tokens
        report("tp_decode", "sparse_mlp_90" if sparse else "dense", ms, device, model=size,
               compiled=args.compile, per="token")  # fmt: skip
        del model, forward


def decoding(forward, tokens: int, device: torch.device):
    """Greedy decoding of ``tokens`` tokens after an 8-token prompt, batch 1."""
    from transformers import DynamicCache

    prompt = torch.ones(1, 8, dtype=torch.long, device=device)

    @torch.no_grad()
    def decode():
        cache = DynamicCache()
        logits = forward(input_ids=prompt, cache=cache, use_cache=True).logits
        for _ in range(tokens):
            logits = forward(input_ids=logits[:, -1:].argmax(-1), cache=cache, use_cache=True).logits

    return decode


def dcp_save(args, device: torch.device) -> None:
    from sparseblocks.integrations.distributed import save_sharded, shard_sparse_model

    size = "toy" if args.toy else "llama-3.2-1b"
    model = shard_sparse_model(llama(size, True, 16 if args.toy else 64, device, torch.float32))
    dist.barrier()
    begin = time.perf_counter()
    save_sharded(model, args.checkpoint)  # once: repeated saves into one folder overwrite files under each other
    dist.barrier()
    report("dcp_save", "sparse_mlp_90", (time.perf_counter() - begin) * 1e3, device, model=size)


def dcp_load(args, device: torch.device) -> None:
    from sparseblocks.integrations.distributed import load_patterns, load_sharded, shard_sparse_model

    size = "toy" if args.toy else "llama-3.2-1b"
    model = llama(size, True, 16 if args.toy else 64, device, torch.float32)
    begin = time.perf_counter()
    load_patterns(model, args.checkpoint)
    shard_sparse_model(model)
    load_sharded(model, args.checkpoint)
    report("dcp_load", "sparse_mlp_90", (time.perf_counter() - begin) * 1e3, device, model=size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sections", nargs="+", choices=("fsdp", "tp", "dcp-save", "dcp-load"), help="in this order")
    parser.add_argument("--toy", action="store_true", help="tiny sizes (CPUs, gloo)")
    parser.add_argument("--compile", action="store_true", help="tp: torch.compile(mode='reduce-overhead')")
    parser.add_argument("--tokens", type=int, default=32, help="tp: tokens generated per decode (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default 5)")
    parser.add_argument("--checkpoint", help="dcp-save / dcp-load: the checkpoint folder")
    args = parser.parse_args(argv)
    if any(section.startswith("dcp") for section in args.sections) and not args.checkpoint:
        parser.error("dcp-save and dcp-load need --checkpoint")
    device = start()
    try:
        for section in args.sections:
            {"fsdp": fsdp, "tp": tp, "dcp-save": dcp_save, "dcp-load": dcp_load}[section](args, device)
        dist.barrier()  # no rank leaves while another still writes its shards
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Leave without running the interpreter's teardown: after a DCP save on gloo, about one exit in three aborted
    # there ("terminate called without an active exception", a C++ thread still joinable) once every row was
    # printed and the process group destroyed (CPU, torch 2.13).
    sys.stdout.flush()
    os._exit(0)
