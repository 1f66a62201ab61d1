"""Eager prefill of a Llama shape alone in a fresh process: dense, ours at 90%/b64 twice, dense again.

PYTHONPATH=src python3 benchmarks/prefill_alone.py [--model llama-3.1-8b] [--profile]

``bench e2e`` times the prefill after its compiled decode graphs; this checks that figure without them
(``results/h200/prefill_alone.txt``). ``--profile`` then lays out one prefill of each model: the ops with the
most CPU time and the kernels with the most GPU time, the GPU's busy time against the wall time, the Python
functions with the most time of their own (cProfile), and every host-device synchronisation each model makes
(``torch.cuda.set_sync_debug_mode``).
"""

import argparse
import cProfile
import pstats
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

import sparseblocks
from sparseblocks.bench import e2e


def lay_out(name: str, prefill, ids: torch.Tensor) -> None:
    """Profile one prefill: top CPU ops, top kernels, GPU busy vs wall time."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        prefill(ids)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3
    events = prof.key_averages()
    gpu_ms = sum(e.self_device_time_total for e in events) / 1e3
    print(f"--- {name}: wall {wall_ms:.1f} ms (profiled), GPU busy {gpu_ms:.1f} ms")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    print(events.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
    python_profile = cProfile.Profile()  # the Python side, which the table above does not see
    python_profile.runcall(prefill, ids)
    torch.cuda.synchronize()
    pstats.Stats(python_profile).sort_stats("tottime").print_stats(25)


def count_syncs(prefill, ids: torch.Tensor) -> list[str]:
    """The warnings of ``set_sync_debug_mode("warn")`` during one prefill: one per synchronising call."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            prefill(ids)
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="llama-3.1-8b", choices=["llama-3.2-1b", "llama-3.1-8b"])
parser.add_argument("--profile", action="store_true", help="then profile one prefill of each model")
args = parser.parse_args()
print(sparseblocks.__file__, args.model, flush=True)
grid = e2e.Grid((1,), ("bf16",), (0.9,), (64,), ("mlp",), ("compiled_graph",))
dense, _ = e2e.build_model(args.model, torch.bfloat16, torch.device("cuda"))
with torch.no_grad():
    d = e2e.prefill_measurement(dense, grid, 20)["value"]
    ours = e2e.sparse_models(dense, 0.9, 64, "mlp")[0]["sparseblocks"]
    s = e2e.prefill_measurement(ours, grid, 20)["value"]
    s2 = e2e.prefill_measurement(ours, grid, 20)["value"]
    d2 = e2e.prefill_measurement(dense, grid, 20)["value"]
    print(f"prefill dense {d:.1f} / {d2:.1f} ms, sparse {s:.1f} / {s2:.1f} ms", flush=True)
    if args.profile:
        ids = torch.randint(dense.config.vocab_size, (1, grid.prefill_tokens), device="cuda")
        for name, model in (("dense", dense), ("sparse", ours)):
            prefill = lambda t, model=model: model(t, use_cache=False, logits_to_keep=1).logits
            lay_out(name, prefill, ids)
            syncs = count_syncs(prefill, ids)
            print(f"{name}: {len(syncs)} synchronising calls in one prefill", *sorted(set(syncs))[:5], sep="\n  ")
