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


def test_decode_table_compares_ours_with_dense_fp8(tmp_path):
    from sparseblocks.bench.decode import _write_table

    case = {"shape": "llama_8b_up", "M": 1, "sparsity": 0.9, "block": 64}
    rows = [
        {**case, "sparsity": 0.0, "block": None, "impl": "dense", "us": 30.0, "floor_us": 25.0},
        {**case, "sparsity": 0.0, "block": None, "impl": "dense_fp8", "us": 20.0, "floor_us": 12.5, "bytes": 500},
        {**case, "impl": "sparseblocks", "us": 6.0, "floor_us": 3.0},
        {**case, "impl": "sparseblocks_int8", "us": 4.0, "floor_us": 1.6, "bytes": 100},
        {**case, "shape": "llama_8b_mlp", "sparsity": 0.0, "block": None, "impl": "dense", "us": 90.0,
         "floor_us": 80.0},
        {**case, "shape": "llama_8b_mlp", "impl": "sparseblocks", "us": 30.0, "floor_us": 9.0},
    ]  # fmt: skip
    table = _write_table(write_result(tmp_path / "decode.json", {**HEAD, "kind": "decode", "rows": rows})).read_text()
    assert ("| torch_bsr | sparseblocks_int8 | dense_fp8 | sparseblocks vs dense_fp8 | sparseblocks_int8 vs dense_fp8 "
            "| floor | of floor |") in table  # fmt: skip
    # dense 30 µs, dense fp8 20 µs (1.50x), ours 6 µs (3.33x over fp8), int8 4 µs (7.50x over dense, 5.00x over fp8)
    assert "| llama_8b_up | 1 | 0.9 | 64 | 30.0 | 6.0 | 5.00x | — | — | 7.50x | 1.50x | 3.33x | 5.00x | 10.00x" in table
    assert "| llama_8b_mlp | 1 | 0.9 | 64 | 90.0 | 30.0 | 3.00x | — | — | — | — | — | — | 10.00x | 30% |" in table
    assert "`dense_fp8` is the dense baseline in fp8" in table


def _mlp_row(impl, ms, sparsity=0.9, block=64, **extra):
    return {"shape": "llama_1b", "M": 8192, "K": 2048, "H": 8192, "dtype": "bf16", "sparsity": sparsity,
            "block": block, "impl": impl, "ms": ms, "floor_ms": 0.1, **extra}  # fmt: skip


def test_mlp_table_shows_quantized_and_dense_fp8_columns_only_when_measured(tmp_path):
    from sparseblocks.bench.mlp import write_table

    rows = [
        _mlp_row("dense", 2.0, 0.0, None),
        _mlp_row("dense_compiled", 1.6, 0.0, None),
        _mlp_row("sparseblocks", 0.4, dispatch="unfused"),
        _mlp_row("sparseblocks_unfused", 0.4),
    ]
    plain = write_table(write_result(tmp_path / "mlp.json", {**HEAD, "kind": "mlp", "rows": rows})).read_text()
    assert ("| shape | M | sparsity | block | dense ms | compiled | torch_bsr | unfused | fused | sparseblocks | "
            "dispatch | floor | of floor |") in plain  # fmt: skip
    assert "| llama_1b | 8192 | 0.9 | 64 | 2.0000 | 1.25x | — | 5.00x | — | **5.00x** | unfused | 20.00x | 25%" in plain
    rows += [_mlp_row("dense_fp8", 1.0, 0.0, None, bytes=10), _mlp_row("sparseblocks_fp8_w8a8", 0.25, bytes=1)]
    quantized = write_table(write_result(tmp_path / "mlp.json", {**HEAD, "kind": "mlp", "rows": rows})).read_text()
    assert ("| sparseblocks | dispatch | sparseblocks_fp8_w8a8 | dense_fp8 | sparseblocks vs dense_fp8 | "
            "sparseblocks_fp8_w8a8 vs dense_fp8 | floor | of floor |") in quantized  # fmt: skip
    # fp8-w8a8 0.25 ms: 8.00x over dense; dense fp8 1.0 ms: 2.00x; ours 2.50x and fp8-w8a8 4.00x over dense fp8
    assert "| **5.00x** | unfused | 8.00x | 2.00x | 2.50x | 4.00x | 20.00x | 25% |" in quantized


def test_e2e_table_shows_quantized_tiles_and_dense_fp8_without_bf16_tiles(tmp_path):
    """A run of ``--impls sparseblocks_int8,dense_fp8`` alone: its rows are in the table, ours in bf16 left blank."""
    from sparseblocks.bench.e2e import write_table

    case = {"model": "m", "metric": "tokens_per_s", "mode": "compiled_graph", "dtype": "bf16", "batch": 1}
    layers = {"before": 1000, "after": 300}
    rows = [
        {**case, "impl": "dense", "sparsity": 0.0, "block": None, "targets": "", "value": 100.0, "ms": 10.0,
         "model_bytes": 2000},
        {**case, "impl": "dense_fp8", "sparsity": 0.0, "block": None, "targets": "all-linear", "value": 125.0,
         "ms": 8.0, "model_bytes": 1100},
        {**case, "impl": "sparseblocks_int8", "sparsity": 0.7, "block": 64, "targets": "all-linear", "value": 200.0,
         "ms": 5.0, "model_bytes": 600, "target_layer_bytes": layers},
    ]  # fmt: skip
    payload = {**HEAD, "kind": "e2e", "model": "m", "rows": rows}
    table = write_table(write_result(tmp_path / "e2e.json", payload)).read_text()
    assert ("| model bytes | targeted layers' bytes | sparseblocks_int8 | dense_fp8 | sparseblocks vs dense_fp8 | "
            "sparseblocks_int8 vs dense_fp8 | sparseblocks_int8 bytes | dense_fp8 bytes |") in table  # fmt: skip
    # int8 5 ms a step, dense 10, dense fp8 8: 2.00x, 1.25x, and int8 1.60x over dense fp8; bytes 600 and 1100 of 2000
    assert ("| tokens_per_s | compiled_graph | bf16 | 1 | all-linear | 0.7 | 64 | 100.0 | — | — | — | — | — | 0.300 | "
            "2.00x | 1.25x | — | 1.60x | 0.300 | 0.550 |") in table  # fmt: skip


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
