"""Checkpoint integrity: SHA-256 digests checked on load, atomic saves (killed at random points), bounded JSON.

The kill test forks a child that saves two versions of a model into one folder over and over and kills it with
SIGKILL at a random moment; every folder left behind must load as one of the versions, or be refused.
"""

import json
import logging
import os
import random
import signal
import time

import pytest
import torch
from torch import nn

from conftest import zero_tensor_bytes
from sparseblocks import BlockSparseLinear
from sparseblocks.integrations.checkpoint import CONFIG_FILE, DIGESTS, WEIGHTS_FILE, load_sparse, save_sparse
from sparseblocks.integrations.files import read_json, replacing, temporary_sibling
from sparseblocks.integrations.huggingface import save_hf_sparse


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(BlockSparseLinear(48, 32, sparsity=0.5, block_size=16), nn.ReLU(), nn.Linear(32, 16))


def _skeleton() -> nn.Module:
    return nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 16))


def _same(a: nn.Module, b: nn.Module) -> bool:
    first, second = a.state_dict(), b.state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: tensor.clone() for key, tensor in model.state_dict().items()}


def test_a_tensor_whose_bytes_were_zeroed_is_refused_by_name(tmp_path):
    save_sparse(_model(0), tmp_path)
    size = (tmp_path / WEIGHTS_FILE).stat().st_size
    zero_tensor_bytes(tmp_path / WEIGHTS_FILE, "0.values")
    assert (tmp_path / WEIGHTS_FILE).stat().st_size == size  # not truncated: only the digest can tell
    with pytest.raises(ValueError, match=r"tensor '0\.values' does not match its SHA-256"):
        load_sparse(tmp_path, _skeleton())
    # zero tiles are valid contents: without the digests the damage passes unseen (verify=False is an opt-out)
    loaded = load_sparse(tmp_path, _skeleton(), verify=False)
    assert not loaded[0].values.any()


def test_old_checkpoints_without_digests_load_with_a_warning(tmp_path, caplog):
    model = _model(0)
    save_sparse(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    del config[DIGESTS]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="sparseblocks"):
        loaded = load_sparse(tmp_path, _skeleton())
    assert "records no SHA-256 digests" in caplog.text
    assert _same(loaded, model)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["tensors"].pop("2.bias"), "'2.bias' is not recorded"),
        (lambda d: d["tensors"].update({"extra": "0" * 64}), r"lacks tensors .*'extra'"),
        (lambda d: d["tensors"].update({"2.bias": "f" * 64}), "'2.bias' does not match"),
        (lambda d: d["tensors"].update({"2.bias": "not hex"}), "SHA-256 hex digests"),
        (lambda d: d.update({"files": {"../recipe.json": "0" * 64}}), "not a file this folder may hold"),
        (lambda d: d.update({"files": {"recipe.json": "0" * 64}}), "recipe.json: missing"),
        (lambda d: d.pop("files"), "mapping of 'tensors' and 'files'"),
    ],
)  # fmt: skip
def test_digest_records_of_the_wrong_form_or_contents_are_refused(tmp_path, change, message):
    save_sparse(_model(0), tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    change(config[DIGESTS])
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_sparse(tmp_path, _skeleton())


def test_extra_files_are_hashed_and_a_changed_one_is_refused_by_name(tmp_path):
    save_sparse(_model(0), tmp_path, extra_files={"notes.txt": "one"})
    load_sparse(tmp_path, _skeleton())
    (tmp_path / "notes.txt").write_text("two")
    with pytest.raises(ValueError, match=r"notes\.txt: SHA-256 differs"):
        load_sparse(tmp_path, _skeleton())
    for name in (WEIGHTS_FILE, CONFIG_FILE, "../x", ".hidden"):
        with pytest.raises(ValueError, match="plain file name"):
            save_sparse(_model(0), tmp_path, extra_files={name: b""})


def test_a_folder_without_its_json_is_refused_as_an_interrupted_save(tmp_path):
    save_sparse(_model(0), tmp_path)
    (tmp_path / CONFIG_FILE).unlink()
    with pytest.raises(ValueError, match="interrupted"):
        load_sparse(tmp_path, _skeleton())


def test_save_hf_sparse_drops_the_sources_stale_json_and_moves_a_whole_folder_in(tmp_path):
    from transformers import BertConfig, BertModel

    from sparseblocks import SparsityConfig, sparsify
    from sparseblocks.integrations.huggingface import load_hf_sparse

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    source = tmp_path / "source"
    BertModel(config).save_pretrained(source)
    save_sparse(_model(1), source)  # a stale sparseblocks.json (and weights) in the source folder
    (source / "vocab.txt").write_text("[PAD]\n")
    model = BertModel(config).eval()
    sparsify(model, SparsityConfig(sparsity=0.5, block_size=16, targets="mlp"))
    out = save_hf_sparse(model, source, tmp_path / "out")
    assert not (out / CONFIG_FILE).exists() and not (out / WEIGHTS_FILE).exists()
    assert (out / "vocab.txt").read_text() == "[PAD]\n"
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # no staging folder left
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        assert torch.equal(load_hf_sparse(out)(ids).last_hidden_state, model(ids).last_hidden_state)


@pytest.mark.parametrize("depth", [65, 200_000])
def test_deeply_nested_json_is_a_value_error(tmp_path, depth):
    save_sparse(_model(0), tmp_path)
    (tmp_path / CONFIG_FILE).write_text("[" * depth + "]" * depth)
    with pytest.raises(ValueError, match="nested too deeply"):
        load_sparse(tmp_path, _skeleton())
    assert read_json("[" * 64 + "]" * 64, "x") is not None  # the limit itself is allowed


def test_replacing_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "file.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), replacing(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and not temporary_sibling(path).exists()
    with replacing(path) as temporary:
        temporary.write_text("new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["file.json"]


KILLS = 40


def _slow(rename):
    def slow_rename(*args):
        time.sleep(0.002)
        rename(*args)
        time.sleep(0.002)

    return slow_rename


def test_a_save_killed_at_random_points_leaves_the_old_or_new_version_or_a_refusal(tmp_path):
    """Two versions with the same shapes (a mix would load without a shape error) and a recipe-like extra file;
    a child saves them alternately, each rename slowed down, until SIGKILL lands at a random moment."""
    versions = [_model(0), _model(1)]
    states = [_state(model) for model in versions]
    notes = ["version 0", "version 1"]
    save_sparse(versions[0], tmp_path, extra_files={"notes.txt": notes[0]})
    rng = random.Random(0)
    outcomes = {"version 0": 0, "version 1": 0, "refused": 0}
    for _ in range(KILLS):
        child = os.fork()
        if child == 0:  # the child saves until killed; it never returns into pytest
            try:
                os.replace = _slow(os.replace)  # widen the windows between the renames, where a mix could appear
                for i in range(10**6):
                    save_sparse(versions[i % 2], tmp_path, extra_files={"notes.txt": notes[i % 2]})
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 0.04))
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        try:
            loaded = load_sparse(tmp_path, _skeleton()).state_dict()
        except ValueError as error:
            assert "interrupted" in str(error) or "SHA-256" in str(error), error
            outcomes["refused"] += 1
            continue
        matches = [all(torch.equal(loaded[key], state[key]) for key in state) for state in states]
        assert any(matches), "a mix of two saves loaded"
        version = matches.index(True)
        assert (tmp_path / "notes.txt").read_text() == notes[version], "tensors of one save, notes of the other"
        outcomes[notes[version]] += 1
    assert outcomes["version 0"] + outcomes["version 1"] > 0, outcomes
