"""The sparsity section of a sparse Hugging Face folder's model card (``README.md``), from the folder alone.

:func:`model_card` reads ``config.json``'s ``quantization_config`` and the safetensors headers (no tensor data):
per sparse layer its shape, block, density and bytes stored (values, indices, bias) against the dense layer's, the
whole checkpoint's bytes, and the command that made the folder. :func:`write_model_card` puts the section into the
folder's ``README.md`` between markers, replacing an earlier one and keeping the rest (the dense model's card).
``sparseblocks report --model FOLDER`` prints it.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from sparseblocks.format import VALUE_DTYPES_BY_NAME

BEGIN, END = "<!-- sparseblocks: begin -->", "<!-- sparseblocks: end -->"
_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I32": 4, "I64": 8, "U8": 1, "I8": 1, "BOOL": 1}


def _tensor_bytes(folder: Path) -> dict[str, int]:
    sizes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as file:
            for key in file.keys():  # noqa: SIM118 (safe_open is no dict)
                part = file.get_slice(key)
                count = 1
                for side in part.get_shape():
                    count *= side
                sizes[key] = count * _BYTES.get(part.get_dtype(), 0)
    return sizes


def model_card(folder: str | Path) -> str:
    """The Markdown section describing the sparse folder ``folder`` (``ValueError`` if it is not one)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())["quantization_config"]
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"{folder}: no config.json with a quantization_config ({error})") from error
    if not isinstance(config, dict) or config.get("quant_method") != "sparseblocks":
        raise ValueError(f"{folder}: its quantization_config is not sparseblocks'")
    sizes = _tensor_bytes(folder)
    rows, stored_total, dense_total = [], 0, 0
    for name, entry in config.get("layers", {}).items():
        stored = sum(size for key, size in sizes.items() if key.rpartition(".")[0] == name)
        element = VALUE_DTYPES_BY_NAME[entry["dtype"]].itemsize
        dense = (entry["out_features"] * entry["in_features"] + entry["out_features"] * entry["bias"]) * element
        stored_total, dense_total = stored_total + stored, dense_total + dense
        block = "x".join(map(str, entry.get("block", ()))) or entry.get("pattern", "")
        rows.append(f"| `{name}` | {entry['out_features']}x{entry['in_features']} | {block} | "
                    f"{1 - entry['density']:.3f} | {stored:,} | {dense:,} |")  # fmt: skip
    total = sum(sizes.values())
    lines = [
        BEGIN,
        "## Sparsity (sparseblocks)",
        "",
        f"{len(rows)} linear layers are block-sparse (`{config.get('pattern', 'block')}` layout; sparsity "
        f"{config.get('sparsity')}, block {config.get('block_size')}, targets {config.get('targets')}). Their "
        f"weights take {stored_total:,} bytes instead of {dense_total:,} "
        f"({stored_total / max(dense_total, 1):.3f}x, indices included); the checkpoint holds {total:,} bytes.",
        "",
        "Load it with `transformers` after `import sparseblocks.integrations.huggingface` (which registers the "
        '`"sparseblocks"` quantization method; no `trust_remote_code`). Without that import transformers does not '
        "know the method and leaves these layers randomly initialised.",
        "",
    ]
    if config.get("command"):
        lines += ["Made by:", "", "```", config["command"], "```", ""]
    lines += ["| layer | shape | block | sparsity | bytes stored | dense bytes |", "|---|---|---|---|---|---|"]
    lines += rows
    lines += [END]
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | Path) -> Path:
    """Put :func:`model_card`'s section into ``folder/README.md`` (replacing an earlier one); return the path."""
    path = Path(folder) / "README.md"
    section = model_card(folder)
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :].lstrip("\n")
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    path.write_text(text)
    return path
