"""``sparseblocks report``: the page made from small synthetic result files, and from the real results folder."""

import json
from pathlib import Path

import pytest

from sparseblocks.bench.report import SECTIONS, collect, higher_is_better, render, write
from sparseblocks.bench.results import ENV_KEYS, KINDS, check
from sparseblocks.cli import main

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
ENV = {"gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "commit": "abc1234"}


def _result(kind, command, rows, env=ENV, **header):
    return {"schema": 1, "kind": kind, "env": {**env, "command": command}, **header, "rows": rows}


def _spmm(impl, ms, sparsity=0.9, block=64, m=50432, mask="random", floor=0.1):
    dense = impl == "dense"
    return {"shape": "vit_b_fc1", "M": m, "K": 768, "N": 3072, "dtype": "bf16", "sparsity": 0.0 if dense else sparsity,
            "block": None if dense else block, "mask": None if dense else mask, "impl": impl, "ms": ms,
            "floor_ms": floor}  # fmt: skip


def _mlp(impl, ms, block=64, **extra):
    dense = impl.startswith("dense")
    return {"shape": "llama_1b", "M": 8192, "K": 2048, "H": 8192, "dtype": "bf16", "sparsity": 0.0 if dense else 0.9,
            "block": None if dense else block, "impl": impl, "ms": ms, "floor_ms": 0.25, **extra}  # fmt: skip


def _decode(impl, us, m=1, sparsity=0.9, block=64):
    dense = impl == "dense"
    return {"shape": "llama_8b_up", "M": m, "K": 4096, "N": 14336, "dtype": "bf16",
            "sparsity": 0.0 if dense else sparsity, "block": None if dense else block, "impl": impl, "us": us,
            "floor_us": 1.0}  # fmt: skip


def _e2e(impl, metric, value, batch=1, block=64, sparsity=0.9, **extra):
    dense = impl == "dense"
    return {"model": "llama-3.2-1b", "mode": "cuda_graph", "dtype": "bf16", "batch": batch,
            "sparsity": 0.0 if dense else sparsity, "block": None if dense else block,
            "targets": "" if dense else "mlp", "impl": impl, "metric": metric, "value": value,
            "model_bytes": 1000 if dense else 600 + block,
            "peak_mem_bytes": 2**30 if dense else 2**29, **extra}  # fmt: skip


def _train(case, impl, ms, sparsity=0.9, block=64, **extra):
    return {"case": case, "shape": "vit_b", "M": 50432, "dtype": "bf16", "sparsity": sparsity, "block": block,
            "impl": impl, "ms": ms, "peak_mem_bytes": 2**30, **extra}  # fmt: skip


FILES = {
    "h200/spmm.json": _result("spmm", "sparseblocks bench spmm", [
        _spmm("dense", 0.4), _spmm("sparseblocks", 0.1), _spmm("sparseblocks", 0.2, block=32),
        _spmm("sparseblocks", 0.05, mask="skewed"), _spmm("torch_bsr", 0.5), _spmm("torch_bsr", None, block=32),
        _spmm("sparseblocks", 0.4, sparsity=0.5), _spmm("sparseblocks", 0.5, sparsity=0.5, block=32),
    ]),
    "h200/spmm_batch.json": _result("spmm", "sparseblocks bench spmm --name spmm_batch", [
        _spmm("dense", 0.1, m=3152), _spmm("sparseblocks", 0.08, m=3152),
    ]),
    "h200/mlp.json": _result("mlp", "sparseblocks bench mlp", [
        _mlp("dense", 1.2), _mlp("dense_compiled", 1.5),
        _mlp("torch_bsr", 0.6), _mlp("sparseblocks_unfused", 0.4), _mlp("sparseblocks_fused", 0.8),
        _mlp("sparseblocks", 0.4, dispatch="unfused"),
        _mlp("torch_bsr", 0.6, block=128), _mlp("sparseblocks_unfused", 0.5, block=128),
        _mlp("sparseblocks", 0.5, block=128, dispatch="unfused"),
    ]),
    "h200/decode.json": _result("decode", "sparseblocks bench decode", [
        _decode("dense", 10.0), _decode("sparseblocks", 5.0), _decode("sparseblocks", 4.0, block=128),
        _decode("sparseblocks", 8.0, sparsity=0.5), _decode("dense", 12.0, m=16), _decode("sparseblocks", 6.0, m=16),
        _decode("sparseblocks_rows", 2.0),
    ]),
    "h200/e2e.json": _result("e2e", "sparseblocks bench e2e", [
        _e2e("dense", "tokens_per_s", 100.0), _e2e("dense", "tokens_per_s", 400.0, batch=8),
        _e2e("sparseblocks", "tokens_per_s", 150.0), _e2e("sparseblocks", "tokens_per_s", 120.0, block=32),
        _e2e("sparseblocks", "tokens_per_s", 600.0, batch=8), _e2e("torch_bsr", "tokens_per_s", 200.0, batch=8),
        _e2e("sparseblocks", "tokens_per_s", 900.0, batch=8, sparsity=0.95),
        _e2e("sparseblocks", None, None, batch=8, block=32, error="RuntimeError: no"),
        _e2e("dense", "prefill_ms", 10.0), _e2e("sparseblocks", "prefill_ms", 8.0),
    ]),
    "h200/train.json": _result("train", "sparseblocks bench train", [
        _train("linear", "dense", 2.0, sparsity=0.0, block=None), _train("linear", "sparseblocks", 1.0),
        _train("linear", "stk", 1.6, block=128), _train("linear", "sparseblocks", 0.5, sparsity=0.95),
        _train("train_step", "dense", 30.0, sparsity=0.0, block=None, mode="eager", mlp_state_bytes=1000),
        _train("train_step", "sparseblocks", 40.0, mode="eager", mlp_state_bytes=101),
        _train("train_step", "dense", 25.0, sparsity=0.0, block=None, mode="cuda_graph", mlp_state_bytes=1000),
        _train("train_step", "sparseblocks", 20.0, mode="cuda_graph", mlp_state_bytes=101),
    ]),
    "h200/train_convergence.json": _result("train", "sparseblocks bench train --sections convergence", [],
                                           convergence={"model": "gpt 2x64", "steps": 30,
                                                        "max_abs_step_difference": 0.01,
                                                        "final_loss_mean_last_20": {"triton": 2.5, "reference": 2.51}}),
    "accuracy/digits.json": _result("accuracy_digits", "python d.py", [
        {"method": "dense", "sparsity": 0.0, "block": None, "seed": 0, "test_accuracy": 0.95},
        {"method": "supermask", "sparsity": 0.9, "block": 16, "seed": 0, "test_accuracy": 0.96},
        {"method": "supermask", "sparsity": 0.9, "block": 16, "seed": 1, "test_accuracy": 0.98},
    ], env={"gpu": None, "torch": "2.13.0", "triton": None, "commit": None}, model="ViT 4x128", device="cpu"),
    "accuracy/shakespeare.json": _result("accuracy_tinyshakespeare", "python s.py", [
        {"method": "dense", "sparsity": 0.0, "block": None, "val_loss": 1.5},
        {"method": "magnitude", "sparsity": 0.9, "block": 32, "val_loss": 1.54},
        {"method": "fisher", "sparsity": 0.9, "block": 32, "val_loss": 1.47},
        {"method": "magnitude", "sparsity": 0.5, "block": 32, "val_loss": 1.47},
        {"method": "fisher", "sparsity": 0.9, "block": 64, "val_loss": 1.48},
    ], env={"gpu": "NVIDIA H200", "torch": None, "triton": None, "commit": None}, experiment={"steps": 3000}),
}  # fmt: skip


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    for name, payload in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(payload))
    for name in ("h200/spmm.md", "h200/spmm_heatmap.png", "h200/spmm_batch_heatmap.png", "h200/train_speedup.png",
                 "h200/README.md", "h200/tune.txt", "accuracy/shakespeare.png"):  # fmt: skip
        (root / name).write_text("x")
    return root


def test_speed_sections_give_ratios_to_the_same_runs_dense_row(results):
    page = render(results)
    # b32 0.2 ms, b64 0.1 ms against dense 0.4 ms; the skewed mask and the 50% rows stay out; floor 0.4 / 0.1 ms
    assert "| spmm.json | bf16 | vit_b_fc1 | 50432 | 2.00x | 4.00x | 0.80x b64 | 4.00x |" in page
    assert "| spmm_batch.json | bf16 | vit_b_fc1 | 3152 |  | 1.25x |  | 1.00x |" in page
    assert "| spmm.json | bf16 | vit_b_fc1 | 50432 | 1.00x b64 | 4.00x b64 |" in page  # best block by sparsity
    # the best block (64, 0.4 ms against 1.2) with the other paths at that block; floor 0.25 of 0.4 ms
    line = "| mlp.json | llama_1b | 8192 | 1.2000 | 0.80x | 2.00x | 3.00x | 1.50x | **3.00x** | unfused | 64 | 62% |"
    assert line in page
    assert "| decode.json | bf16 | llama_8b_up | 2.50x b128 | 2.00x b64 | 25% |" in page
    assert "| decode.json | bf16 | llama_8b_up | 1 | 1.25x b64 | 2.50x b128 |" in page
    # a throughput's ratio, a time's inverse; BSR, bytes and memory at the largest batch's best block
    case = "| e2e.json | llama-3.2-1b | {} | cuda_graph | bf16 | mlp | 90% | "
    assert case.format("tokens_per_s") + "1.50x b64 | 1.50x b64 | 0.50x | 0.664x | 0.50x |" in page
    assert case.format("prefill_ms") + "1.25x b64 |  | — | 0.664x | 0.50x |" in page
    for heading in ("## One layer", "## Whole MLPs", "## Decode", "## Whole models", "## Training", "## Accuracy"):
        assert heading in page


def test_training_and_accuracy_sections(results):
    page = render(results)
    assert "| train.json | linear | vit_b | 50432 | 2.00x | 1.25x b128 | 1.00x |" in page
    assert "| train.json | vit_b | eager | 90% | 64 | 30.0 | 40.0 | **0.75x** | 1,024 / 1,024 | 0.101x |" in page
    assert "| train.json | vit_b | cuda_graph | 90% | 64 | 25.0 | 20.0 | **1.25x** |" in page
    assert "mean loss of the last 20 steps: triton 2.5000, reference 2.5100; largest difference" in page
    assert "mean of 2 seeds" in page and "| supermask | 16 |  | 97.00% |" in page
    assert "| dense | — | 95.00% |  |" in page
    # lower loss is better: fisher's 1.47 is the best of the 90% column; the main block (32) before the others
    assert "| fisher | 32 |  |  | **1.4700** |" in page and "| magnitude | 32 |  | 1.4700 | 1.5400 |" in page
    assert page.index("| fisher | 32 |") < page.index("| fisher | 64 |")


def test_links_sources_and_other_records(results):
    page = render(results)
    assert "![spmm_heatmap](h200/spmm_heatmap.png)" in page and "![shakespeare](accuracy/shakespeare.png)" in page
    # a plot belongs to the longest JSON stem that starts its name
    assert page.index("![spmm_batch_heatmap]") < page.index("## Whole MLPs")
    spmm, batch = (s for s in collect(results)[0] if s.path.stem in ("spmm", "spmm_batch"))
    assert [p.name for p in spmm.plots] == ["spmm_heatmap.png"]
    assert [p.name for p in batch.plots] == ["spmm_batch_heatmap.png"]
    assert ("| [spmm.json](h200/spmm.json) | NVIDIA H200 | torch 2.11.0, triton 3.6.0 | abc1234 | "
            "`sparseblocks bench spmm` | [spmm.md](h200/spmm.md) |") in page  # fmt: skip
    assert "[h200/README.md](h200/README.md)" in page and "- [h200/tune.txt](h200/tune.txt)" in page


def test_sections_without_files_are_left_out(results):
    for name in ("h200/mlp.json", "h200/e2e.json"):
        (results / name).unlink()
    page = render(results)
    assert "## Whole MLPs" not in page and "## Whole models" not in page and "## Decode" in page


def test_an_mlp_run_without_floors_gets_a_dash_there(results):
    rows = [{k: v for k, v in r.items() if k != "floor_ms"} for r in FILES["h200/mlp.json"]["rows"]]
    (results / "h200" / "gated.json").write_text(json.dumps(_result("mlp", "python gated_mlp.py", rows)))
    line = "| gated.json | llama_1b | 8192 | 1.2000 | 0.80x | 2.00x | 3.00x | 1.50x | **3.00x** | unfused | 64 | — |"
    assert line in render(results)


def test_a_broken_file_is_named_and_the_rest_still_rendered(results):
    (results / "h200" / "broken.json").write_text("{not json")
    (results / "h200" / "old.json").write_text(json.dumps({**ENV, "command": "c", "rows": [{"x": 1}]}))
    (results / "h200" / "other.json").write_text(json.dumps(_result("spmm_v2", "c", [{"x": 1}])))
    (results / "h200" / "bare.json").write_text(json.dumps({"schema": 1, "kind": "spmm", "env": {"gpu": "x"},
                                                            "rows": []}))  # fmt: skip
    rows = FILES["h200/decode.json"]["rows"]
    (results / "h200" / "decode.json").write_text(json.dumps(_result("decode", "c", [
        {k: v for k, v in r.items() if k != "impl"} for r in rows])))  # fmt: skip
    page = render(results)
    assert "[h200/broken.json](h200/broken.json): **not summarised** (JSONDecodeError" in page
    assert "[h200/old.json](h200/old.json): **not summarised** (ResultError: schema None, not 1)" in page
    flagged = "[h200/{}.json](h200/{}.json): **not summarised** (ResultError: {}"
    assert flagged.format("other", "other", "unknown kind 'spmm_v2'; known: spmm, mlp") in page
    assert flagged.format("bare", "bare", "env lacks torch, triton, commit, command") in page
    assert "Could not summarise [h200/decode.json](h200/decode.json) (KeyError: 'impl')" in page
    assert "## Decode" not in page and "## Whole MLPs" in page and "## Accuracy" in page


def test_the_kind_picks_the_section_not_the_rows(results):
    """Rows of an MLP run under kind decode go to the decode section (its sources), not the MLP one; a known kind
    without a section is listed by its kind."""
    (results / "h200" / "mlp.json").write_text(json.dumps({**FILES["h200/mlp.json"], "kind": "decode"}))
    (results / "h200" / "tune_spmm.json").write_text(json.dumps(_result("tune_spmm", "python tune/spmm.py", [])))
    page = render(results)
    assert "## Whole MLPs" not in page
    assert page.index("| [mlp.json](h200/mlp.json) |") > page.index("## Decode")
    assert "- [h200/tune_spmm.json](h200/tune_spmm.json): `tune_spmm`" in page
    assert set(SECTIONS) <= set(KINDS)


def test_higher_is_better():
    assert higher_is_better("tokens_per_s") and not higher_is_better("ms") and not higher_is_better("latency_ms")


def test_command_writes_the_page_with_links_relative_to_it(results, tmp_path, capsys):
    out = tmp_path / "docs" / "REPORT.md"
    assert main(["report", "--results", str(results), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert "[spmm.md](../results/h200/spmm.md)" in out.read_text()
    assert main(["report", "--results", str(results)]) == 0
    assert (results / "REPORT.md").read_text() == render(results)
    with pytest.raises(SystemExit, match="no such results folder"):
        main(["report", "--results", str(tmp_path / "missing")])


def test_every_committed_result_has_the_schema():
    """Every JSON under benchmarks/results: schema 1, a known kind, every env key (null where not recorded)."""
    paths = sorted(RESULTS.rglob("*.json"))
    assert len(paths) > 50
    for path in paths:
        payload = check(json.loads(path.read_text()))  # raises, naming what is wrong
        assert payload["kind"] in KINDS and all(key in payload["env"] for key in ENV_KEYS), path


def test_the_real_results_folder_renders_every_file(tmp_path):
    page = write(RESULTS, tmp_path / "REPORT.md").read_text()
    sources, _ = collect(RESULTS)
    assert sources and all(s.kind is not None for s in sources), [s.path.name for s in sources if s.kind is None]
    assert "Could not summarise" not in page and "not summarised" not in page
    for s in sources:
        assert f"[{s.path.name}](" in page
    assert "## One layer" in page and "## Training" in page and "## Accuracy after pruning" in page
