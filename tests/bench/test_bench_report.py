"""The report side of the benchmarks runs on stored rows, so it is tested on the CPU."""

import json

import pytest
import torch

from sparseblocks.bench.plots import speedups, spmm_report, spmm_table
from sparseblocks.bench.results import ResultError, markdown_table, new_result, read_result, write_result

HEAD = {"schema": 1, "env": {"gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "commit": "abc", "command": "x"}}


def _row(impl, ms, sparsity=0.9, block=64, m=50432, floor=0.1, mask="random"):
    dense = impl == "dense"
    return {
        "shape": "vit_b_fc1", "M": m, "K": 768, "N": 3072, "dtype": "bf16",
        "sparsity": 0.0 if dense else sparsity, "block": None if dense else block,
        "mask": None if dense else mask, "impl": impl, "ms": ms, "floor_ms": floor,
    }  # fmt: skip


ROWS = [
    _row("dense", 0.4, floor=0.3),
    _row("sparseblocks", 0.1),
    _row("torch_bsr", 0.5),
    _row("sparseblocks", 0.2, sparsity=0.5, block=128),
    _row("torch_bsr", None, sparsity=0.5, block=128),
    _row("sparseblocks", 0.2, mask="skewed"),
    _row("torch_2_4", 0.25, sparsity=0.5, block=None, mask="2:4"),
    _row("dense", 0.1, m=3152, floor=0.05),
    _row("sparseblocks", 0.05, m=3152),
]


def test_speedups_are_ratios_to_the_same_runs_dense_row():
    table = {(r["impl"], r["sparsity"], r["M"], r["mask"]): r for r in speedups(ROWS)}
    assert table[("sparseblocks", 0.9, 50432, "random")]["speedup"] == pytest.approx(4.0)
    assert table[("torch_bsr", 0.9, 50432, "random")]["speedup"] == pytest.approx(0.8)
    assert table[("torch_bsr", 0.5, 50432, "random")]["speedup"] is None
    assert table[("sparseblocks", 0.9, 3152, "random")]["speedup"] == pytest.approx(2.0)
    assert table[("sparseblocks", 0.9, 50432, "random")]["floor_speedup"] == pytest.approx(4.0)


def test_the_writer_refuses_what_is_not_a_schema_1_result(tmp_path):
    good = {**HEAD, "kind": "spmm", "rows": []}
    assert read_result(write_result(tmp_path / "a" / "good.json", good)) == good
    bad = {
        "schema 1": ({**good, "schema": 2}, "schema 2, not 1"),
        "kind": ({**good, "kind": "spmm_old"}, "unknown kind 'spmm_old'; known: spmm, mlp"),
        "env": ({**good, "env": {"gpu": "x", "torch": "2"}}, "env lacks triton, commit, command"),
        "rows": ({**good, "rows": {}}, "rows is not a list"),
    }
    for payload, message in bad.values():
        with pytest.raises(ResultError, match=message):
            write_result(tmp_path / "bad.json", payload)
    assert not (tmp_path / "bad.json").exists()
    with pytest.raises(ResultError, match="unknown result kind"):
        new_result("nope", "c")
    fresh = new_result("e2e", "sparseblocks bench e2e", model="m")
    assert list(fresh)[:3] == ["schema", "kind", "env"] and fresh["model"] == "m" and fresh["rows"] == []
    assert fresh["env"]["command"] == "sparseblocks bench e2e" and fresh["env"]["torch"] == torch.__version__


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, "x|y"], [None, "two\nlines"]]) == [
        "| a | b |", "|---|---|", "| 1 | x\\|y |", "| None | two lines |"]  # fmt: skip


def test_table_and_plots_render(tmp_path):
    payload = {**HEAD, "kind": "spmm", "rows": ROWS}
    path = write_result(tmp_path / "spmm.json", payload)
    written = spmm_report(path)
    assert {p.name for p in written} == {"spmm.md", "spmm_heatmap.png", "spmm_batch.png"}
    table = spmm_table(ROWS)
    assert "| vit_b_fc1 | 50432 | bf16 | 0.9 | 64 | random | 4.00x | 0.80x |  | 4.00x |" in table
    assert "| vit_b_fc1 | 50432 | bf16 | 0.5 | None | 2:4 |  |  | 1.60x | 4.00x |" in table
    assert "| — |" in table
    assert "tf32x3" not in (tmp_path / "spmm.md").read_text()
    path.write_text(json.dumps({**payload, "fp32_precision": "tf32x3"}))
    spmm_report(path)
    assert "Our fp32 rows multiply tiles in `tf32x3`" in (tmp_path / "spmm.md").read_text()


def _train_row(case, impl, ms, sparsity=0.9, block=64, **extra):
    return {"case": case, "shape": "vit_b", "M": 50432, "dtype": "bf16", "sparsity": sparsity, "block": block,
            "impl": impl, "ms": ms, "peak_mem_bytes": 2**30, **extra}  # fmt: skip


def test_train_report_renders_tables_and_plots(tmp_path):
    from sparseblocks.bench.plots import train_report, train_tables

    rows = [
        _train_row("mlp", "dense", 3.0, sparsity=0.0, block=None),
        _train_row("mlp", "sparseblocks", 1.0),
        _train_row("mlp", "stk", None, block=128, error="unsupported"),
        _train_row("train_step", "dense", 200.0, sparsity=0.0, block=None, mlp_state_bytes=1000),
        _train_row("train_step", "sparseblocks", 160.0, mlp_state_bytes=110),
        _train_row("train_step", "dense", 90.0, shape="llama", sparsity=0.0, block=None, mlp_state_bytes=900),
        _train_row("train_step", "sparseblocks", 60.0, shape="llama", mlp_state_bytes=100),
    ]
    convergence = {
        "model": "gpt",
        "steps": 3,
        "losses": {"triton": [4.0, 3.0, 2.5], "reference": [4.0, 3.1, 2.5]},
        "final_loss_mean_last_20": {"triton": 3.17, "reference": 3.2},
        "max_abs_step_difference": 0.1,
    }
    payload = {**HEAD, "kind": "train", "rows": rows, "convergence": convergence}
    path = write_result(tmp_path / "train.json", payload)
    assert {p.name for p in train_report(path)} == {"train.md", "train_speedup.png", "train_convergence.png"}
    tables = train_tables(payload)
    assert "| mlp | vit_b | 0.9 | 64 | sparseblocks | 1.000 | 3.00x | 1024 |" in tables
    assert "| eager | 0.9 | 64 | 160.0 | 1.25x | 1024 | 0.0 | 0.110x |" in tables
    assert "| llama | eager | 0.9 | 64 | 60.0 | 1.50x |" in tables  # against its own model's dense step
    assert "largest difference at any single step: 0.1000" in tables


def test_decode_table_renders(tmp_path):
    from sparseblocks.bench.decode import _write_table

    rows = [
        {"shape": "llama_8b_up", "M": 1, "sparsity": 0.0, "block": None, "impl": "dense", "us": 30.0, "floor_us": 25.0},
        {"shape": "llama_8b_up", "M": 1, "sparsity": 0.9, "block": 64, "impl": "sparseblocks", "us": 6.0,
         "floor_us": 3.0},
        {"shape": "llama_8b_up", "M": 1, "sparsity": 0.9, "block": 64, "impl": "torch_bsr", "us": 24.0,
         "floor_us": 3.0},
        {"shape": "llama_8b_up", "M": 1, "sparsity": 0.9, "block": 64, "impl": "sparseblocks_rows", "us": 15.0,
         "floor_us": 3.0},
        {"shape": "llama_8b_mlp", "M": 1, "sparsity": 0.0, "block": None, "impl": "dense", "us": 90.0,
         "floor_us": 80.0},
        {"shape": "llama_8b_mlp", "M": 1, "sparsity": 0.9, "block": 64, "impl": "sparseblocks", "us": 30.0,
         "floor_us": 9.0},
    ]  # fmt: skip
    path = write_result(tmp_path / "decode.json", {**HEAD, "kind": "decode", "rows": rows})
    table = _write_table(path).read_text()
    assert "| llama_8b_up | 1 | 0.9 | 64 | 30.0 | 6.0 | 5.00x | 2.00x | 1.25x | 10.00x | 50% |" in table
    assert "| llama_8b_mlp | 1 | 0.9 | 64 | 90.0 | 30.0 | 3.00x | — | — | 10.00x | 30% |" in table
    quantized = {"shape": "llama_8b_up", "M": 1, "sparsity": 0.9, "block": 64, "impl": "sparseblocks_int8", "us": 4.0,
                 "floor_us": 1.6, "bytes": 1000}  # fmt: skip
    path = write_result(tmp_path / "decode.json", {**HEAD, "kind": "decode", "rows": [*rows, quantized]})
    table = _write_table(path).read_text()
    assert "| sparseblocks_int8 | floor |" in table  # a column of its own
    assert "| llama_8b_up | 1 | 0.9 | 64 | 30.0 | 6.0 | 5.00x | 2.00x | 1.25x | 7.50x | 10.00x | 50% |" in table


def test_spmm_floor_reads_only_the_columns_some_tile_multiplies():
    """Bytes of the floor: the X columns that stored tiles use, Y, and the weight with its index."""
    from sparseblocks import BlockSparseMatrix
    from sparseblocks.bench.harness import Ceilings
    from sparseblocks.bench.spmm import Case, _floor_ms

    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 1] = mask[1, 1] = mask[1, 3] = True  # block columns 1 and 3 of 4: half of X is read
    w = BlockSparseMatrix.from_dense(torch.randn(32, 64), 16, mask=mask).to(dtype=torch.bfloat16)
    case = Case("toy", 1000, 64, 32, "bf16", 0.625, 16)
    ceilings = Ceilings(copy_bytes_per_s=1e9, bf16_flops=1e30, fp32_flops=1e30, tf32_flops=1e30)
    expected_bytes = 2 * 1000 * (32 + 32) + w.nbytes
    assert _floor_ms(ceilings, case, torch.bfloat16, w) == pytest.approx(1e3 * expected_bytes / 1e9)
    # K = 56: the last block column is 8 wide
    w = BlockSparseMatrix.from_dense(torch.randn(32, 56), 16, mask=mask).to(dtype=torch.bfloat16)
    case = Case("toy", 1000, 56, 32, "bf16", 0.625, 16)
    expected_bytes = 2 * 1000 * (16 + 8 + 32) + w.nbytes
    assert _floor_ms(ceilings, case, torch.bfloat16, w) == pytest.approx(1e3 * expected_bytes / 1e9)


def test_spmm_floor_of_tf32x3_is_three_tf32_products():
    """fp32 through three TF32 products: the arithmetic floor is 3x the FLOPs at the TF32 rate."""
    from sparseblocks import BlockSparseMatrix
    from sparseblocks.bench.harness import Ceilings
    from sparseblocks.bench.spmm import Case, _floor_ms

    w = BlockSparseMatrix.from_dense(torch.randn(32, 64), 16, mask=torch.ones(2, 4, dtype=torch.bool))
    case = Case("toy", 1000, 64, 32, "fp32", 0.0, 16)
    ceilings = Ceilings(copy_bytes_per_s=1e30, bf16_flops=1e12, fp32_flops=1e12, tf32_flops=6e12)
    flops = 2 * 1000 * 64 * 32
    assert _floor_ms(ceilings, case, torch.float32, w) == pytest.approx(1e3 * flops / 1e12)
    assert _floor_ms(ceilings, case, torch.float32, w, "tf32x3") == pytest.approx(1e3 * 3 * flops / 6e12)
