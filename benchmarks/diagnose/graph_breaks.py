"""List torch.compile graph breaks of a sparse GPT training forward under bf16 autocast (CUDA if present).

PYTHONPATH=src python3 benchmarks/diagnose/graph_breaks.py
"""

import torch

from sparseblocks.recipes.gpt import GPT, GPTConfig, sparsify_mlps

device = "cuda" if torch.cuda.is_available() else "cpu"
model = GPT(GPTConfig(vocab_size=50, context=32, layers=2, heads=2, width=64)).to(device)
sparsify_mlps(model, 0.5, 16)
tokens = torch.randint(50, (2, 33), device=device)


def loss(tokens):
    with torch.autocast(device, dtype=torch.bfloat16):
        return model(tokens[:, :-1], tokens[:, 1:])[1]


explanation = torch._dynamo.explain(loss)(tokens)
print(f"{device}: {explanation.graph_break_count} graph breaks")
for reason in explanation.break_reasons:
    print(" ", reason.reason, "\n   ", reason.user_stack[-1] if reason.user_stack else "")
