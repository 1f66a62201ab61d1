import subprocess
import sys

import pytest
import torch

from sparseblocks.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "ops run" in out


def test_demo_checks_sparse_model_against_masked_dense(capsys):
    assert main(["demo", "--sparsity", "0.8", "--block", "64"]) == 0
    out = capsys.readouterr().out
    assert "[OK]" in out and "12 linears" in out


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "sparseblocks.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout


def test_bad_arguments_exit_with_usage():
    with pytest.raises(SystemExit):
        main(["demo", "--block", "24"])


def test_sparsify_command_fuses_llama_mlps(tmp_path):
    transformers = pytest.importorskip("transformers")
    from sparseblocks import SparseMLP
    from sparseblocks.checkpoint import load_hf_sparse

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=80)  # fmt: skip
    transformers.LlamaModel(config).save_pretrained(tmp_path / "dense")
    out = tmp_path / "sparse"
    assert main(["sparsify", str(tmp_path / "dense"), "--block", "16", "--fuse-mlp", "--out", str(out)]) == 0
    assert sum(isinstance(m, SparseMLP) for m in load_hf_sparse(out).modules()) == 2


def test_sparsify_command_round_trips_a_hugging_face_folder(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from sparseblocks.checkpoint import load_hf_sparse

    config = transformers.BertConfig(
        vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=80
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "dense")
    out = tmp_path / "sparse"
    assert main(["sparsify", str(tmp_path / "dense"), "--sparsity", "0.5", "--block", "16", "--out", str(out)]) == 0
    assert "4 layers replaced" in capsys.readouterr().out
    assert (out / "config.json").exists() and not (out / "model.safetensors").exists()
    model = load_hf_sparse(out)
    tokens = torch.randint(64, (2, 8))
    with torch.no_grad():
        assert model(tokens).last_hidden_state.shape == (2, 8, 48)
