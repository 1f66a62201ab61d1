"""``sparseblocks train``: the GPT and ViT recipes at toy size on the CPU, checkpoints, resumption, image folders."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sparseblocks import BlockSparseLinear
from sparseblocks.cli import main
from sparseblocks.recipes.experiments import Experiment
from sparseblocks.recipes.training import (
    STATE_FILE,
    ResumeError,
    ViTRecipe,
    image_folder,
    load_recipe_model,
    load_training_state,
    save_training_state,
    train_gpt,
    train_vit,
)

TOY_GPT = Experiment(layers=1, heads=2, width=32, context=16, batch_size=4, steps=12, eval_batches=2, dropout=0.1,
                     regrow_every=3, calibration_batches=1)  # fmt: skip
TOY_VIT = ViTRecipe(sparsity=0.5, epochs=1, layers=1, heads=2, width=32, lr=1e-2, batch_size=16)


@pytest.fixture(autouse=True)
def _one_thread():
    """Toy models gain nothing from threads, and two pytest workers with two threads each on two cores slow every
    small op down several times (OpenMP threads waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 30)
    return path


def _same_files(a, b) -> bool:
    first, second = load_file(a / "sparseblocks.safetensors"), load_file(b / "sparseblocks.safetensors")
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_training_state_keeps_tuples_int_keys_generators_and_tied_tensors(tmp_path):
    shared = torch.arange(6.0)
    generator = torch.Generator().manual_seed(3)
    parts = {"optimizer_like": {"state": {0: {"step": torch.tensor(2.0)}}, "betas": (0.9, 0.99), "none": None},
             "tied": {"a": shared, "b": shared}, "rng": None}  # fmt: skip

    class Holder:  # a part is saved through state_dict()
        def __init__(self, state):
            self.state, self.loaded = state, None

        def state_dict(self):
            return self.state

        def load_state_dict(self, state):
            self.loaded = state

    holders = {name: Holder(value) for name, value in parts.items() if value is not None}
    save_training_state(tmp_path / STATE_FILE, 7, {"recipe": "test"}, {**holders, "shuffle": generator})
    step, recipe, state = load_training_state(tmp_path / STATE_FILE)
    assert step == 7 and recipe == {"recipe": "test"}
    assert state["optimizer_like"]["state"][0]["step"].item() == 2.0  # int key, tensor value
    assert state["optimizer_like"]["betas"] == (0.9, 0.99) and state["optimizer_like"]["none"] is None
    assert torch.equal(state["tied"]["a"], shared) and torch.equal(state["tied"]["b"], shared)
    assert torch.equal(state["shuffle"], generator.get_state())
    assert torch.equal(state["rng"], torch.get_rng_state())


@pytest.mark.parametrize("method", ["fisher", "supermask", "prune_grow", "activation_magnitude"])
def test_gpt_resumed_run_matches_an_uninterrupted_one(method, text, tmp_path):
    whole = train_gpt(text, tmp_path / "whole", method, 0.5, 16, TOY_GPT, checkpoint_every=5, progress=False)
    assert train_gpt(text, tmp_path / "split", method, 0.5, 16, TOY_GPT, 5, stop_after=7, progress=False) is None
    assert load_training_state(tmp_path / "split" / STATE_FILE)[0] == 7
    torch.manual_seed(1234)  # the global RNG (dropout) must come back from the checkpoint, not from this state
    resumed = train_gpt(text, tmp_path / "split", method, 0.5, 16, TOY_GPT, 5, resume=True, progress=False)
    assert resumed["val_loss"] == whole["val_loss"] and resumed["train_curve"] == whole["train_curve"]
    assert _same_files(tmp_path / "whole", tmp_path / "split")
    assert whole["params"][1] < whole["params"][0] and whole["bytes"][1] < whole["bytes"][0]

    model = load_recipe_model(tmp_path / "split")
    assert isinstance(model.blocks[0].mlp.fc, BlockSparseLinear)
    assert model.blocks[0].mlp.fc.matrix.density == pytest.approx(0.5)


def test_resume_refuses_another_run_and_a_run_refuses_to_overwrite(text, tmp_path):
    train_gpt(text, tmp_path, "magnitude", 0.5, 16, TOY_GPT, 4, stop_after=4, progress=False)
    with pytest.raises(ResumeError, match="resume it"):
        train_gpt(text, tmp_path, "magnitude", 0.5, 16, TOY_GPT, 4, progress=False)
    with pytest.raises(ResumeError, match="sparsity"):
        train_gpt(text, tmp_path, "magnitude", 0.75, 16, TOY_GPT, 4, resume=True, progress=False)


def test_train_gpt_command_dense(text, tmp_path, capsys):
    out = tmp_path / "dense"
    args = ["train", "gpt", "--data", str(text), "--method", "dense", "--out", str(out), "--steps", "4",
            "--layers", "1", "--heads", "2", "--width", "32", "--context", "16", "--batch-size", "4"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "validation loss" in printed and "params" in printed
    payload = json.loads((out / "recipe.json").read_text())
    assert payload["recipe"] == "gpt" and payload["settings"]["experiment"]["steps"] == 4
    assert payload["vocabulary"] == "".join(sorted(set(text.read_text())))
    tokens = torch.randint(payload["model_config"]["vocab_size"], (2, 16))
    assert load_recipe_model(out)(tokens)[0].shape == (2, 16, payload["model_config"]["vocab_size"])
    with pytest.raises(SystemExit, match="resume it"):  # a finished run's checkpoint is not overwritten either
        main(args)


def test_vit_on_digits_learns_in_one_epoch_and_resumes_mid_epoch(tmp_path):
    pytest.importorskip("sklearn")
    whole = train_vit("digits", tmp_path / "whole", TOY_VIT, progress=False)
    assert whole["test_accuracy"] > 0.25  # chance is 0.1; 0.41 on the CPU
    assert whole["params"][1] < whole["params"][0]
    assert train_vit("digits", tmp_path / "split", TOY_VIT, stop_after=20, progress=False) is None
    resumed = train_vit("digits", tmp_path / "split", TOY_VIT, resume=True, progress=False)
    assert resumed == whole and _same_files(tmp_path / "whole", tmp_path / "split")

    model = load_recipe_model(tmp_path / "split")
    assert all(isinstance(block.mlp.fc, BlockSparseLinear) for block in model.blocks)
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def _write_images(root, classes: int, per_class: int, mode: str, size: int = 12) -> None:
    """Class c: a bright square at a class-dependent place; some images of another size or mode."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size + i % 2, size + i % 2, 3), dtype=np.uint8)  # sizes vary: resized
            pixels[2 * c : 2 * c + 4, 2 * c : 2 * c + 4] = 255
            image = Image.fromarray(pixels)
            image = image.convert("L") if mode == "L" or i == 0 else image  # one grayscale image among RGB ones
            image.save(root / f"class_{c}" / f"{i}.png")


def test_image_folder_reads_classes_splits_and_channels(tmp_path):
    _write_images(tmp_path / "rgb", classes=3, per_class=5, mode="RGB")
    data = image_folder(tmp_path / "rgb", image_size=8)
    assert data.classes == ("class_0", "class_1", "class_2") and data.channels == 3 and data.image_size == 8
    assert len(data.train_labels) + len(data.test_labels) == 15
    assert torch.bincount(data.test_labels).tolist() == [1, 1, 1]  # round(0.25 * 5) of each class
    assert data.train_images.dtype == torch.float32 and 0.0 <= data.train_images.min() <= data.train_images.max() <= 1

    _write_images(tmp_path / "split" / "train", classes=2, per_class=3, mode="L")
    _write_images(tmp_path / "split" / "test", classes=2, per_class=2, mode="L")
    data = image_folder(tmp_path / "split", image_size=8)
    assert data.channels == 1 and data.train_images.shape == (6, 1, 8, 8) and data.test_images.shape == (4, 1, 8, 8)
    assert data.test_labels.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="no images"):
        image_folder(tmp_path / "split" / "train" / "class_0")


def test_train_vit_command_on_an_image_folder(tmp_path, capsys):
    _write_images(tmp_path / "images", classes=3, per_class=6, mode="RGB")
    out = tmp_path / "out"
    args = ["train", "vit", "--data", f"imagefolder:{tmp_path / 'images'}", "--image-size", "8", "--epochs", "1",
            "--layers", "1", "--heads", "2", "--width", "32", "--batch-size", "4", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "test accuracy" in capsys.readouterr().out
    payload = json.loads((out / "recipe.json").read_text())
    assert payload["classes"] == ["class_0", "class_1", "class_2"] and payload["model_config"]["channels"] == 3
    model = load_recipe_model(out)
    assert model(torch.rand(2, 3, 8, 8)).shape == (2, 3)
    assert isinstance(model.blocks[0].mlp.proj, BlockSparseLinear)


def test_an_image_folder_without_a_test_split_is_refused_before_training(tmp_path, monkeypatch):
    import sparseblocks.recipes.training as training

    def vit_training(*args):
        raise AssertionError("training began")

    monkeypatch.setattr(training, "vit_training", vit_training)
    _write_images(tmp_path / "single", classes=3, per_class=1, mode="RGB")
    args = ["train", "vit", "--data", f"imagefolder:{tmp_path / 'single'}", "--image-size", "8",
            "--out", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit, match="no test images: every class has a single image"):
        main(args)
    _write_images(tmp_path / "split" / "train", classes=2, per_class=2, mode="L")
    (tmp_path / "split" / "test" / "class_0").mkdir(parents=True)
    with pytest.raises(ValueError, match="no test images in .*test"):
        image_folder(tmp_path / "split", image_size=8)


def test_a_damaged_checkpoint_is_refused_clearly(tmp_path):
    path = tmp_path / STATE_FILE
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ResumeError, match="not a readable checkpoint"):
        load_training_state(path)


@pytest.mark.parametrize(
    "settings", [{"sparsity": -0.1}, {"sparsity": 1.5}, {"batch_size": 0}, {"heads": 3}, {"patch_size": 0}]
)
def test_vit_recipe_refuses_impossible_settings(settings):
    with pytest.raises(ValueError):
        ViTRecipe(**settings)
