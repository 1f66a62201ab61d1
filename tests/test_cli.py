import json
import subprocess
import sys

import pytest
import torch

from sparseblocks.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "ops run" in out


def test_demo_trains_converts_checks_saves_and_plots(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from sparseblocks import BlockSparseLinear
    from sparseblocks.recipes.training import load_recipe_model

    assert main(["demo", "--sparsity", "0.8", "--block", "32", "--epochs", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[OK]" in out and "Supermask 80%" in out
    results = json.loads((tmp_path / "demo.json").read_text())
    dense, sparse = results["models"]["dense"], results["models"]["sparse"]
    assert len(dense["epoch_loss"]) == len(sparse["epoch_loss"]) == 1  # (learning: tests/test_recipes.py)
    assert sparse["mlp_bytes"] / dense["mlp_bytes"] < 0.25  # 20% of the tiles, with their indices
    assert results["twin_error"] < 1e-5 and results["reload_error"] < 1e-5
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    model = load_recipe_model(tmp_path / "model")
    assert all(isinstance(block.mlp.fc, BlockSparseLinear) for block in model.blocks)


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "sparseblocks.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout


def test_bad_arguments_exit_with_usage():
    with pytest.raises(SystemExit):
        main(["demo", "--block", "24"])


def test_sparsify_command_fuses_llama_mlps(tmp_path):
    transformers = pytest.importorskip("transformers")
    from sparseblocks import SparseMLP
    from sparseblocks.integrations.huggingface import load_hf_sparse

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=80)  # fmt: skip
    transformers.LlamaModel(config).save_pretrained(tmp_path / "dense")
    out = tmp_path / "sparse"
    assert main(["sparsify", str(tmp_path / "dense"), "--block", "16", "--fuse-mlp", "--out", str(out)]) == 0
    assert sum(isinstance(m, SparseMLP) for m in load_hf_sparse(out).modules()) == 2


def test_sparsify_command_round_trips_a_hugging_face_folder(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from sparseblocks.integrations.huggingface import load_hf_sparse

    config = transformers.BertConfig(
        vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=80
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "dense")
    out = tmp_path / "sparse"
    assert main(["sparsify", str(tmp_path / "dense"), "--sparsity", "0.5", "--block", "16", "--out", str(out)]) == 0
    assert "4 layers replaced" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "sparseblocks"
    assert "sparseblocks sparsify" in (out / "README.md").read_text()  # the model card names the command
    model = load_hf_sparse(out)
    tokens = torch.randint(64, (2, 8))
    with torch.no_grad():
        assert model(tokens).last_hidden_state.shape == (2, 8, 48)


def test_sparsify_keeps_a_causal_lm_head_and_reloads_it_without_naming_the_class(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from sparseblocks.integrations.huggingface import load_hf_sparse

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=80)  # fmt: skip
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(config).eval()
    dense.save_pretrained(tmp_path / "dense")
    out = tmp_path / "sparse"
    assert main(["sparsify", str(tmp_path / "dense"), "--sparsity", "0.5", "--block", "16", "--out", str(out)]) == 0
    assert f"from_pretrained('{out}')" in capsys.readouterr().out
    model = load_hf_sparse(out)
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)  # the head came back, not a fresh init
    tokens = torch.randint(64, (2, 8))
    with torch.no_grad():
        assert model(tokens).logits.shape == (2, 8, 64)


@pytest.mark.parametrize("command", ["sparsify", "prune"])
def test_an_out_that_is_a_file_is_refused_before_any_work(command, tmp_path, capsys, monkeypatch):
    import sparseblocks.integrations.huggingface as huggingface

    def load_pretrained(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(huggingface, "load_pretrained", load_pretrained)
    out = tmp_path / "model.safetensors"
    out.write_text("not a folder")
    with pytest.raises(SystemExit) as refused:
        main([command, str(tmp_path / "model"), "--out", str(out)])
    assert refused.value.code == 2
    error = capsys.readouterr().err
    assert f"sparseblocks {command}: error: --out {out} is a file" in error and "usage:" in error
    assert out.read_text() == "not a folder"


def test_bench_decode_and_mlp_take_their_grid_from_options(monkeypatch):
    """What a GPU run is given, checked without one: the run functions are replaced by a recorder."""
    from sparseblocks.bench import decode, mlp

    calls = {}
    monkeypatch.setattr(decode, "run", lambda *args, **kwargs: calls.setdefault("decode", (args, kwargs)))
    monkeypatch.setattr(mlp, "run", lambda *args, **kwargs: calls.setdefault("mlp", (args, kwargs)))
    assert main(["bench", "decode", "--shapes", "llama_8b_up,llama_8b_mlp", "--tokens", "1", "--sparsities", "0.7,0.9",
                 "--blocks", "64", "--quantize", "int8"]) == 0  # fmt: skip
    args, kwargs = calls["decode"]
    assert args[4:] == (("int8",), ("llama_8b_up", "llama_8b_mlp"))
    assert kwargs == {"tokens": (1,), "sparsities": (0.7, 0.9), "blocks": (64,)}
    assert main(["bench", "mlp", "--shapes", "llama_1b", "--tokens", "8192", "--quantize", "fp8-w8a8"]) == 0
    args, kwargs = calls["mlp"]
    assert args[1] == ("llama_1b",) and args[5] == ("fp8-w8a8",)
    assert kwargs == {"tokens": (8192,), "sparsities": (), "blocks": ()}  # empty: the default grid's
    with pytest.raises(SystemExit, match="unknown decode shapes"):
        main(["bench", "decode", "--shapes", "llama_8b_gate"])
    with pytest.raises(SystemExit, match="bench mlp: could not convert"):
        main(["bench", "mlp", "--sparsities", "ninety"])
