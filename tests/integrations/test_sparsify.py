"""sparsify / densify and save_sparse / load_sparse on tiny random models of every family the presets know."""

import copy
import importlib
import json
import logging

import pytest
import torch
from torch import nn

from conftest import random_sparse, relative_error
from sparseblocks import (
    BlockSparseLinear,
    SparseMLP,
    SparsityConfig,
    densify,
    fuse_mlps,
    load_sparse,
    save_sparse,
    sparsify,
)
from sparseblocks.integrations.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from sparseblocks.integrations.sparsify import FUSED_MODULES, MLP_LAYOUTS, MLPLayout, register_mlp_layout
from sparseblocks.nn import SparseLinearActivation
from sparseblocks.recipes.gpt import GPT, GPTConfig

logging.getLogger("sparseblocks").setLevel(logging.ERROR)  # the CPU-reference notice


def _hf(config_name, model_name, **sizes):
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, config_name)(**sizes)
    return lambda: getattr(transformers, model_name)(config).eval()


TEXT = dict(vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=80)
LLAMA = dict(TEXT, num_key_value_heads=1, tie_word_embeddings=False)
VIT = dict(TEXT, image_size=16, patch_size=8)
del VIT["vocab_size"]


def _has(class_name, module):
    """Whether the installed transformers defines ``class_name`` in ``transformers.models.<module>``."""
    return hasattr(importlib.import_module(f"transformers.models.{module}"), class_name)


def _timm():
    timm = pytest.importorskip("timm")
    return lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=16, num_classes=10, depth=2).eval()


def _torchvision():
    models = pytest.importorskip("torchvision.models")
    return lambda: models.VisionTransformer(32, 16, 2, 2, 48, 80, num_classes=10).eval()


def _gpt():
    return lambda: GPT(GPTConfig(vocab_size=64, context=16, layers=2, heads=2, width=48)).eval()


# family -> (builder, example input, linears per layer that the "mlp" preset takes, whether its MLP fuses)
FAMILIES = {
    "bert": (lambda: _hf("BertConfig", "BertModel", **TEXT), "tokens", 2, True),  # its intermediate half
    "llama": (lambda: _hf("LlamaConfig", "LlamaForCausalLM", **LLAMA), "tokens", 3, True),
    "mistral": (lambda: _hf("MistralConfig", "MistralForCausalLM", **LLAMA), "tokens", 3, True),
    "qwen2": (lambda: _hf("Qwen2Config", "Qwen2ForCausalLM", **LLAMA), "tokens", 3, True),
    # HF ViT's MLP is one module (ViTMLP) from transformers 5 on, two before (as BERT's)
    "hf_vit": (lambda: _hf("ViTConfig", "ViTModel", **VIT), "image16", 2, lambda: _has("ViTMLP", "vit.modeling_vit")),
    "timm_vit": (_timm, "image32", 2, True),
    "torchvision_vit": (_torchvision, "image32", 2, True),
    "gpt": (_gpt, "tokens", 2, True),
}


def _output(model, kind):
    generator = torch.Generator().manual_seed(1)
    if kind == "tokens":
        x = torch.randint(64, (2, 16), generator=generator)
    else:
        size = 16 if kind == "image16" else 32
        x = torch.randn(2, 3, size, size, generator=generator)
    out = model(x)
    if isinstance(out, torch.Tensor):  # timm, torchvision
        return out
    if isinstance(out, tuple):  # sparseblocks.recipes.gpt: (logits, loss)
        return out[0]
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsify_matches_masked_dense_and_survives_save_and_load(family, tmp_path):
    make, kind, per_layer, _ = FAMILIES[family]
    build = make()
    torch.manual_seed(0)
    model = build()
    report = sparsify(model, SparsityConfig(sparsity=0.5, block_size=16, targets="mlp"))
    assert len(report.layers) == 2 * per_layer, [r.name for r in report.layers]
    assert report.model_bytes_after < report.model_bytes_before
    with torch.no_grad():
        out = _output(model, kind)
        masked_dense = _output(densify(copy.deepcopy(model)), kind)
    assert relative_error(out, masked_dense) < 1e-5

    save_sparse(model, tmp_path)
    torch.manual_seed(123)  # another random init: everything must come from the file
    with torch.no_grad():
        assert torch.equal(out, _output(load_sparse(tmp_path, build()), kind))
        with torch.device("meta"):
            skeleton = build()
        if any(True for _ in skeleton.buffers()):  # derived buffers (positions, rotary tables) need a real init
            with pytest.raises(ValueError, match="buffers on the meta device"):
                load_sparse(tmp_path, skeleton)
            skeleton = _parameters_on_meta(build())
        assert torch.equal(out, _output(load_sparse(tmp_path, skeleton), kind))


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_mlps_compute_the_same_keep_their_keys_and_reload_fused(family, tmp_path):
    make, kind, _, fuses = FAMILIES[family]
    build = make()
    fuses = fuses() if callable(fuses) else fuses
    torch.manual_seed(0)
    unfused = build()
    sparsify(unfused, SparsityConfig(sparsity=0.5, block_size=16, targets="mlp"))
    fused = copy.deepcopy(unfused)
    assert fuse_mlps(fused) == (2 if fuses else 0)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    with torch.no_grad():
        out = _output(fused, kind)
        assert relative_error(out, _output(unfused, kind)) < 1e-6
    if not fuses:
        return
    save_sparse(fused, tmp_path)
    reloaded = load_sparse(tmp_path, build())
    assert sum(isinstance(m, FUSED_MODULES) for m in reloaded.modules()) == 2
    dense = densify(fused)
    assert not any(isinstance(m, (*FUSED_MODULES, BlockSparseLinear)) for m in dense.modules())
    with torch.no_grad():
        assert torch.equal(out, _output(reloaded, kind))
        assert relative_error(out, _output(dense, kind)) < 1e-5


def test_sparse_mlp_trains_and_refuses_mismatched_layers():
    mlp = GPT(GPTConfig(vocab_size=64, context=16, layers=1, heads=2, width=32)).blocks[0].mlp
    sparsify(mlp, SparsityConfig(sparsity=0.5, block_size=16, targets="all-linear", fuse_mlp=True))
    assert fuse_mlps(mlp) == 0  # a root module is never replaced
    fused = SparseMLP(mlp.fc, mlp.proj, activation="gelu")
    x = torch.randn(3, 32, requires_grad=True)
    fused(x).square().sum().backward()
    assert x.grad is not None and fused.layer("up").values.grad is not None
    one_kernel = SparseMLP(mlp.fc, mlp.proj, activation="gelu", fused=True).eval()
    with torch.no_grad():  # the fused op (its reference on the CPU), also inside a compiled graph
        expected = fused.eval()(x)
        assert relative_error(one_kernel(x), expected) < 1e-6
        assert relative_error(torch.compile(one_kernel, fullgraph=True)(x), expected) < 1e-5
    with pytest.raises(ValueError, match="hidden sizes"):
        SparseMLP(mlp.fc, mlp.fc)
    with pytest.raises(ValueError, match="activation"):
        SparseMLP(mlp.fc, mlp.proj, activation="tanh")


def test_a_linear_and_its_activation_run_as_one_product_where_spmm_fuses_the_activation():
    build = _hf("BertConfig", "BertModel", **TEXT)
    torch.manual_seed(0)
    model = build()
    sparsify(model, SparsityConfig(sparsity=0.5, block_size=16, targets="mlp"))
    intermediate = model.encoder.layer[0].intermediate
    fused = copy.deepcopy(intermediate)
    fused.intermediate_act_fn = nn.Tanh()  # not an activation spmm has
    assert fuse_mlps(nn.Sequential(fused)) == 0
    wrapper = nn.Sequential(copy.deepcopy(intermediate))
    assert fuse_mlps(wrapper) == 1
    one_product = wrapper[0]
    assert isinstance(one_product, SparseLinearActivation) and one_product.activation == "gelu"
    x = torch.randn(2, 5, 48, requires_grad=True)
    one_product(x).square().sum().backward()  # trains: spmm's backward through the fused activation
    assert x.grad is not None and one_product.dense.values.grad is not None
    with torch.no_grad():
        assert relative_error(one_product(x), intermediate(x)) < 1e-6
    with pytest.raises(ValueError, match="activation"):
        SparseLinearActivation(intermediate.dense, "tanh")


@pytest.mark.parametrize("tokens", [1, 3])
def test_gated_mlp_inference_eager_and_compiled(tokens):
    """A SwiGLU SparseMLP without gradients: at one token the one-token path (two launches on a GPU), eager and
    inside a fullgraph compile; both match the separate products."""
    from sparseblocks.dispatch import INTERPRETER, Tiles, mlp_plan

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    up, gate, down = (BlockSparseLinear.from_linear(nn.Linear(*shape, bias=False), 0.5, 16)
                      for shape in [(64, 96), (64, 96), (96, 64)])  # fmt: skip
    mlp = SparseMLP(up, down, gate=gate, activation="silu").to(device).eval()
    unfused = SparseMLP(up, down, gate=gate, activation="silu", fused=False).to(device).eval()
    x = torch.randn(tokens, 64, device=device)
    plan = mlp_plan(tokens, *(Tiles.of(m.matrix) for m in (up, down, gate)), INTERPRETER)
    assert (plan.value == "one_token") == (tokens == 1)
    with torch.no_grad():
        expected = unfused(x)
        assert relative_error(mlp(x), expected) < 1e-5
        assert relative_error(torch.compile(mlp, fullgraph=True)(x), expected) < 1e-5


def _parameters_on_meta(model):
    """What accelerate's init_empty_weights() builds: parameters on meta (tied ones stay tied), buffers real."""
    moved = {}
    for module in model.modules():
        for key, parameter in module._parameters.items():
            if parameter is not None:
                moved.setdefault(id(parameter), nn.Parameter(parameter.to("meta"), parameter.requires_grad))
                module._parameters[key] = moved[id(parameter)]
    return model


def test_presets_exclude_and_per_module_sparsity():
    model = FAMILIES["llama"][0]()()
    report = sparsify(model, SparsityConfig(0.5, 16, targets="attention", exclude="*.layers.1.*"))
    assert [r.name.rsplit(".", 1)[1] for r in report.layers] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = FAMILIES["llama"][0]()()
    report = sparsify(model, SparsityConfig({"*.up_proj": 0.75, "re:.*": 0.25}, 16, targets="all-linear"))
    names = [r.name for r in report.layers]
    assert "lm_head" not in names and len(names) == 14
    densities = {r.name.rsplit(".", 1)[1]: r.density for r in report.layers}
    # whole tiles: 4 of 15 and 7 of 9
    assert densities["up_proj"] == pytest.approx(4 / 15) and densities["q_proj"] == pytest.approx(7 / 9)


def test_ragged_shapes_are_padded_not_skipped():
    model = nn.Sequential(nn.Linear(50, 70), nn.ReLU(), nn.Linear(70, 30))
    report = sparsify(model, SparsityConfig(0.5, 32, targets="all-linear"))
    assert len(report.layers) == 2 and all(isinstance(m, BlockSparseLinear) for m in (model[0], model[2]))


def test_no_match_warns_and_tied_weights_are_refused():
    model = nn.Sequential(nn.Linear(32, 32))
    with pytest.warns(UserWarning, match="no nn.Linear matched"):
        report = sparsify(model, SparsityConfig(targets="mlp"))
    assert not report.layers and isinstance(model[0], nn.Linear)
    tied = FAMILIES["llama"][0]()()
    tied.lm_head.weight = tied.model.embed_tokens.weight
    with pytest.raises(ValueError, match="shared"):
        sparsify(tied, SparsityConfig(targets="re:lm_head"))
    with pytest.raises(ValueError, match="sparsity must lie"):
        SparsityConfig(sparsity=1.0)


def test_multihead_attention_out_proj_stays_dense():
    model = nn.Sequential(nn.MultiheadAttention(32, 2))
    with pytest.warns(UserWarning, match="no nn.Linear matched"):
        sparsify(model, SparsityConfig(targets="all-linear", block_size=16))
    assert type(model[0].out_proj) is not BlockSparseLinear


def _sparse_gpt(sparsity=0.5):
    """A tiny GPT (seed 0) with its MLPs at ``sparsity``, block 16."""
    torch.manual_seed(0)
    model = _gpt()()
    sparsify(model, SparsityConfig(sparsity, 16))
    return model


@pytest.mark.parametrize("fuse_mlp", [False, True])
def test_compiled_sparse_model_matches_eager(fuse_mlp):
    model = _sparse_gpt()
    if fuse_mlp:
        assert fuse_mlps(model) == 2
    tokens = torch.randint(64, (2, 16))
    with torch.no_grad():
        expected = model(tokens)[0]
        compiled = torch.compile(model)(tokens)[0]  # Inductor, for real: the custom op inside a compiled graph
    assert relative_error(compiled, expected) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fuse_mlp", [False, True])
def test_sparse_model_replays_from_a_cuda_graph(fuse_mlp):
    """The whole sparsified model captured once and replayed on new tokens: no host sync anywhere in its ops."""
    model = _sparse_gpt().cuda()
    if fuse_mlp:
        assert fuse_mlps(model) == 2
    tokens = torch.randint(64, (2, 16), device="cuda")
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(tokens)  # warm-up off the capture: autotuning, workspaces
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(tokens)[0]
        for seed in (1, 2):
            tokens.copy_(torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(seed)))
            graph.replay()
            assert relative_error(captured, model(tokens)[0]) < 1e-5


# ---------------------------------------------------------------------------------------------- bad files


@pytest.fixture
def saved(tmp_path):
    save_sparse(_sparse_gpt(), tmp_path)
    return tmp_path


def _rewrite(folder, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / WEIGHTS_FILE)
    change(tensors)
    save_file(tensors, folder / WEIGHTS_FILE)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t["blocks.0.mlp.fc.col_indices"].fill_(10**6), "col_indices must lie"),
        (lambda t: t["blocks.0.mlp.fc.col_indices"].fill_(-1), "col_indices must lie"),
        (lambda t: t.update({"blocks.0.mlp.fc.crow_indices": t["blocks.0.mlp.fc.crow_indices"].flip(0).contiguous()}),
         "crow_indices"),
        (lambda t: t.update({"blocks.0.mlp.fc.values": t["blocks.0.mlp.fc.values"][:-1].contiguous()}), "has shape"),
        (lambda t: t.update({"blocks.0.mlp.fc.col_indices": t["blocks.0.mlp.fc.col_indices"].long()}), "int32"),
        (lambda t: t.update({"blocks.0.mlp.fc.values": t["blocks.0.mlp.fc.values"].to(torch.int32)}), "floating"),
        (lambda t: t.pop("blocks.1.mlp.proj.bias"), "no tensor"),
        (lambda t: t.update({"blocks.0.mlp.fc.values": t["blocks.0.mlp.fc.values"].double()}), "float32, got"),
    ],
)  # fmt: skip
def test_corrupted_weights_are_rejected_clearly(saved, change, message):
    _rewrite(saved, change)
    # a crafted file can carry matching digests: the contents are validated without them too
    with pytest.raises(ValueError, match=message):
        load_sparse(saved, _gpt()(), verify=False)
    with pytest.raises(ValueError, match="blocks.[01].mlp"):  # the digests name the tensor that changed
        load_sparse(saved, _gpt()())


def test_a_strict_load_refuses_a_tensor_the_model_has_not(saved):
    _rewrite(saved, lambda t: t.update({"blocks.0.mlp.extra": torch.zeros(3)}))
    with pytest.raises(ValueError, match="'blocks.0.mlp.extra' is not recorded"):  # the file's digests
        load_sparse(saved, _gpt()())
    with pytest.raises(ValueError, match=r"unexpected \['blocks.0.mlp.extra'\]"):  # strictness itself
        load_sparse(saved, _gpt()(), verify=False)
    load_sparse(saved, _gpt()(), strict=False, verify=False)


def test_truncated_file_and_bad_config_are_rejected(saved):
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_sparse(saved, _gpt()())
    config = json.loads((saved / CONFIG_FILE).read_text())
    for block, dtype in (([16, 48], "float32"), (None, "float32"), ([16.5, 16], "float32"), ([16, 16], "int8")):
        config["layers"]["blocks.0.mlp.fc"].update(block=block, dtype=dtype)
        (saved / CONFIG_FILE).write_text(json.dumps(config))
        with pytest.raises(ValueError, match="block_size" if dtype == "float32" else "'dtype'"):
            load_sparse(saved, _gpt()())
    for text in (b"{not json", b"\xff\xfe"):
        (saved / CONFIG_FILE).write_bytes(text)
        with pytest.raises(ValueError, match="not a readable sparseblocks config"):
            load_sparse(saved, _gpt()())


def test_a_bare_sparse_layer_saves_and_loads(tmp_path):
    layer = BlockSparseLinear(40, 24, sparsity=0.5, block_size=16)
    save_sparse(layer, tmp_path)
    loaded = load_sparse(tmp_path, nn.Linear(40, 24))
    x = torch.randn(3, 40)
    assert isinstance(loaded, BlockSparseLinear) and torch.equal(loaded(x), layer(x))


def test_layers_sharing_one_matrix_save_and_load(tmp_path):
    matrix, _ = random_sparse(32, 32, 16, 0.5)
    model = nn.Sequential(BlockSparseLinear.from_matrix(matrix), BlockSparseLinear.from_matrix(matrix))
    save_sparse(model, tmp_path)
    loaded = load_sparse(tmp_path, nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)))
    x = torch.randn(2, 32)
    assert torch.equal(loaded(x), model(x))


def test_fused_mlp_names_in_a_checkpoint_are_checked(saved):
    config = json.loads((saved / CONFIG_FILE).read_text())
    for fused, message in [("blocks.0.mlp", "fused_mlps' must be a list"), (["no.such.module"], "cannot")]:
        (saved / CONFIG_FILE).write_text(json.dumps({**config, "fused_mlps": fused}))
        with pytest.raises(ValueError, match=message):
            load_sparse(saved, _gpt()())


def test_checkpoint_for_another_model_is_rejected(saved):
    other = GPT(GPTConfig(vocab_size=64, context=16, layers=2, heads=2, width=32))
    with pytest.raises(ValueError, match="the checkpoint a"):
        load_sparse(saved, other)


def test_patched_model_casts_autocasts_and_reloads_its_state_dict():
    model = _sparse_gpt()
    tokens = torch.randint(64, (2, 16))
    with torch.no_grad():
        expected = model(tokens)[0]
        assert relative_error(copy.deepcopy(model).to(torch.float64)(tokens)[0], expected) < 1e-5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert relative_error(model(tokens)[0], expected) < 5e-2
        other = _sparse_gpt(0.75)  # another tile count: load_state_dict resizes to the saved one
        other.load_state_dict(model.state_dict())
        assert torch.equal(other(tokens)[0], expected)


# ---------------------------------------------------------------------------------------------- what a swap keeps


class _Scaled(nn.Linear):
    def forward(self, x):
        return 10 * super().forward(x)


def _hooked():
    linear = nn.Linear(32, 32)
    linear.register_forward_hook(lambda module, args, out: out * 2)
    return linear


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: (lambda shared: nn.Sequential(shared, nn.ReLU(), shared))(nn.Linear(32, 32)), "also registered"),
        (lambda: nn.Sequential(_Scaled(32, 32)), "own forward"),
        (lambda: nn.Sequential(_hooked()), "hooks"),
        (lambda: nn.Linear(32, 32), "the model itself"),
    ],
)
def test_a_linear_a_sparse_layer_cannot_stand_in_for_is_refused(build, message):
    model = build()
    with pytest.raises(ValueError, match=message):
        sparsify(model, SparsityConfig(0.5, 16, targets="all-linear" if isinstance(model, nn.Sequential) else "*"))
    assert not any(isinstance(module, BlockSparseLinear) for module in model.modules())


def test_frozen_layers_stay_frozen_through_sparsify_and_densify():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    model[0].requires_grad_(False)
    sparsify(model, SparsityConfig(0.5, 16, targets="all-linear"))
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]
    densify(model)
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]


def test_a_checkpoint_loads_in_the_dtype_of_the_model_it_fills(tmp_path):
    save_sparse(_sparse_gpt(), tmp_path)
    model = load_sparse(tmp_path, _gpt()().to(torch.bfloat16))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(torch.randint(64, (1, 8)))[0].dtype == torch.bfloat16


def test_densify_refuses_a_fused_mlp_built_directly():
    mlp = SparseMLP(BlockSparseLinear(32, 64, 0.5, 16), BlockSparseLinear(64, 32, 0.5, 16))
    model = nn.Sequential(mlp)
    with pytest.raises(ValueError, match="not by fuse_mlps"):
        densify(model)
    assert model[0] is mlp and isinstance(mlp.up, BlockSparseLinear)


class _DropoutMLP(nn.Module):
    """timm's ``Mlp`` in miniature: dropouts after the activation and after the second linear."""

    def __init__(self, width: int, p: float):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(width, 2 * width), nn.GELU(), nn.Dropout(p)
        self.fc2, self.drop2 = nn.Linear(2 * width, width), nn.Dropout(p)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_densify_restores_mlps_in_the_models_train_or_eval_mode(mode, monkeypatch):
    monkeypatch.setattr("sparseblocks.integrations.sparsify.MLP_LAYOUTS", dict(MLP_LAYOUTS))
    register_mlp_layout(_DropoutMLP, MLPLayout("fc1", "fc2", activation_module="act", dropouts=("drop1", "drop2")))
    model = nn.Sequential(_DropoutMLP(32, 0.5)).train(mode == "eval")  # built in the other mode
    sparsify(model, SparsityConfig(0.5, 16, targets="all-linear", fuse_mlp=True))
    assert isinstance(model[0], SparseMLP)
    model.train(mode == "train")
    densify(model)
    assert isinstance(model[0], _DropoutMLP)
    assert all(module.training == (mode == "train") for module in model.modules())
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x)) == (mode == "eval")
