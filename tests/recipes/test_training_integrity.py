"""Training state and recipe folders: digests checked on resume, malformed metadata refused as ResumeError (never
RecursionError or TypeError), and a crafted recipe.json refused before the model it describes gets memory."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import zero_tensor_bytes
from sparseblocks.integrations.checkpoint import CONFIG_FILE, DIGESTS
from sparseblocks.integrations.files import file_sha256
from sparseblocks.recipes.gpt import GPT, GPTConfig, sparsify_mlps
from sparseblocks.recipes.training import (
    RECIPE_FILE,
    ResumeError,
    capture_state,
    load_recipe_model,
    load_training_state,
    restore_state,
    save_recipe_model,
    save_training_state,
)


def _parts():
    model = nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    return {"model": model, "optimizer": optimizer}


def test_a_training_state_with_a_zeroed_tensor_is_refused_by_name(tmp_path):
    path = tmp_path / "state.safetensors"
    save_training_state(path, 1, {"a": 1}, _parts())
    step, recipe, state = load_training_state(path)
    assert (step, recipe) == (1, {"a": 1}) and state["model"]["weight"].any()
    zero_tensor_bytes(path, "/model/weight")
    with pytest.raises(ResumeError, match="tensor '/model/weight' does not match its SHA-256"):
        load_training_state(path)
    assert not load_training_state(path, verify=False)[2]["model"]["weight"].any()
    assert load_training_state(path, tensors=False)[:2] == (1, {"a": 1})  # the metadata alone needs no tensors


def _metadata(**changes: str) -> dict[str, str]:
    metadata = {"format": "sparseblocks-training", "format_version": "1", "step": "3", "recipe": "{}",
                "state": json.dumps({"rng": {"__tensor__": "/rng"}})}  # fmt: skip
    return {**metadata, **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"state": "[" * 200_000 + "]" * 200_000}, "nested too deeply"),
        ({"state": json.dumps({"rng": {"__tensor__": "/rng"}, "x": [[[[{"a": 1}]]]] * 2} | {"y": "[" * 70})},
         None),  # a string that looks deep is no nesting: loads
        ({"state": '{"rng": {"__tensor__": "/rng"}, "x": ' + "[" * 70 + "]" * 70 + "}"}, "nested too deeply"),
        ({"state": '{"rng": {"__tensor__": []}}'}, "names a tensor it does not hold"),
        ({"state": '{"rng": {"__tensor__": "/rng"}, "o": {"__items__": 5}}'}, "no list of"),
        ({"state": '{"rng": {"__tensor__": "/rng"}, "o": {"__items__": [[[1], 2]]}}'}, "no list of"),
        ({"state": '{"rng": {"__tensor__": "/rng"}, "o": {"__tuple__": 5}}'}, "no list"),
        ({"state": '[{"__tensor__": "/rng"}]'}, "mapping with the RNG state"),
        ({"state": '{"rng": 5}'}, "mapping with the RNG state"),
        ({"recipe": "[1]"}, "recipe mapping"),
        ({"recipe": "{"}, "not valid JSON"),
        ({"step": "-1"}, "step >= 0"),
        ({"step": "x"}, "not a readable checkpoint"),
        ({"sha256": '{"/other": "00"}'}, "digests do not list"),
        ({"sha256": "[]"}, "digests do not list"),
    ],
)  # fmt: skip
def test_malformed_training_metadata_is_a_resume_error(tmp_path, changes, message):
    path = tmp_path / "state.safetensors"
    save_file({"/rng": torch.get_rng_state()}, str(path), metadata=_metadata(**changes))
    if message is None:
        assert load_training_state(path)[2]["y"] == "[" * 70
        return
    with pytest.raises(ResumeError, match=message):
        load_training_state(path)


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.update(rng="not a tensor"),
        lambda s: s["optimizer"].update(state=5),
        lambda s: s["optimizer"].update(param_groups=[{"params": 3}]),
        lambda s: s.update(model={"weight": "x"}),
    ],
)
def test_a_state_of_the_wrong_form_is_refused_on_restore(change):
    state = capture_state(_parts())
    change(state)
    with pytest.raises(ResumeError):
        restore_state(_parts(), state)


def _recipe_folder(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, context=8, layers=1, heads=2, width=16))
    sparsify_mlps(model, 0.5, 16)
    save_recipe_model(model, tmp_path, {"s": 1}, {"r": 2}, vocabulary="abc")
    return model


def test_recipe_json_is_hashed_with_the_checkpoint(tmp_path):
    model = _recipe_folder(tmp_path)
    tokens = torch.randint(16, (2, 8))
    assert torch.equal(load_recipe_model(tmp_path)(tokens)[0], model.eval()(tokens)[0])
    payload = json.loads((tmp_path / RECIPE_FILE).read_text())
    payload["result"] = {"r": 3}
    (tmp_path / RECIPE_FILE).write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=r"recipe\.json: SHA-256 differs"):
        load_recipe_model(tmp_path)


def _craft(folder, **model_config) -> None:
    """Change recipe.json's model config and record the new digest, as a crafted folder would."""
    payload = json.loads((folder / RECIPE_FILE).read_text())
    payload["model_config"].update(model_config)
    (folder / RECIPE_FILE).write_text(json.dumps(payload))
    config = json.loads((folder / CONFIG_FILE).read_text())
    config[DIGESTS]["files"][RECIPE_FILE] = file_sha256(folder / RECIPE_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("model_config", "message"),
    [
        ({"layers": 10**9}, "1000000000 layers, the weights file 1 blocks"),
        ({"width": 0}, "positive integers for \\['width'\\]"),
        ({"heads": 2.5}, "positive integers"),
        ({"shape": 3}, "does not fit GPTConfig"),
        ({"width": 64}, "the model has Linear"),
        ({"vocab_size": 17}, "head.weight has shape \\(17, 16\\)"),
    ],
)
def test_crafted_recipe_sizes_are_refused(tmp_path, model_config, message):
    _recipe_folder(tmp_path)
    _craft(tmp_path, **model_config)
    with pytest.raises(ValueError, match=message):
        load_recipe_model(tmp_path)


CRAFTED = """
import resource, sys, torch
from sparseblocks.recipes.gpt import GPT, GPTConfig
from sparseblocks.recipes.training import load_recipe_model
with torch.device("meta"):
    bytes_asked = sum(p.numel() * 4 for p in GPT(GPTConfig(vocab_size=16, context=2**18, layers=1, heads=2,
                                                          width=1024)).parameters())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_recipe_model(sys.argv[1])
except ValueError as error:
    print("refused:", error)
print(bytes_asked, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_a_crafted_recipe_folder_is_refused_before_its_model_gets_memory(tmp_path):
    """A ~40 KB folder whose recipe.json asks for a 1 GB model (positions 2**18 x width 1024): the peak resident
    memory of the loading process grows by less than 64 MB."""
    _recipe_folder(tmp_path)
    _craft(tmp_path, context=2**18, width=1024)
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) < 50_000
    out = subprocess.run([sys.executable, "-c", CRAFTED, str(tmp_path)], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("refused: layer 'blocks.0.mlp.fc': the model has Linear"), out.stdout
    bytes_asked, grown = map(int, lines[-1].split())
    assert bytes_asked > 2**30 and grown < 64 * 2**20, (bytes_asked, grown)
