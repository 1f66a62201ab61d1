"""``sparseblocks prune`` on tiny random-weight Hugging Face folders: a BERT encoder and a BERT masked LM with a tiny
word-level tokenizer, a Llama causal LM without one (random-id calibration); every method, saved and reloaded."""

import contextlib
import json
import random

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

from sparseblocks import SemiStructuredLinear  # noqa: E402
from sparseblocks.cli import build_parser, main  # noqa: E402
from sparseblocks.integrations.huggingface import (  # noqa: E402
    PRUNE_METHODS,
    auto_class,
    calibration_tokens,
    load_hf_sparse,
    load_pretrained,
    prune_pretrained,
    save_hf_sparse,
)
from sparseblocks.integrations.sparsify import SparsityConfig, sparse_layers, sparsify  # noqa: E402
from sparseblocks.masks import expand_block_mask  # noqa: E402

WORDS = ("the king and queen of a castle were in their hall when he spoke to his men at night for she had come "
         "from far away with gold on her hands but no one knew why it was so").split()  # fmt: skip
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ARGS = ["--sparsity", "0.5", "--block", "16", "--samples", "6", "--seq-len", "16"]
SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}


def _text(words: int = 600) -> str:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(words // 12)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def folders(tmp_path_factory, one_thread):
    """Model folders by name, and the calibration text file."""
    root = tmp_path_factory.mktemp("models")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(SPECIALS + sorted(set(WORDS)) + ["."]) + "\n")
    tokenizer = transformers.BertTokenizer(vocab=str(vocab))
    bert = transformers.BertConfig(vocab_size=len(tokenizer), max_position_embeddings=32, **SIZES)
    llama = transformers.LlamaConfig(vocab_size=97, num_key_value_heads=1, **SIZES)
    torch.manual_seed(0)
    built = {
        "bert": transformers.BertModel(bert),  # a bare encoder, as sentence-transformers ships
        "bert_mlm": transformers.BertForMaskedLM(bert),
        "llama": transformers.LlamaForCausalLM(llama),
    }
    for name, model in built.items():
        model.save_pretrained(root / name)
        if name.startswith("bert"):
            tokenizer.save_pretrained(root / name)
    (root / "calibration.txt").write_text(_text())
    return {name: root / name for name in built} | {"calibration": root / "calibration.txt"}


CASES = [(arch, method) for arch in ("bert", "llama") for method in PRUNE_METHODS] + [("bert_mlm", "fisher")]


@pytest.fixture(scope="module")
def pruned(folders, tmp_path_factory):
    """Each case's output folder, made through the command line."""
    out = tmp_path_factory.mktemp("pruned")
    done = {}
    for arch, method in CASES:
        done[arch, method] = out / f"{arch}_{method}"
        argv = ["prune", str(folders[arch]), "--method", method, "--calibration", str(folders["calibration"]), *ARGS]
        random_ids = arch == "llama" and method != "magnitude"
        with pytest.warns(UserWarning, match="no tokenizer") if random_ids else contextlib.nullcontext():
            assert main([*argv, "--out", str(done[arch, method])]) == 0
    return done


def _masks(folder, arch) -> dict[str, torch.Tensor]:
    head = {"bert": "base", "bert_mlm": "masked_lm", "llama": "causal_lm"}[arch]
    model = load_hf_sparse(folder, auto_class(head))
    return {name: layer.matrix.block_mask() for name, layer in sparse_layers(model).items()}


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_reloads_as_the_dense_model_with_the_pruned_tiles_zeroed(folders, pruned, arch, method):
    model, _, head = load_pretrained(folders[arch])
    sparse = load_hf_sparse(pruned[arch, method], auto_class(head))
    layers = sparse_layers(sparse)
    assert len(layers) == 4 if arch.startswith("bert") else 6
    with torch.no_grad():
        for name, layer in layers.items():
            assert layer.matrix.density == pytest.approx(0.5)
            dense = model.get_submodule(name)
            dense.weight.mul_(expand_block_mask(layer.matrix.block_mask(), (16, 16), dense.weight.shape))
        tokens = torch.randint(model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
        expected, got = model(input_ids=tokens)[0], sparse(input_ids=tokens)[0]
    assert expected.shape == got.shape
    assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_each_method_chooses_other_tiles(pruned, arch):
    masks = {method: _masks(pruned[arch, method], arch) for method in PRUNE_METHODS}
    for i, first in enumerate(PRUNE_METHODS):
        for second in PRUNE_METHODS[i + 1 :]:
            differing = sum(not torch.equal(masks[first][n], masks[second][n]) for n in masks[first])
            assert differing > 0, f"{first} and {second} kept the same tiles everywhere"


def test_magnitude_keeps_the_tiles_sparsify_keeps(folders, pruned, tmp_path):
    out = tmp_path / "sparsified"
    assert main(["sparsify", str(folders["bert"]), "--sparsity", "0.5", "--block", "16", "--out", str(out)]) == 0
    ours, theirs = _masks(pruned["bert", "magnitude"], "bert"), _masks(out, "bert")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_output_folder_has_the_tokenizer_and_no_dense_weights(pruned):
    folder = pruned["bert", "fisher"]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors", "README.md"} <= names
    assert "sparseblocks.json" not in names
    with safe_open(str(folder / "model.safetensors"), framework="pt") as file:
        keys = set(file.keys())
    for name in _masks(folder, "bert"):
        assert {f"{name}.values", f"{name}.crow_indices", f"{name}.col_indices"} <= keys
        assert f"{name}.weight" not in keys


def test_calibration_windows_are_tokenized_text_spread_over_the_file(folders):
    tokenizer = load_pretrained(folders["bert"])[1]
    tokens = calibration_tokens(_text(), tokenizer, 100, samples=5, seq_len=16)
    assert tokens.shape == (5, 16)
    assert (tokens[:, 0] == tokenizer.cls_token_id).all() and (tokens[:, -1] == tokenizer.sep_token_id).all()
    assert (tokens[:, 1:-1] != tokenizer.unk_token_id).all()
    assert len({tuple(row) for row in tokens.tolist()}) == 5
    words = tokenizer(_text(), add_special_tokens=False)["input_ids"]
    assert tokens[0, 1:-1].tolist() == words[:14]  # the first window opens the text
    # a long run of spaces where windows start: they read on past it, or take the end of the text
    gappy = calibration_tokens(_text(60) + " " * 3000 + _text(60), tokenizer, 100, samples=4, seq_len=16)
    assert gappy.shape == (4, 16) and (gappy[:, -1] == tokenizer.sep_token_id).all()
    with pytest.raises(ValueError, match="fewer than 16 tokens"):
        calibration_tokens("the king spoke", tokenizer, 100, samples=2, seq_len=16)


def test_without_a_tokenizer_calibration_is_random_ids_with_a_warning():
    with pytest.warns(UserWarning, match="no tokenizer"):
        first = calibration_tokens("ignored", None, 50, samples=3, seq_len=8, seed=4)
    with pytest.warns(UserWarning):
        again = calibration_tokens("ignored", None, 50, samples=3, seq_len=8, seed=4)
    assert first.shape == (3, 8) and first.max() < 50 and torch.equal(first, again)


def test_parser_offers_the_library_methods():
    prune = build_parser()._subparsers._group_actions[0].choices["prune"]
    method = next(a for a in prune._actions if a.dest == "method")
    assert tuple(method.choices) == PRUNE_METHODS


def test_save_hf_sparse_leaves_weights_and_shard_indexes_behind(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors", "model.safetensors.index.json", "x.bin"):
        (source / name).write_text("{}")
    model = transformers.BertModel(transformers.BertConfig(**SIZES))
    sparsify(model, SparsityConfig(0.5, 16))
    out = save_hf_sparse(model, source, tmp_path / "out")
    assert {p.name for p in out.iterdir()} == {"config.json", "tokenizer.json", "model.safetensors", "README.md"}
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "sparseblocks"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prune", "{missing}", "--out", "{out}"], "no such model folder"),
        (["prune", "{empty}", "--out", "{out}"], "no config.json"),
        (["prune", "{bert}", "--method", "fisher", "--out", "{out}"], "needs --calibration"),
        (["prune", "{bert}", "--method", "fisher", "--calibration", "{missing}", "--out", "{out}"], "cannot read"),
        (["prune", "{bert}", "--method", "fisher", "--calibration", "{text}", "--seq-len", "64", "--out", "{out}"],
         "exceed the model's 32 positions"),
        (["prune", "{bert}", "--sparsity", "1.5", "--out", "{out}"], "sparsity must lie in"),
    ],
)  # fmt: skip
def test_bad_input_gives_a_clear_error(folders, tmp_path, argv, message):
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "out": tmp_path / "out",
             "bert": folders["bert"], "text": folders["calibration"]}  # fmt: skip
    with pytest.raises(SystemExit, match=message):
        main([part.format(**paths) for part in argv])
    assert not (tmp_path / "out").exists()


def test_unknown_method_is_refused_by_the_parser_and_the_library(folders, capsys):
    with pytest.raises(SystemExit):
        main(["prune", str(folders["bert"]), "--method", "supermask", "--out", "unused"])
    assert "invalid choice: 'supermask'" in capsys.readouterr().err
    model = load_pretrained(folders["bert"])[0]
    with pytest.raises(ValueError, match="method must be one of"):
        prune_pretrained(model, SparsityConfig(0.5, 16), "supermask")


def test_reconstruction_keeps_the_tiles_and_moves_outputs_toward_the_dense_model(folders):
    dense, tokenizer, head = load_pretrained(folders["bert"])
    tokens = calibration_tokens(folders["calibration"].read_text(), tokenizer, dense.config.vocab_size, 6, 16)
    config = SparsityConfig(0.5, 16, "mlp")
    errors, masks = {}, {}
    for refit in (False, True):
        model = load_pretrained(folders["bert"])[0]
        prune_pretrained(model, config, "activation_magnitude", tokens, head, tokenizer, reconstruct=refit)
        masks[refit] = {name: layer.matrix.block_mask() for name, layer in sparse_layers(model).items()}
        with torch.no_grad():
            errors[refit] = (model(input_ids=tokens)[0] - dense(input_ids=tokens)[0]).norm().item()
    assert all(torch.equal(masks[False][name], masks[True][name]) for name in masks[False])
    assert errors[True] < 0.8 * errors[False]
    with pytest.raises(ValueError, match="with reconstruction needs calibration tokens"):
        prune_pretrained(load_pretrained(folders["bert"])[0], config, "magnitude", None, head, reconstruct=True)


def test_two_of_four_from_the_command_line_with_reconstruction(folders, tmp_path):
    dense, tokenizer, head = load_pretrained(folders["bert"])
    tokens = calibration_tokens(folders["calibration"].read_text(), tokenizer, dense.config.vocab_size, 6, 16)
    errors = {}
    for refit in (False, True):
        out = tmp_path / f"refit_{refit}"
        argv = ["prune", str(folders["bert"]), "--pattern", "2:4", "--method", "activation_magnitude", "--calibration",
                str(folders["calibration"]), "--samples", "6", "--seq-len", "16", "--out", str(out)]  # fmt: skip
        assert main(argv + ["--reconstruct"] * refit) == 0
        model = load_hf_sparse(out, auto_class(head))
        layers = sparse_layers(model)
        assert len(layers) == 4 and all(isinstance(layer, SemiStructuredLinear) for layer in layers.values())
        for layer in layers.values():
            assert (layer.mask().reshape(layer.out_features, -1, 4).sum(-1) == 2).all()
        with torch.no_grad():
            errors[refit] = (model(input_ids=tokens)[0] - dense(input_ids=tokens)[0]).norm().item()
    assert errors[True] < 0.8 * errors[False]
    with pytest.raises(SystemExit, match="sparsity must be 0.5"):
        main(["sparsify", str(folders["bert"]), "--pattern", "2:4", "--sparsity", "0.9", "--out", str(tmp_path / "x")])


def test_prune_refuses_to_write_over_its_model_folder(tmp_path):
    with pytest.raises(SystemExit, match="--out must be another folder"):
        main(["prune", str(tmp_path), "--out", str(tmp_path)])


def test_sparsify_reports_a_missing_folder_without_a_traceback(tmp_path):
    with pytest.raises(SystemExit, match="sparseblocks sparsify"):
        main(["sparsify", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])


def test_fisher_on_a_bare_encoder_leaves_the_pooler_its_loss_never_reaches_dense(folders, tmp_path, caplog):
    out = tmp_path / "out"
    argv = ["prune", str(folders["bert"]), "--method", "fisher", "--targets", "all-linear", "--calibration",
            str(folders["calibration"]), *ARGS, "--out", str(out)]  # fmt: skip
    with caplog.at_level("WARNING", logger="sparseblocks"):
        assert main(argv) == 0
    assert "pooler.dense stays dense" in caplog.text
    layers = sparse_layers(load_hf_sparse(out, auto_class("base")))
    assert len(layers) == 12 and not any(name.startswith("pooler") for name in layers)  # 6 linears a layer


def test_a_masked_lm_window_without_an_ordinary_token_is_refused_before_calibration(folders, tmp_path):
    argv = ["prune", str(folders["bert_mlm"]), "--method", "fisher", "--calibration", str(folders["calibration"]),
            "--samples", "2", "--seq-len", "2", "--out", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit, match="--seq-len 2 leaves no token to mask .* at least 3"):
        main(argv)
    assert not (tmp_path / "out").exists()
