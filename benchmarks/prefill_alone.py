"""Eager prefill of a Llama shape alone in a fresh process: dense, ours at 90%/b64 twice, dense again.

PYTHONPATH=src python3 benchmarks/prefill_alone.py [--model llama-3.1-8b]

``bench e2e`` times the prefill after its compiled decode graphs; this checks that figure without them
(``results/h200/prefill_alone.txt``).
"""

import argparse

import torch

import sparseblocks
from sparseblocks.bench import e2e

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="llama-3.1-8b", choices=["llama-3.2-1b", "llama-3.1-8b"])
model = parser.parse_args().model
print(sparseblocks.__file__, model, flush=True)
grid = e2e.Grid((1,), ("bf16",), (0.9,), (64,), ("mlp",), ("compiled_graph",))
dense, _ = e2e.build_model(model, torch.bfloat16, torch.device("cuda"))
with torch.no_grad():
    d = e2e.prefill_measurement(dense, grid, 20)["value"]
    ours = e2e.sparse_models(dense, 0.9, 64, "mlp")[0]["sparseblocks"]
    s = e2e.prefill_measurement(ours, grid, 20)["value"]
    s2 = e2e.prefill_measurement(ours, grid, 20)["value"]
    d2 = e2e.prefill_measurement(dense, grid, 20)["value"]
print(f"prefill dense {d:.1f} / {d2:.1f} ms, sparse {s:.1f} / {s2:.1f} ms", flush=True)
