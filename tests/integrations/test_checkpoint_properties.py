"""Property-based tests (hypothesis, derandomized): a checkpoint with any one byte changed, a range zeroed or the file
cut is refused with a ValueError or loads bitwise equal; a training state with optimizer moments reloads into a
fresh model and optimizer that then take bitwise the same steps."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from sparseblocks import BlockSparseLinear
from sparseblocks.integrations.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_sparse, save_sparse
from sparseblocks.recipes.training import load_training_state, restore_state, save_training_state


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(BlockSparseLinear(32, 32, sparsity=0.5, block_size=16), nn.Linear(32, 8))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    save_sparse(_model(), folder)
    return folder, {name: (folder / name).read_bytes() for name in (WEIGHTS_FILE, CONFIG_FILE)}


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from([WEIGHTS_FILE, CONFIG_FILE]),
    kind=st.sampled_from(["byte", "zeros", "cut"]),
    position=st.floats(0.0, 1.0, exclude_max=True),
    length=st.integers(1, 64),
    value=st.integers(0, 255),
)
def test_a_mutated_checkpoint_is_refused_or_loads_bitwise_equal(saved, tmp_path_factory, name, kind, position,
                                                                  length, value):  # fmt: skip
    folder, original = saved
    data = bytearray(original[name])
    at = int(position * len(data))
    if kind == "byte":
        data[at] = value if data[at] != value else (value + 1) % 256
    elif kind == "zeros":
        data[at : at + length] = bytes(len(data[at : at + length]))
    else:
        del data[at:]
    target = tmp_path_factory.mktemp("mutant")
    for file, contents in original.items():
        (target / file).write_bytes(bytes(data) if file == name else contents)
    try:
        loaded = load_sparse(target, nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8))).state_dict()
    except ValueError:
        return
    expected = _model().state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


@settings(max_examples=12, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    optimizer=st.sampled_from(["sgd", "adamw", "adam"]),
    sparsity=st.sampled_from([0.0, 0.5, 0.75]),
    steps=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_training_state_with_an_optimizer_resumes_bitwise(tmp_path_factory, optimizer, sparsity, steps, seed):
    def build():
        torch.manual_seed(seed)
        model = nn.Sequential(BlockSparseLinear(32, 16, sparsity=sparsity, block_size=16), nn.GELU(), nn.Linear(16, 4))
        make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "adamw": torch.optim.AdamW,
                "adam": lambda p: torch.optim.Adam(p, lr=1e-2)}[optimizer]  # fmt: skip
        return model, make(model.parameters())

    def step(model, opt):
        opt.zero_grad()
        model(torch.randn(5, 32)).pow(2).mean().backward()
        opt.step()

    model, opt = build()
    for _ in range(steps):
        step(model, opt)
    path = tmp_path_factory.mktemp("state") / "state.safetensors"
    save_training_state(path, steps, {"optimizer": optimizer}, {"model": model, "optimizer": opt})
    resumed, resumed_opt = build()
    restore_state({"model": resumed, "optimizer": resumed_opt}, load_training_state(path)[2])
    step(model, opt)  # the global RNG was restored too: both draw the same batch
    restore_state({"model": resumed, "optimizer": resumed_opt}, load_training_state(path)[2])
    step(resumed, resumed_opt)
    first, second = model.state_dict(), resumed.state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)
