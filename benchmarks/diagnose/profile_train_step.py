"""Profile one training step of the GPT-2-small-shaped model with 90%-sparse MLPs (GPU only).

    PYTHONPATH=src python3 benchmarks/diagnose/profile_train_step.py [--dense]

Prints the ops with the most GPU time and the step's CPU and GPU totals, to tell launch overhead from kernel time.
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sparseblocks.recipes.gpt import GPT, GPTConfig, sparsify_mlps

config = GPTConfig(vocab_size=50304, context=1024, layers=12, heads=12, width=768)
torch.manual_seed(0)
model = GPT(config).cuda()
if "--dense" not in sys.argv:
    sparsify_mlps(model, 0.9, 64, torch.Generator().manual_seed(0))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
tokens = torch.randint(config.vocab_size, (8, config.context + 1)).cuda()


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)


for _ in range(3):
    step()
torch.cuda.synchronize()
start = time.perf_counter()
step()
cpu_issue = time.perf_counter() - start
torch.cuda.synchronize()
print(f"one step: {1e3 * (time.perf_counter() - start):.1f} ms wall, of which {1e3 * cpu_issue:.1f} ms to issue")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
