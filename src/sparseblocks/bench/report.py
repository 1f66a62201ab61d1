"""``sparseblocks report``: one Markdown page over every stored benchmark and accuracy result.

Reads the JSON files one folder below a results folder (``benchmarks/results/<gpu>/*.json``,
``benchmarks/results/accuracy/*.json``), each a schema-1 result (:mod:`sparseblocks.bench.results`) whose ``kind``
picks its section (:data:`SECTIONS`), and writes per section a short headline table built from the rows, the plots
and per-run tables stored beside each file (relative links), and where every number came from (its ``env``: GPU,
versions, commit, command).

Every ratio is taken within one file, i.e. one run: a sparse row over the dense row of the same run, never across
files. Where two files measured the same case (a run cut short and re-run), both appear, each with its source.

A file of a kind without a section (tuning sweeps, A/B runs) is listed under "Other records"; a file that cannot
be read, is not schema 1 or names an unknown kind is listed there too, flagged with what is wrong, and not
summarised; a file whose rows lack a field its section needs gets a line saying so, and the rest of the page is
made.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sparseblocks.bench.results import ResultError, check, markdown_table

# The sparsity every speed benchmark measures and the README quotes: the headline tables are taken there.
HEADLINE_SPARSITY = 0.9
# Accuracy metrics a result row may carry -> whether higher is better. The first one a file's rows have is used.
ACCURACY_METRICS = {
    "val_loss": False,
    "test_accuracy": True,
    "cosine_mean": True,
    "accuracy": True,
    "loss": False,
    "perplexity": False,
}


@dataclass
class Source:
    """One result file: its payload, its kind, and the per-run table and plots stored beside it."""

    path: Path
    payload: dict | None = None
    kind: str | None = None
    error: str | None = None
    table: Path | None = None
    plots: list[Path] = field(default_factory=list)

    @property
    def rows(self) -> list[dict]:
        return self.payload.get("rows") or []


def collect(results_dir: str | Path) -> tuple[list[Source], list[Path]]:
    """Every ``*.json`` one folder below ``results_dir``, read and classified, with the ``.md`` of the same stem
    and the plots it owns (a png belongs to the longest JSON stem that starts its name); and the other files."""
    sources, others = [], []
    for folder in sorted(p for p in Path(results_dir).iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.is_file())
        here = [Source(p) for p in files if p.suffix == ".json"]
        for source in here:
            try:
                source.payload = check(json.loads(source.path.read_text()))
                source.kind = source.payload["kind"]
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, ResultError) as error:
                source.error = f"{type(error).__name__}: {error}"
            table = source.path.with_suffix(".md")
            source.table = table if table.exists() else None
        owned = {s.table for s in here if s.table}
        longest_first = sorted(here, key=lambda s: len(s.path.stem), reverse=True)
        for png in (p for p in files if p.suffix == ".png"):
            stem = png.stem
            owner = next((s for s in longest_first if stem == s.path.stem or stem.startswith(s.path.stem + "_")), None)
            if owner is not None:
                owner.plots.append(png)
                owned.add(png)
        sources += here
        others += [p for p in files if p.suffix != ".json" and p not in owned]
    return sources, others


# ---------------------------------------------------------------------------------------------- building blocks


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _mib(nbytes: float | None) -> str:
    return "—" if nbytes is None else f"{nbytes / 2**20:,.0f}"


def _ratio(part: float | None, whole: float | None, digits: int = 3) -> str:
    return f"{part / whole:.{digits}f}x" if part and whole else "—"


def _sparsity(value: float) -> str:
    return f"{value:.0%}" if value * 100 == round(value * 100) else f"{value:.1%}"


class _Page:
    """Markdown lines, with links relative to the folder the page is written to."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.lines: list[str] = []

    def rel(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.base)).as_posix()

    def link(self, path: Path, text: str | None = None) -> str:
        return f"[{text or path.name}]({self.rel(path)})"

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: list[str], rows: Iterable[list[object]]) -> None:
        lines = markdown_table(header, rows)
        if len(lines) == 2:  # e.g. a quick run that measured no case at the headline sparsity
            self.add(f"(No case of these files at {_sparsity(HEADLINE_SPARSITY)} sparsity against a dense row.)", "")
            return
        self.add(*lines, "")

    def plots(self, sources: list[Source]) -> None:
        for s in sources:
            self.add(*(f"![{png.stem}]({self.rel(png)})\n" for png in s.plots))

    def sources(self, sources: list[Source]) -> None:
        """Where each file's numbers came from: machine, versions, commit, command, and its per-run table."""
        rows = []
        for s in sources:
            p, env = s.payload, s.payload["env"]
            versions = ", ".join(f"{name} {env[name]}" for name in ("torch", "triton") if env.get(name)) or "—"
            # an accuracy run on the CPU has no GPU: its header's device says where it ran
            where = env["gpu"] if env.get("gpu") not in (None, "none") else p.get("device")
            rows.append([
                self.link(s.path), where or "—", versions, env.get("commit") or "—",
                f"`{env['command']}`" if env.get("command") else "—", self.link(s.table) if s.table else "—",
            ])  # fmt: skip
        self.add("Sources:", "")
        self.table(["file", "run on", "versions", "commit", "command", "full table"], rows)


# (sparsity, block) -> (speedup over dense, or None where the path failed; the row)
Grid = dict[tuple[float, object], tuple[float | None, dict]]


def _speedups(
    rows: list[dict], case: tuple[str, ...], time: str, keep: Callable[[dict], bool] | None = None
) -> dict[tuple, dict[str, Grid]]:
    """case -> impl -> grid: each sparse row of one file (that ``keep`` keeps) over the dense row of its case (same
    run), by the ``time`` key; cases without a dense row are left out."""
    dense = {tuple(r.get(k) for k in case): r[time] for r in rows if r["impl"] == "dense" and r.get(time)}
    out: dict[tuple, dict[str, Grid]] = {}
    for r in rows:
        key = tuple(r.get(k) for k in case)
        if r["impl"] == "dense" or key not in dense or (keep is not None and not keep(r)):
            continue
        speedup = dense[key] / r[time] if r.get(time) else None
        out.setdefault(key, {}).setdefault(r["impl"], {})[r["sparsity"], r["block"]] = (speedup, r)
    return out


def _at(grid: Grid, sparsity: float) -> dict[object, float | None]:
    """block -> speedup at one sparsity."""
    return {block: value for (level, block), (value, _) in grid.items() if level == sparsity}


def _best(values: dict[object, float | None]) -> tuple[object, float] | None:
    """The (key, value) of the largest value, ignoring missing ones."""
    found = [(key, value) for key, value in values.items() if value is not None]
    return max(found, key=lambda item: item[1]) if found else None


def _best_cell(values: dict[object, float | None]) -> str:
    best = _best(values)
    return "" if best is None else f"{best[1]:.2f}x b{best[0]}"


# ---------------------------------------------------------------------------------------------- speed


def _spmm(page: _Page, sources: list[Source]) -> None:
    page.add("## One layer, Y = X·Wᵀ (`sparseblocks bench spmm`)", "")
    page.add(
        f"Speedup over dense cuBLAS `F.linear` in the same run at {_sparsity(HEADLINE_SPARSITY)} sparsity (random "
        "masks): each block size of ours, the best block of the other sparse paths, and the floor at our best "
        "block (its flops, or the bytes of its tiles, index, output and the input columns they use, at the run's "
        "measured ceilings).",
        "",
    )
    impls = [i for i in ("torch_bsr", "stk") if any(r.get("impl") == i for s in sources for r in s.rows)]
    cases = []  # (source, (dtype, shape, M), impl -> grid)
    for s in sources:
        by_case = _speedups(s.rows, ("dtype", "shape", "M"), "ms", lambda r: r.get("mask") == "random")
        cases += [(s, case, grids) for case, grids in sorted(by_case.items()) if "sparseblocks" in grids]
    headline = [c for c in cases if _at(c[2]["sparseblocks"], HEADLINE_SPARSITY)]
    blocks = sorted({b for _, _, grids in headline for b in _at(grids["sparseblocks"], HEADLINE_SPARSITY)})
    rows = []
    for s, case, grids in headline:
        ours = _at(grids["sparseblocks"], HEADLINE_SPARSITY)
        best = _best(ours)
        floor = None
        if best is not None:
            row = grids["sparseblocks"][HEADLINE_SPARSITY, best[0]][1]
            floor = best[1] * row["ms"] / row["floor_ms"]  # dense time over the floor
        others = [_best_cell(_at(grids.get(impl, {}), HEADLINE_SPARSITY)) for impl in impls]
        rows.append([s.path.name, *case, *(_x(ours[b]) if b in ours else "" for b in blocks), *others, _x(floor)])
    header = ["source", "dtype", "layer", "M", *(f"b{b}" for b in blocks), *(f"{i} (best)" for i in impls), "floor"]
    page.table(header, rows)

    trend = [(s, case, grids["sparseblocks"]) for s, case, grids in cases
             if len({level for level, _ in grids["sparseblocks"]}) > 1]  # fmt: skip
    if trend:
        levels = sorted({level for _, _, grid in trend for level, _ in grid})
        page.add("Our best block at each sparsity (same runs):", "")
        page.table(
            ["source", "dtype", "layer", "M", *(_sparsity(level) for level in levels)],
            ([s.path.name, *case, *(_best_cell(_at(grid, level)) for level in levels)] for s, case, grid in trend),
        )
    page.plots(sources)
    page.sources(sources)


def _mlp(page: _Page, sources: list[Source]) -> None:
    page.add("## Whole MLPs, one token to a full batch (`sparseblocks bench mlp`)", "")
    page.add(
        f"bf16 MLPs at {_sparsity(HEADLINE_SPARSITY)} sparsity: speedup over the eager dense MLP of the same run at "
        "the block where `sparseblocks` (the path `sparse_mlp` dispatches to) is fastest; `of floor` is the "
        "floor's time over ours.",
        "",
    )
    paths = ("torch_bsr", "sparseblocks_unfused", "sparseblocks_fused")
    rows = []
    for s in sources:
        compiled = {(r["shape"], r["M"]): r["ms"] for r in s.rows if r["impl"] == "dense_compiled"}
        for (shape, m), grids in sorted(_speedups(s.rows, ("shape", "M"), "ms").items()):
            best = _best(_at(grids.get("sparseblocks", {}), HEADLINE_SPARSITY))
            if best is None:
                continue
            block, speedup = best
            ours = grids["sparseblocks"][HEADLINE_SPARSITY, block][1]
            dense_ms = speedup * ours["ms"]
            others = [grids.get(impl, {}).get((HEADLINE_SPARSITY, block), (None,))[0] for impl in paths]
            rows.append([
                s.path.name, shape, m, f"{dense_ms:.4f}", _ratio(dense_ms, compiled.get((shape, m)), 2),
                *(_x(v) for v in others), f"**{_x(speedup)}**", ours.get("dispatch", "—"), block,
                f"{ours['floor_ms'] / ours['ms']:.0%}" if ours.get("floor_ms") else "—",
            ])  # fmt: skip
    page.table(["source", "MLP", "tokens", "dense ms", "compiled dense", "torch_bsr", "unfused", "fused",
                "sparseblocks", "dispatch", "block", "of floor"], rows)  # fmt: skip
    page.plots(sources)
    page.sources(sources)


def _decode(page: _Page, sources: list[Source]) -> None:
    page.add("## Decode: a few tokens through Llama MLP weights (`sparseblocks bench decode`)", "")
    page.add(
        "Speedup of `spmm` over dense cuBLAS in the same run, weights not in L2, at our best block; `of floor` is "
        "the bandwidth floor's time over ours.",
        "",
    )
    cases: dict[tuple, dict[int, Grid]] = {}  # (source, dtype, case) -> tokens -> grid
    for s in sources:
        for (dtype, shape, m), grids in _speedups(s.rows, ("dtype", "shape", "M"), "us").items():
            if "sparseblocks" in grids:
                cases.setdefault((s.path.name, dtype, shape), {})[m] = grids["sparseblocks"]
    tokens = sorted({m for by_tokens in cases.values() for m in by_tokens})
    rows = []
    for case, by_tokens in cases.items():
        fewest = by_tokens[min(by_tokens)]
        best = _best(_at(fewest, HEADLINE_SPARSITY))
        of_floor = "—"
        if best is not None:
            row = fewest[HEADLINE_SPARSITY, best[0]][1]
            of_floor = f"{row['floor_us'] / row['us']:.0%}"
        rows.append([*case, *(_best_cell(_at(by_tokens.get(m, {}), HEADLINE_SPARSITY)) for m in tokens), of_floor])
    page.add(f"At {_sparsity(HEADLINE_SPARSITY)} sparsity, by tokens:", "")
    page.table(["source", "dtype", "case", *(f"{m} tok" for m in tokens), "of floor, fewest tokens"], rows)
    levels = sorted({level for by_tokens in cases.values() for grid in by_tokens.values() for level, _ in grid})
    page.add("At the fewest tokens measured, by sparsity:", "")
    page.table(
        ["source", "dtype", "case", "tokens", *(_sparsity(level) for level in levels)],
        ([*case, min(by_tokens), *(_best_cell(_at(by_tokens[min(by_tokens)], level)) for level in levels)]
         for case, by_tokens in cases.items()),
    )  # fmt: skip
    page.plots(sources)
    page.sources(sources)


def higher_is_better(metric: str) -> bool:
    """Throughputs (``tokens_per_s``, ``images/s``) grow when faster; times (``prefill_ms``, ``latency_s``) shrink."""
    name = metric.lower()
    return "per_s" in name or "/s" in name or "throughput" in name


def _e2e(page: _Page, sources: list[Source]) -> None:
    page.add("## Whole models (`sparseblocks bench e2e`)", "")
    page.add(
        "Speedup of the whole model over the dense model of the same run, mode, dtype and batch (a throughput's "
        f"ratio, a time's inverse ratio) at our best block, at {_sparsity(HEADLINE_SPARSITY)} sparsity (or the "
        "highest a run measured); at the largest batch also PyTorch's BSR path on the same tiles, and the whole "
        "model's bytes and peak memory over dense's.",
        "",
    )
    lines = []  # (source, case, sparsity, impl -> batch -> block -> (speedup, row, dense row))
    for s in sources:
        measured = [r for r in s.rows if r.get("metric") and r.get("value")]  # failed cases carry only an error
        dense = {(r.get("model"), r["metric"], r.get("mode"), r.get("dtype"), r.get("batch")): r
                 for r in measured if r.get("impl") == "dense"}  # fmt: skip
        cases: dict[tuple, dict] = {}  # case -> sparsity -> impl -> batch -> block -> (speedup, row, dense row)
        for r in measured:
            base = dense.get((r.get("model"), r["metric"], r.get("mode"), r.get("dtype"), r.get("batch")))
            if r.get("impl") == "dense" or base is None:
                continue
            ratio = r["value"] / base["value"] if higher_is_better(r["metric"]) else base["value"] / r["value"]
            case = (r.get("model"), r["metric"], r.get("mode"), r.get("dtype"), r.get("targets"))
            by_impl = cases.setdefault(case, {}).setdefault(r.get("sparsity"), {})
            by_impl.setdefault(r.get("impl"), {}).setdefault(r.get("batch"), {})[r.get("block")] = (ratio, r, base)
        for case, by_sparsity in cases.items():
            levels = [level for level, by_impl in by_sparsity.items() if "sparseblocks" in by_impl]
            if levels:
                level = HEADLINE_SPARSITY if HEADLINE_SPARSITY in levels else max(levels)
                lines.append((s, case, level, by_sparsity[level]))
    batches = sorted({b for *_, by_impl in lines for b in by_impl["sparseblocks"]}, key=lambda b: (b is None, b))
    rows = []
    for s, case, level, by_impl in lines:
        ours = by_impl["sparseblocks"]
        cells = [_best_cell({k: v[0] for k, v in ours.get(b, {}).items()}) for b in batches]
        largest = max(ours, key=lambda b: (b is not None, b))
        block = _best({k: v[0] for k, v in ours[largest].items()})[0]
        _, row, base = ours[largest][block]
        bsr = by_impl.get("torch_bsr", {}).get(largest, {}).get(block, (None,))[0]
        rows.append([
            s.path.name, *case[:4], case[4] or "—", _sparsity(level), *cells, _x(bsr),
            _ratio(row.get("model_bytes"), base.get("model_bytes")),
            _ratio(row.get("peak_mem_bytes"), base.get("peak_mem_bytes"), 2),
        ])  # fmt: skip
    page.table(["source", "model", "metric", "mode", "dtype", "targets", "sparsity", *(f"batch {b}" for b in batches),
                "torch_bsr, largest batch", "model bytes", "peak memory"], rows)  # fmt: skip
    page.plots(sources)
    page.sources(sources)


# ---------------------------------------------------------------------------------------------- training


def _train(page: _Page, sources: list[Source]) -> None:
    page.add("## Training: speed and memory (`sparseblocks bench train`)", "")
    layers = []  # (source, case, impl -> grid, dense row)
    for s in sources:
        rows = [r for r in s.rows if r.get("case") in ("linear", "mlp")]
        dense = {(r["case"], r["shape"], r.get("M")): r for r in rows if r["impl"] == "dense"}
        for case, grids in sorted(_speedups(rows, ("case", "shape", "M"), "ms").items()):
            if _best(_at(grids.get("sparseblocks", {}), HEADLINE_SPARSITY)):
                layers.append((s, case, grids, dense[case]))
    if layers:
        blocks = sorted({b for _, _, grids, _ in layers for b in _at(grids["sparseblocks"], HEADLINE_SPARSITY)})
        page.add(
            f"Forward + backward of one layer or one MLP at {_sparsity(HEADLINE_SPARSITY)} sparsity: speedup over "
            "dense in the same run at each block, stk's best block, and the peak memory of our best block over "
            "dense's.",
            "",
        )
        rows = []
        for s, (case, shape, m), grids, dense in layers:
            ours = _at(grids["sparseblocks"], HEADLINE_SPARSITY)
            best = grids["sparseblocks"][HEADLINE_SPARSITY, _best(ours)[0]][1]
            rows.append([
                s.path.name, case, shape, "—" if m is None else m, *(_x(ours.get(b)) for b in blocks),
                _best_cell(_at(grids.get("stk", {}), HEADLINE_SPARSITY)),
                _ratio(best.get("peak_mem_bytes"), dense.get("peak_mem_bytes"), 2),
            ])  # fmt: skip
        page.table(["source", "case", "shape", "M", *(f"b{b}" for b in blocks), "stk (best)", "peak memory"], rows)

    steps = []
    for s in sources:
        mine = [r for r in s.rows if r.get("case") == "train_step"]
        dense = {(r["shape"], r.get("mode", "eager")): r for r in mine if r["impl"] == "dense"}
        for r in mine:
            base = dense.get((r["shape"], r.get("mode", "eager")))
            if r["impl"] == "dense" or base is None:
                continue
            steps.append([
                s.path.name, r["shape"], r.get("mode", "eager"), _sparsity(r["sparsity"]), r["block"],
                f"{base['ms']:.1f}", f"{r['ms']:.1f}", f"**{_x(base['ms'] / r['ms'])}**",
                f"{_mib(r.get('peak_mem_bytes'))} / {_mib(base.get('peak_mem_bytes'))}",
                _ratio(r.get("mlp_state_bytes"), base.get("mlp_state_bytes")),
            ])  # fmt: skip
    if steps:
        page.add(
            "Whole training steps (forward, backward, optimizer) against the dense step of the same mode and run; "
            "`MLP state` is the MLPs' weights, gradients and optimizer state over dense's.",
            "",
        )
        page.table(["source", "model", "mode", "sparsity", "block", "dense ms", "ms", "speedup",
                    "peak MiB (dense)", "MLP state"], steps)  # fmt: skip

    for s in sources:
        c = s.payload.get("convergence")
        if not c:
            continue
        finals = ", ".join(f"{path} {loss:.4f}" for path, loss in c.get("final_loss_mean_last_20", {}).items())
        difference = c.get("max_abs_step_difference")
        page.add(
            f"Convergence ({s.path.name}): {c.get('model', '')}, {c.get('steps', '?')} steps; mean loss of the last "
            f"20 steps: {finals or '—'}"
            + ("." if difference is None else f"; largest difference at any single step {difference:.4f}."),
            "",
        )
    page.plots(sources)
    page.sources(sources)


# ---------------------------------------------------------------------------------------------- accuracy


def _accuracy_source(page: _Page, s: Source) -> None:
    """One file's metric as a table: a line per method (and block), a column per sparsity, seeds averaged."""
    metric = next(m for m in ACCURACY_METRICS if any(m in r for r in s.rows))
    higher = ACCURACY_METRICS[metric]
    scores: dict[tuple[str, object], dict[float, list[float]]] = {}  # (label, block) -> sparsity -> values
    for r in s.rows:
        if r.get(metric) is None:
            continue
        if not r.get("sparsity"):
            label, block = "dense", None
        else:
            label = str(r.get("method") or s.payload.get("method") or "?")
            if r.get("training") not in (None, "none"):
                label += f" + {r['training']}"
            block = r.get("block")
        scores.setdefault((label, block), {}).setdefault(r.get("sparsity") or 0.0, []).append(float(r[metric]))
    levels = sorted({level for by in scores.values() for level in by})
    # dense lines first, then the block measured at the most sparsities (the grid's main one), then the other
    # blocks; within each, the file's order
    cells: dict[object, int] = {}
    for (_, block), by in scores.items():
        cells[block] = cells.get(block, 0) + len(by)
    # blocks are sizes, or a pattern name such as "2:4": sizes first, in order
    lines = sorted(scores, key=lambda line: (line[1] is not None, -cells[line[1]], not isinstance(line[1], int),
                                             line[1] if isinstance(line[1], int) else str(line[1])))  # fmt: skip
    means = {line: {level: statistics.fmean(v) for level, v in by.items()} for line, by in scores.items()}
    best = {}
    for level in levels:
        column = [by[level] for by in means.values() if level in by]
        if len(column) > 1:
            best[level] = max(column) if higher else min(column)
    seeds = max(len(v) for by in scores.values() for v in by.values())

    def show(value: float, level: float) -> str:
        text = f"{100 * value:.2f}%" if "accuracy" in metric else f"{value:.4f}"
        return f"**{text}**" if best.get(level) == value else text

    page.add(f"### {s.payload.get('model') or s.path.stem}: {s.path.name}", "")
    settings = ", ".join(f"{k} {v}" for k, v in (s.payload.get("experiment") or {}).items())
    page.add(
        f"`{metric}` ({'higher' if higher else 'lower'} is better{f', mean of {seeds} seeds' if seeds > 1 else ''}) "
        "by sparsity; the best of each column in bold." + (f" Settings: {settings}." if settings else ""),
        "",
    )
    page.table(
        ["method", "block", *(_sparsity(level) for level in levels)],
        ([label, "—" if block is None else block,
          *(show(means[label, block][level], level) if level in means[label, block] else "" for level in levels)]
         for label, block in lines),
    )  # fmt: skip
    page.plots([s])


def _accuracy(page: _Page, sources: list[Source]) -> None:
    page.add("## Accuracy after pruning", "")
    for s in sources:
        _accuracy_source(page, s)
    page.sources(sources)


def _quantized(page: _Page, sources: list[Source]) -> None:
    """Quantized tiles against the unquantized sparse model: each file's rows as they are."""
    page.add("## Quantized tiles (int8, fp8)", "")
    for s in sources:
        columns = [c for c in ("model", "weights", "cosine_mean", "val_loss", "relative_change", "loss_vs_sparse_fp32",
                               "layer_error_mean", "ratio") if any(c in r for r in s.rows)]  # fmt: skip
        cell = lambda v: f"{v:.5g}" if isinstance(v, float) else ("" if v is None else str(v))
        page.table(columns, [[cell(r.get(c)) for c in columns] for r in s.rows])
    page.sources(sources)


def _distill(page: _Page, sources: list[Source]) -> None:
    """``sparseblocks distill`` runs (one row each: the held-out metric of the dense model and of the distilled one)
    and the dense runs that trained their teachers (best held-out and training loss)."""
    page.add("## Recovery by distillation", "")
    runs, teachers = [], []
    for s in sources:
        p = s.payload
        if "metric" in p:
            settings = p.get("settings", {})
            ratio = p["after"] / p["before"] if p["before"] else float("nan")
            runs.append([page.link(s.path, s.path.name), p.get("metric"), f"{p['sparsity']:.3f}",
                         settings.get("method", ""), settings.get("allocation", ""), settings.get("permute", ""),
                         "yes" if settings.get("teacher", True) else "no", settings.get("steps", ""),
                         f"{p['before']:.4f}", f"{p['after']:.4f}", f"{ratio:.4f}"])  # fmt: skip
        elif "best" in p:
            best = p["best"]
            teachers.append([page.link(s.path, s.path.name), p.get("model", ""), best["step"],
                             f"{best['heldout_loss']:.4f}", f"{best['train_loss']:.4f}"])  # fmt: skip
    if runs:
        page.add("Held-out metric of the dense model (before) and of the pruned, distilled one (after).", "")
        page.table(["file", "metric", "sparsity", "method", "allocation", "permute", "teacher", "steps", "before",
                    "after", "after / before"], runs)  # fmt: skip
    if teachers:
        page.add("Dense teachers trained for these runs: the best held-out loss and the training loss there.", "")
        page.table(["file", "model", "best step", "held-out loss", "training loss"], teachers)
    page.sources(sources)


# ---------------------------------------------------------------------------------------------- the page

# kind -> its section, sections in page order; several kinds may share a section. A known kind that is not here
# (tune_*, ab, ...) is listed under "Other records".
SECTIONS: dict[str, Callable[[_Page, list[Source]], None]] = {
    "spmm": _spmm,
    "mlp": _mlp,
    "decode": _decode,
    "e2e": _e2e,
    "train": _train,
    "accuracy_tinyshakespeare": _accuracy,
    "accuracy_minilm": _accuracy,
    "accuracy_digits": _accuracy,
    "accuracy_quantized": _quantized,
    "accuracy_distill": _distill,
}


def render(results_dir: str | Path, page_dir: str | Path | None = None) -> str:
    """The report of ``results_dir`` as Markdown, its links relative to ``page_dir`` (default ``results_dir``)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"{results_dir}: no such results folder")
    sources, others = collect(results_dir)
    page = _Page(Path(page_dir) if page_dir is not None else results_dir)
    where = page.rel(results_dir)
    page.add(
        "# sparseblocks: results",
        "",
        "Generated by `sparseblocks report` from the JSON files "
        + ("in the folders beside this page" if where == "." else f"under `{where}/`")
        + ": change those (rerun their commands), not this page. Every ratio is within one file, i.e. one run; "
        "each section ends with its sources (machine, versions, commit, command) and links to the full per-run "
        "tables.",
        "",
    )
    notes = [p for p in others if p.name == "README.md"]
    if notes:
        links = ", ".join(page.link(p, f"{p.parent.name}/README.md") for p in notes)
        page.add(f"How each folder's runs were made: {links}.", "")
    for build in dict.fromkeys(SECTIONS.values()):
        mine = [s for s in sources if s.kind is not None and SECTIONS.get(s.kind) is build]
        if not mine:
            continue
        section = _Page(page.base)
        try:
            build(section, mine)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
            # one malformed file must not hide the rest of the page; the page says what it could not use
            names = ", ".join(page.link(s.path, page.rel(s.path)) for s in mine)
            page.add(f"Could not summarise {names} ({type(error).__name__}: {error}).", "")
        else:
            page.add(*section.lines)
    unread = [s for s in sources if s.kind is None]
    listed = [s for s in sources if s.kind is not None and s.kind not in SECTIONS]
    extra = [p for p in others if p.name != "README.md"]
    if unread or listed or extra:
        page.add("## Other records", "")
        page.add(*(f"- {page.link(s.path, page.rel(s.path))}: **not summarised** ({s.error})" for s in unread))
        page.add(*(f"- {page.link(s.path, page.rel(s.path))}: `{s.kind}`" for s in listed))
        page.add(*(f"- {page.link(p, page.rel(p))}" for p in extra), "")
    return "\n".join(page.lines).rstrip() + "\n"


def write(results_dir: str | Path, out: str | Path) -> Path:
    """Render the report of ``results_dir`` into the file ``out`` (links relative to its folder); return ``out``."""
    out = Path(out)
    text = render(results_dir, out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out
