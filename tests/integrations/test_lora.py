"""LoRA adapters over sparse layers with PEFT: train, save, load as a PEFT adapter; merging refuses unless asked to
project the delta onto the pattern."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from peft import get_peft_model  # noqa: E402

from sparseblocks import BlockSparseLinear, SemiStructuredLinear, SparsityConfig, sparsify  # noqa: E402
from sparseblocks.integrations.lora import load_sparse_adapter, merge_onto_pattern, sparse_lora_config  # noqa: E402
from sparseblocks.integrations.sparsify import sparse_layers  # noqa: E402

CONFIG = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    sparsify(model, SparsityConfig(0.5, 16, "mlp"))
    sparsify(model, SparsityConfig(0.5, pattern="2:4", targets="re:self_attn\\.o_proj$"))
    out = tmp_path_factory.mktemp("lora") / "sparse"
    model.save_pretrained(out)
    return out


def _load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder)


def test_adapters_train_save_and_load_back_as_a_peft_adapter(folder, tmp_path):
    ids = torch.randint(97, (2, 10), generator=torch.Generator().manual_seed(1))
    config = sparse_lora_config(r=4, lora_alpha=8, target_modules=["up_proj", "down_proj"])
    model = get_peft_model(_load(folder), config)
    base = {name: layer.values.detach().clone() for name, layer in sparse_layers(model).items()}
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(layer.values, base[name]) for name, layer in sparse_layers(model).items())  # frozen base
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert not torch.equal(expected, _load(folder)(input_ids=ids).logits)  # the adapters do something
    model.save_pretrained(tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    again = load_sparse_adapter(_load(folder), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, expected)


def test_merging_refuses_unless_projected_onto_the_pattern(folder):
    torch.manual_seed(2)
    config = sparse_lora_config(r=4, target_modules=["up_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(_load(folder), config)
    with pytest.raises(ValueError, match="would change its pattern"):
        model.merge_and_unload()
    lora = {name: module for name, module in model.named_modules() if hasattr(module, "get_delta_weight")}
    expected = {}
    for name, module in lora.items():
        base = module.get_base_layer()
        delta = module.get_delta_weight("default").detach()
        mask = base.to_linear().weight != 0
        expected[name.removeprefix("base_model.model.")] = (base.to_linear().weight + delta * mask).detach()
    merged = merge_onto_pattern(model)
    for name, weight in expected.items():
        layer = merged.get_submodule(name)
        assert isinstance(layer, BlockSparseLinear)
        torch.testing.assert_close(layer.to_linear().weight, weight, rtol=0, atol=1e-6)
    assert len(expected) == 4
    assert isinstance(merged.model.layers[0].self_attn.o_proj, SemiStructuredLinear)  # not targeted, untouched


def test_two_of_four_layers_take_no_adapters(folder):
    with pytest.raises(ValueError, match="not supported"):
        get_peft_model(_load(folder), sparse_lora_config(r=4, target_modules=["o_proj"]))
