"""``sparseblocks bench e2e --dry-run`` end to end on tiny random-weight models (CPU: the reference ops)."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from transformers import BertConfig, LlamaConfig, ViTConfig  # noqa: E402

from sparseblocks.bench import e2e  # noqa: E402
from sparseblocks.cli import main  # noqa: E402

TINY = {
    "llama": LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=100,
    ),  # fmt: skip
    "vit": ViTConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        num_labels=10,
    ),  # fmt: skip
    "bert": BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100
    ),  # fmt: skip
}


@pytest.mark.parametrize(("kind", "metrics", "targets"), [
    ("llama", {"tokens_per_s", "prefill_ms"}, "mlp"),
    ("vit", {"images_per_s"}, "mlp,mlp+attention"),
    ("bert", {"sentences_per_s"}, "mlp"),
])  # fmt: skip
def test_dry_run_times_every_path_and_writes_tables(tmp_path, kind, metrics, targets):
    TINY[kind].save_pretrained(tmp_path / kind)
    argv = ["bench", "e2e", "--model", str(tmp_path / kind), "--dry-run", "--dtypes", "fp32", "--modes", "eager",
            "--sparsities", "0.75", "--blocks", "16", "--targets", targets, "--fp32-precision", "tf32x3",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    payload = json.loads((tmp_path / "out" / "e2e.json").read_text())
    assert payload["fp32_precision"] == "tf32x3"
    rows = payload["rows"]
    assert all(r["value"] and r["value"] > 0 for r in rows), [r.get("error") for r in rows]
    assert {r["metric"] for r in rows} == metrics
    target_sets = targets.split(",")
    for metric in metrics:
        for impl in ("dense", "torch_bsr", "sparseblocks"):
            found = {(r["batch"], r["targets"]) for r in rows if (r["metric"], r["impl"]) == (metric, impl)}
            batches = {1} if metric == "prefill_ms" else {1, 2}
            expected = {(b, "") for b in batches} if impl == "dense" else {(b, t) for b in batches for t in target_sets}
            assert found == expected, (metric, impl)
    sparse = next(r for r in rows if r["impl"] == "sparseblocks")
    dense = next(r for r in rows if r["impl"] == "dense")
    # 25% of the targeted tiles kept (plus indices): the targeted layers shrink about 4x, the model less
    assert 0.24 < sparse["target_layer_bytes"]["after"] / sparse["target_layer_bytes"]["before"] < 0.3
    assert sparse["model_bytes"] < dense["model_bytes"]
    table = (tmp_path / "out" / "e2e.md").read_text()
    assert table.count("| eager | fp32 |") == len([r for r in rows if r["impl"] == "sparseblocks"])
    assert (tmp_path / "out" / "e2e.png").stat().st_size > 0


def test_unknown_model_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="vit_b_16, llama-3.2-1b"):
        main(["bench", "e2e", "--model", str(tmp_path / "missing"), "--dry-run"])


def test_compiled_prefill_of_a_sparse_model(tmp_path):
    """A grid with a compiled mode also times the prefill through torch.compile (Inductor, for real: the fused
    MLP's custom op inside the graph)."""
    grid = e2e.Grid(**{**e2e.DEFAULT_GRIDS["causal_lm"].__dict__, **e2e.DRY_RUN, "modes": ("compiled_graph",)})
    assert e2e.prefill_modes(grid) == ["eager", "compiled"]
    TINY["llama"].save_pretrained(tmp_path / "llama")
    dense, _ = e2e.build_model(str(tmp_path / "llama"), torch.float32, torch.device("cpu"))
    model = e2e.sparse_models(dense, 0.75, 16, "mlp")[0]["sparseblocks"]
    with torch.no_grad():
        row = e2e.prefill_measurement(model, grid, repeats=2, mode="compiled")
    assert (row["metric"], row["mode"], row["tokens"]) == ("prefill_ms", "compiled", grid.prefill_tokens)
    assert row["value"] > 0
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--sparsities", "1.5"], "sparsities must lie"),
        (["--blocks", "24"], "block_size"),
        (["--batches", "0"], "batches must be"),
        (["--prefill-tokens", "-1"], "prefill_tokens must be"),
    ],
)
def test_impossible_settings_are_refused_before_anything_runs(arguments, message):
    with pytest.raises(SystemExit, match=message):
        main(["bench", "e2e", "--dry-run", "--model", "vit_b_16", *arguments])


def test_a_decode_only_run_times_no_prefill(monkeypatch):
    calls = []
    monkeypatch.setattr(e2e, "run", lambda model, grid, *rest: calls.append(grid))
    main(["bench", "e2e", "--model", "llama-3.1-8b", "--prefill-tokens", "0", "--modes", "compiled_graph"])
    assert calls[0].prefill_tokens == 0 and calls[0].modes == ("compiled_graph",)
    assert e2e.prefill_modes(calls[0]) == []
    assert e2e.prefill_modes(e2e.Grid(**{**calls[0].__dict__, "prefill_tokens": 16})) == ["eager", "compiled"]


def test_dry_run_times_ours_on_quantized_tiles_and_dense_fp8(tmp_path):
    """``--impls ...,sparseblocks_int8,sparseblocks_fp8,dense_fp8``: ours with the same tiles quantized, fewer bytes;
    and the dense model with the same targeted linears in fp8, once per target set, in the table beside them."""
    TINY["llama"].save_pretrained(tmp_path / "llama")
    argv = ["bench", "e2e", "--model", str(tmp_path / "llama"), "--dry-run", "--dtypes", "bf16", "--modes", "eager",
            "--sparsities", "0.75", "--blocks", "16", "--targets", "mlp", "--batches", "1",
            "--impls", "sparseblocks,sparseblocks_int8,sparseblocks_fp8,dense_fp8",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads((tmp_path / "out" / "e2e.json").read_text())["rows"]
    assert all(r["value"] and r["value"] > 0 for r in rows), [r.get("error") for r in rows]
    decode = {r["impl"]: r for r in rows if (r["metric"], r["batch"]) == ("tokens_per_s", 1)}
    bytes_of = {impl: r["model_bytes"] for impl, r in decode.items()}
    assert (
        bytes_of["sparseblocks_int8"] < bytes_of["sparseblocks"]
        and bytes_of["sparseblocks_fp8"] < bytes_of["sparseblocks"]
    )
    # the MLPs' weights in one byte instead of two, all of them kept
    assert bytes_of["sparseblocks_fp8"] < bytes_of["dense_fp8"] < bytes_of["dense"]
    fp8 = decode["dense_fp8"]
    assert (fp8["targets"], fp8["sparsity"], fp8["block"]) == ("mlp", 0.0, None)
    impls = [r["impl"] for r in rows]
    assert impls.count("dense_fp8") == impls.count("dense")  # once per target set, not per sparsity and block
    table = (tmp_path / "out" / "e2e.md").read_text()
    assert "| sparseblocks_int8 | sparseblocks_fp8 | dense_fp8 | sparseblocks vs dense_fp8 |" in table
    dense, ours = decode["dense"], decode["sparseblocks_int8"]
    cells = f"| {dense['ms'] / fp8['ms']:.2f}x | {fp8['ms'] / decode['sparseblocks']['ms']:.2f}x |"
    assert cells in next(line for line in table.splitlines() if line.startswith("| tokens_per_s"))
    assert f"| {ours['model_bytes'] / dense['model_bytes']:.3f} |" in table
