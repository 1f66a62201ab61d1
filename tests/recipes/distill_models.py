"""Tiny random-weight Hugging Face folders of every family ``sparseblocks distill`` takes, with a character
tokenizer (BERT-like ones with ``[CLS]``/``[SEP]`` around each text and a ``[MASK]``), and text to distil on."""

import json
import random
from pathlib import Path

import torch

WORDS = ("the king and queen of a castle were in their hall when he spoke to his men at night for she had come "
         "from far away with gold on her hands but no one knew why it was so").split()  # fmt: skip
SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "bert_mlm", "roberta_mlm", "sentence_bert")


def text(lines: int = 80, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) + "." for _ in range(lines)) + "\n"


def char_tokenizer(encoder: bool):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"] if encoder else ["[UNK]"]
    vocab = {token: i for i, token in enumerate([*specials, *sorted(set(" ".join(WORDS) + ".\n"))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    if not encoder:
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")  # fmt: skip


def build(family: str, folder: Path, tokenizer: bool = True) -> Path:
    """Save a tiny random model of ``family`` (and its tokenizer) in ``folder``."""
    import transformers

    encoder = family in ("bert_mlm", "roberta_mlm", "sentence_bert")
    chars = char_tokenizer(encoder)
    vocab = len(chars) + (2 if family == "roberta_mlm" else 0)
    torch.manual_seed(0)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=2,
                                                                     n_positions=64))  # fmt: skip
    elif family in ("llama", "mistral", "qwen2"):
        config = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config}[family]  # fmt: skip
        model = transformers.AutoModelForCausalLM.from_config(config(vocab_size=vocab, num_key_value_heads=1,
                                                                     max_position_embeddings=64, **SIZES))  # fmt: skip
    elif family == "roberta_mlm":
        model = transformers.RobertaForMaskedLM(transformers.RobertaConfig(vocab_size=vocab,
                                                max_position_embeddings=66, pad_token_id=1, **SIZES))  # fmt: skip
    else:
        config = transformers.BertConfig(vocab_size=vocab, max_position_embeddings=64, **SIZES)
        model = transformers.BertForMaskedLM(config) if family == "bert_mlm" else transformers.BertModel(config)
    model.save_pretrained(folder)
    if tokenizer:
        chars.save_pretrained(folder)
    if family == "sentence_bert":
        kinds = ("sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling")
        modules = [{"idx": i, "name": str(i), "path": path, "type": kind}
                   for i, (path, kind) in enumerate(zip(("", "1_Pooling"), kinds, strict=True))]  # fmt: skip
        (folder / "modules.json").write_text(json.dumps(modules))
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                                     "pooling_mode_mean_tokens": True}))  # fmt: skip
    return folder
