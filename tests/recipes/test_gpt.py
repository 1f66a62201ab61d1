"""The small GPT and character data behind the training benchmarks and the tinyshakespeare experiments."""

import copy
from pathlib import Path

import pytest
import torch

from conftest import relative_error
from sparseblocks import BlockSparseLinear, densify
from sparseblocks.recipes.gpt import GPT, CharData, GPTConfig, sparsify_mlps, train

TINY = GPTConfig(vocab_size=12, context=16, layers=2, heads=2, width=32)
SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"


def test_sparse_mlps_compute_what_the_masked_dense_model_does():
    torch.manual_seed(0)
    model = GPT(TINY)
    layers = sparsify_mlps(model, 0.5, 16, torch.Generator().manual_seed(0))
    assert len(layers) == 4 and all(isinstance(layer, BlockSparseLinear) for layer in layers)
    assert all(abs(layer.matrix.density - 0.5) < 1e-9 for layer in layers)
    tokens = torch.randint(12, (3, 16))
    logits, loss = model(tokens, tokens)
    twin_logits, _ = densify(copy.deepcopy(model))(tokens)
    assert logits.shape == (3, 16, 12) and loss.dim() == 0
    assert relative_error(logits, twin_logits) < 1e-5


def test_char_data_and_a_short_training_run(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be, that is the question. " * 40)
    data = CharData(text)
    assert data.vocab_size == len(set(text.read_text()))
    x, y = data.batch("val", 4, 16, torch.Generator().manual_seed(0), "cpu")
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=data.vocab_size, context=16, layers=1, heads=2, width=32))
    sparsify_mlps(model, 0.5, 16)
    losses = train(model, data, 40, batch_size=8, lr=3e-3, autocast_dtype=None)
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"needs {SHAKESPEARE}")
def test_triton_and_reference_training_converge_alike_on_gpu():
    from sparseblocks.bench.train import run_convergence

    result = run_convergence(steps=100, data_path=SHAKESPEARE)
    finals = result["final_loss_mean_last_20"]
    assert abs(finals["triton"] - finals["reference"]) < 0.05
