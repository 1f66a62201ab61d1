"""Tables and plots made from stored benchmark rows (never from live timings)."""

from __future__ import annotations

import itertools
from pathlib import Path

from sparseblocks.bench.results import markdown_table, read_result, versions


def save_figure(fig, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (110 dpi), close it; return ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def speedups(rows: list[dict]) -> list[dict]:
    """Each sparse row with its speedup over the dense row of the same shape, M and dtype (same run)."""
    dense = {(r["shape"], r["M"], r["dtype"]): r["ms"] for r in rows if r["impl"] == "dense"}
    out = []
    for row in rows:
        if row["impl"] == "dense":
            continue
        base = dense[(row["shape"], row["M"], row["dtype"])]
        out.append(
            {
                **row,
                "speedup": base / row["ms"] if row["ms"] else None,
                "floor_speedup": base / row["floor_ms"],
            }
        )
    return out


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def spmm_table(rows: list[dict]) -> str:
    """Markdown: one line per case, speedup over dense of each path and of the floor."""
    table = speedups(rows)
    known = ("sparseblocks", "sparseblocks_int8", "sparseblocks_fp8", "sparseblocks_fp8_w8a8", "torch_bsr", "stk",
             "torch_2_4")  # fmt: skip
    impls = [i for i in known if any(r["impl"] == i for r in table)]
    cases = sorted(
        {(r["shape"], r["M"], r["dtype"], r["sparsity"], r["block"], r["mask"]) for r in table},
        key=lambda c: (c[2], c[0], c[1], c[5], c[3], c[4] or 0),  # 2:4 rows have no block
    )
    lines = []
    for case in cases:
        found = {
            r["impl"]: r
            for r in table
            if (r["shape"], r["M"], r["dtype"], r["sparsity"], r["block"], r["mask"]) == case
        }
        floor = next(iter(found.values()))["floor_speedup"]  # the 16-bit tiles' (rows in case order: ours first)
        cell = lambda r: _fmt(r["speedup"]) + (f" (floor {r['floor_speedup']:.2f}x)" if "bytes" in r else "")
        cells = [cell(found[i]) if i in found else "" for i in impls]
        lines.append([*case, *cells, f"{floor:.2f}x"])
    header = ["shape", "M", "dtype", "sparsity", "block", "mask", *impls, "floor"]
    return "\n".join(markdown_table(header, lines)) + "\n"


def spmm_report(json_path: Path) -> list[Path]:
    """Write ``<stem>.md`` (table), ``<stem>_heatmap.png`` and ``<stem>_batch.png`` beside ``<stem>.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    payload = read_result(json_path)
    env = payload["env"]
    table = [r for r in speedups(payload["rows"]) if r["mask"] == "random"]
    folder, stem = Path(json_path).parent, Path(json_path).stem
    header = (
        f"# spmm on {env['gpu']}\n\nSpeedup over dense cuBLAS `F.linear` measured in the same run "
        f"({versions(env)}).\n\nCommand: `{env['command']}`\n\n"
    )
    if payload.get("fp32_precision", "ieee") != "ieee":
        header += f"Our fp32 rows multiply tiles in `{payload['fp32_precision']}`; dense stays IEEE fp32.\n\n"
    (folder / f"{stem}.md").write_text(header + spmm_table(payload["rows"]))
    written = [folder / f"{stem}.md"]

    full_m = {name: max(r["M"] for r in table if r["shape"] == name) for name in {r["shape"] for r in table}}
    panels = sorted({(r["shape"], r["dtype"]) for r in table})
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for ax, (shape, dtype) in zip(axes[0], panels, strict=False):
        ours = [
            r
            for r in table
            if r["impl"] == "sparseblocks" and r["shape"] == shape and r["dtype"] == dtype and r["M"] == full_m[shape]
        ]
        sparsities = sorted({r["sparsity"] for r in ours})
        blocks = sorted({r["block"] for r in ours})
        grid = np.full((len(sparsities), len(blocks)), np.nan)
        for r in ours:
            grid[sparsities.index(r["sparsity"]), blocks.index(r["block"])] = r["speedup"] or np.nan
        ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                color="white" if value < np.nanmax(grid) * 0.6 else "black",
            )
        ax.set_xticks(range(len(blocks)), [str(b) for b in blocks])
        ax.set_yticks(range(len(sparsities)), [f"{s:.2f}" for s in sparsities])
        ax.set_xlabel("block size")
        ax.set_ylabel("sparsity")
        ax.set_title(f"{shape} {dtype}, M={full_m[shape]}", fontsize=9)
    fig.suptitle(f"sparseblocks spmm speedup over dense cuBLAS ({env['gpu']})")
    save_figure(fig, folder / f"{stem}_heatmap.png")
    written.append(folder / f"{stem}_heatmap.png")

    sweep = [r for r in table if r["shape"] == "vit_b_fc1" and r["dtype"] == "bf16" and r["sparsity"] == 0.9]
    if len({r["M"] for r in sweep}) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (impl, block), style in zip(
            sorted({(r["impl"], r["block"]) for r in sweep}), itertools.cycle(["-o", "--s", ":^", "-.d"])
        ):
            points = sorted(
                (r["M"] // 197, r["speedup"])
                for r in sweep
                if r["impl"] == impl and r["block"] == block and r["speedup"]
            )
            ax.plot(*zip(*points, strict=False), style, label=f"{impl} b{block}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("images (197 tokens each)")
        ax.set_ylabel("speedup over dense")
        ax.set_title(f"ViT-B fc1, 90% sparse, bf16 ({env['gpu']})")
        ax.legend(fontsize=7, ncol=2)
        save_figure(fig, folder / f"{stem}_batch.png")
        written.append(folder / f"{stem}_batch.png")
    return written


def train_tables(payload: dict) -> str:
    """Markdown for ``bench train``: layer/MLP speedups, the training step, and the convergence check."""
    rows = [r for r in payload["rows"] if r["case"] in ("linear", "mlp")]
    dense = {(r["case"], r["shape"]): r["ms"] for r in rows if r["impl"] == "dense"}
    lines, table = [], []
    for r in rows:
        base = dense.get((r["case"], r["shape"]))
        speedup = _fmt(base / r["ms"] if base and r["ms"] else None)
        ms = "—" if r["ms"] is None else f"{r['ms']:.3f}"
        memory = f"{r['peak_mem_bytes'] / 2**20:.0f}" if "peak_mem_bytes" in r else "—"
        table.append([r["case"], r["shape"], r["sparsity"], r["block"], r["impl"], ms, speedup, memory])
    if rows:
        lines += [
            "## Forward + backward of one layer / one MLP (bf16)\n",
            *markdown_table(["case", "shape", "sparsity", "block", "impl", "ms", "speedup", "peak memory (MiB)"],
                            table),
        ]  # fmt: skip
    steps = [r for r in payload["rows"] if r["case"] == "train_step"]
    if steps:
        dense_step = {(r["shape"], r.get("mode", "eager")): r for r in steps if r["impl"] == "dense"}
        table = []
        for r in steps:
            dense_row = dense_step[r["shape"], r.get("mode", "eager")]
            table.append([
                r["shape"], r.get("mode", "eager"), r["sparsity"], r["block"], f"{r['ms']:.1f}",
                f"{dense_row['ms'] / r['ms']:.2f}x", f"{r['peak_mem_bytes'] / 2**20:.0f}",
                f"{r['mlp_state_bytes'] / 2**20:.1f}", f"{r['mlp_state_bytes'] / dense_row['mlp_state_bytes']:.3f}x",
            ])  # fmt: skip
        lines += [
            "\n## Training step (forward, backward, AdamW; bf16 autocast, fp32 weights)\n",
            *markdown_table(["model", "mode", "sparsity", "block", "ms", "speedup", "peak memory (MiB)",
                             "MLP weights+grads+AdamW (MiB)", "vs dense"], table),
        ]  # fmt: skip
    if "convergence" in payload:
        c = payload["convergence"]
        finals = ", ".join(f"{path} {loss:.4f}" for path, loss in c["final_loss_mean_last_20"].items())
        lines += [
            "\n## Convergence: Triton kernels vs the PyTorch reference, same mask and batches\n",
            f"{c['model']}, {c['steps']} steps on tinyshakespeare. Mean loss of the last 20 steps: {finals}; "
            f"largest difference at any single step: {c['max_abs_step_difference']:.4f}.",
        ]
    return "\n".join(lines) + "\n"


def train_report(json_path: Path) -> list[Path]:
    """Write ``<stem>.md``, ``<stem>_speedup.png`` and (with a convergence run) ``<stem>_convergence.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    payload = read_result(json_path)
    env = payload["env"]
    folder, stem = Path(json_path).parent, Path(json_path).stem
    header = (
        f"# Sparse training on {env['gpu']}\n\nMeasured in one run ({versions(env)}).\n\n"
        f"Command: `{env['command']}`\n\n"
    )
    (folder / f"{stem}.md").write_text(header + train_tables(payload))
    written = [folder / f"{stem}.md"]

    rows = [r for r in payload["rows"] if r["case"] in ("linear", "mlp")]
    panels = sorted({(r["case"], r["shape"]) for r in rows})
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
        for ax, (case, shape) in zip(axes[0], panels, strict=True):
            mine = [r for r in rows if (r["case"], r["shape"]) == (case, shape)]
            base = next(r["ms"] for r in mine if r["impl"] == "dense")
            for (impl, block), style in zip(
                sorted({(r["impl"], r["block"]) for r in mine if r["impl"] != "dense"}),
                itertools.cycle(["-o", "--s", ":^", "-.d"]),
            ):
                points = sorted((r["sparsity"], base / r["ms"]) for r in mine
                                if (r["impl"], r["block"]) == (impl, block) and r["ms"])  # fmt: skip
                if points:
                    ax.plot(*zip(*points, strict=True), style, label=f"{impl} b{block}")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xlabel("sparsity")
            ax.set_ylabel("speedup over dense (fwd+bwd)")
            ax.set_title(f"{case} {shape}", fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle(f"forward + backward, bf16 ({env['gpu']})")
        save_figure(fig, folder / f"{stem}_speedup.png")
        written.append(folder / f"{stem}_speedup.png")

    if "convergence" in payload:
        fig, ax = plt.subplots(figsize=(6, 4))
        for path, losses in payload["convergence"]["losses"].items():
            ax.plot(range(1, len(losses) + 1), losses, lw=1, label=path)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("90%-sparse MLPs: Triton kernels vs reference ops", fontsize=9)
        ax.legend()
        save_figure(fig, folder / f"{stem}_convergence.png")
        written.append(folder / f"{stem}_convergence.png")
    return written


def mlp_plot(json_path: Path) -> Path:
    """``<stem>.png`` beside a ``bench mlp`` file: speedup over dense against sparsity at each shape's largest
    token count (blocks 64 and 128), and against tokens at 90% with blocks of 64."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    payload = read_result(json_path)
    rows = [r for r in payload["rows"] if r["ms"]]
    dense = {(r["shape"], r["M"]): r["ms"] for r in rows if r["impl"] == "dense"}
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    swept = [s for s in shapes if len({m for shape, m in dense if shape == s}) > 1]
    fig, axes = plt.subplots(1, len(shapes) + len(swept), figsize=(4 * (len(shapes) + len(swept)), 3.6), squeeze=False)
    impls = ("torch_bsr", "sparseblocks_unfused", "sparseblocks_fused")
    for ax, shape in zip(axes[0], shapes, strict=False):
        m = max(m for s, m in dense if s == shape)
        for (impl, block), style in zip(itertools.product(impls, (64, 128)), itertools.cycle(["-o", "--s"])):
            points = sorted((r["sparsity"], dense[shape, m] / r["ms"]) for r in rows
                            if (r["shape"], r["M"], r["impl"], r["block"]) == (shape, m, impl, block))  # fmt: skip
            if points:
                ax.plot(*zip(*points, strict=True), style, label=f"{impl} b{block}")
        floor = sorted({(r["sparsity"], dense[shape, m] / r["floor_ms"]) for r in rows
                        if (r["shape"], r["M"], r["impl"], r["block"]) == (shape, m, "sparseblocks", 64)})  # fmt: skip
        ax.plot(*zip(*floor, strict=True), ":", color="gray", label="floor b64")
        ax.set(xlabel="sparsity", ylabel="speedup over dense MLP", yscale="log", title=f"{shape}, {m} tokens")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.legend(fontsize=7)
    for ax, shape in zip(axes[0][len(shapes) :], swept, strict=True):
        for impl, style in zip(("torch_bsr", "sparseblocks"), ("-o", "-s"), strict=True):
            case = (shape, impl, 0.9, 64)
            points = sorted((r["M"], dense[shape, r["M"]] / r["ms"]) for r in rows
                            if (r["shape"], r["impl"], r["sparsity"], r["block"]) == case)  # fmt: skip
            ax.plot(*zip(*points, strict=True), style, label=impl)
        ax.set(xlabel="tokens", ylabel="speedup over dense MLP", xscale="log", title=f"{shape}, 90%, block 64")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.legend(fontsize=7)
    fig.suptitle(f"whole MLPs, bf16 ({payload['env']['gpu']})")
    return save_figure(fig, Path(json_path).with_suffix(".png"))


def e2e_plot(json_path: Path) -> Path:
    """``<stem>.png`` beside a ``bench e2e`` file: images/s (or sentences/s) speedup over dense against batch size,
    one line per block, a panel per (dtype, mode, targets) at the highest sparsity; or tokens/s of each path per
    sparsity, a panel per decode batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    payload = read_result(json_path)
    rows = [r for r in payload["rows"] if r["value"] and r["metric"] != "prefill_ms"]
    dense = {(r["mode"], r["dtype"], r["batch"], r["metric"]): r["value"] for r in rows if r["impl"] == "dense"}
    sparse = [r for r in rows if r["impl"] not in ("dense", "dense_fp8")]  # the dense fp8 baseline: in the table
    if rows and rows[0]["metric"] in ("images_per_s", "sentences_per_s"):
        unit = rows[0]["metric"].removesuffix("_per_s")
        top = max(r["sparsity"] for r in sparse)
        panels = sorted({(r["dtype"], r["mode"], r["targets"]) for r in sparse})
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
        for ax, (dtype, mode, targets) in zip(axes[0], panels, strict=True):
            for (impl, block), style in zip(sorted({(r["impl"], r["block"]) for r in sparse}),
                                            itertools.cycle(["-o", "--s", ":^"])):  # fmt: skip
                case = (dtype, mode, targets, impl, block, top)
                points = sorted((r["batch"], r["value"] / dense[r["mode"], r["dtype"], r["batch"], r["metric"]])
                                for r in sparse if (r["dtype"], r["mode"], r["targets"], r["impl"], r["block"],
                                                    r["sparsity"]) == case)  # fmt: skip
                if points:
                    ax.plot(*zip(*points, strict=True), style, label=f"{impl} b{block}")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set(xscale="log", xlabel=f"batch ({unit})", ylabel=f"{unit}/s over dense",
                   title=f"{dtype} {mode}, {targets} {top:.0%} sparse")  # fmt: skip
            ax.legend(fontsize=7)
    else:
        batches = sorted({r["batch"] for r in rows})
        fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.6), squeeze=False)
        for ax, batch in zip(axes[0], batches, strict=True):
            cases = sorted({(r["sparsity"], r["block"]) for r in sparse if r["batch"] == batch})
            for offset, impl in enumerate(("torch_bsr", "sparseblocks")):
                value = {(r["sparsity"], r["block"]): r["value"] for r in sparse
                         if r["batch"] == batch and r["impl"] == impl}  # fmt: skip
                ax.bar([i + 0.4 * offset - 0.2 for i in range(len(cases))], [value.get(c, 0) for c in cases],
                       width=0.4, label=impl)  # fmt: skip
            ax.axhline(next(v for (_, _, b, _), v in dense.items() if b == batch), color="black", label="dense")
            ax.set_xticks(range(len(cases)), [f"{s:.0%} b{b}" for s, b in cases], fontsize=7)
            ax.set(ylabel="tokens/s", title=f"decode, batch {batch}")
            ax.legend(fontsize=7)
    fig.suptitle(f"{payload['model']} ({payload['env']['gpu']})")
    return save_figure(fig, Path(json_path).with_suffix(".png"))
