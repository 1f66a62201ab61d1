"""One Llama step alone in a fresh process, dense then ours at 90%/b64 twice then dense again: a 2048-token
prefill or a one-token decode step, eager or through torch.compile.

PYTHONPATH=src python3 benchmarks/diagnose/llama_step.py [--model llama-3.1-8b] [--step prefill|decode]
    [--mode eager|compiled] [--profile]

``bench e2e`` times each model after others in the same process; this checks a figure without them
(``results/h200/prefill_alone.txt``, from this script's earlier name and eager prefill). Each timing line also
gives torch.compile's graphs, graph breaks and recompilations for that model. ``--profile`` then lays out one step
of each model: the ops with the most CPU time and the kernels with the most GPU time, the GPU's busy time against
the wall time, the Python functions with the most time of their own (cProfile), and every host-device
synchronisation each model makes (``torch.cuda.set_sync_debug_mode``).
"""

import argparse
import cProfile
import pstats
import time
import warnings
from collections.abc import Callable

import torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

import sparseblocks
from sparseblocks.bench import e2e


def lay_out(name: str, step: Callable, x: torch.Tensor) -> None:
    """Profile one step: top CPU ops, top kernels, GPU busy vs wall time, then the Python side."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step(x)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3
    events = prof.key_averages()
    gpu_ms = sum(e.self_device_time_total for e in events) / 1e3
    print(f"--- {name}: wall {wall_ms:.1f} ms (profiled), GPU busy {gpu_ms:.1f} ms")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    print(events.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
    python_profile = cProfile.Profile()  # the Python side, which the table above does not see
    python_profile.runcall(step, x)
    torch.cuda.synchronize()
    pstats.Stats(python_profile).sort_stats("tottime").print_stats(25)


def count_syncs(step: Callable, x: torch.Tensor) -> list[str]:
    """The warnings of ``set_sync_debug_mode("warn")`` during one step: one per synchronising call."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(x)
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]


def timed(model: torch.nn.Module, grid: e2e.Grid, step: str, mode: str) -> str:
    """Milliseconds of one step of ``model``, with what torch.compile made of it."""
    counters.clear()
    if step == "prefill":
        ms = e2e.prefill_measurement(model, grid, 20, mode)["ms"]
    else:
        ms = e2e.decode_measurements(model, 1, grid, mode, 20)[0]["ms"]
    torch._dynamo.reset()
    compiled = (f" ({counters['stats']['unique_graphs']} graphs, {sum(counters['graph_break'].values())} breaks, "
                f"{sum(counters['recompiles'].values())} recompilations)") if mode == "compiled" else ""  # fmt: skip
    return f"{ms:.2f} ms{compiled}"


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="llama-3.1-8b", choices=["llama-3.2-1b", "llama-3.1-8b"])
parser.add_argument("--step", default="prefill", choices=["prefill", "decode"])
parser.add_argument("--mode", default="eager", choices=["eager", "compiled"])
parser.add_argument("--profile", action="store_true", help="then profile one step of each model")
args = parser.parse_args()
print(sparseblocks.__file__, args.model, args.step, args.mode, flush=True)
grid = e2e.Grid((1,), ("bf16",), (0.9,), (64,), ("mlp",), ("compiled_graph",))
dense, _ = e2e.build_model(args.model, torch.bfloat16, torch.device("cuda"))
with torch.no_grad():
    ours = e2e.sparse_models(dense, 0.9, 64, "mlp")[0]["sparseblocks"]
    times = [timed(model, grid, args.step, args.mode) for model in (dense, ours, ours, dense)]
    print(f"{args.step} {args.mode}: dense {times[0]} / {times[3]}, sparse {times[1]} / {times[2]}", flush=True)
    if args.profile:
        for name, model in (("dense", dense), ("sparse", ours)):
            if args.step == "prefill":
                step, inputs = e2e.prefill_call(model, grid, args.mode)
            else:
                step, inputs = e2e.decode_call(model, 1, grid, args.mode)
            for x in inputs:  # compiles, when compiled
                step(x)
            lay_out(name, step, inputs[0])
            syncs = count_syncs(step, inputs[0])
            print(f"{name}: {len(syncs)} synchronising calls in one step", *sorted(set(syncs))[:5], sep="\n  ")
            torch._dynamo.reset()
