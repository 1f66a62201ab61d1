"""The one form of every result file a benchmark or an accuracy run writes, its writer, and the Markdown tables.

A result file is JSON::

    {"schema": 1, "kind": "spmm", "env": {"gpu", "torch", "triton", "commit", "command", ...}, ..., "rows": [...]}

``kind`` (one of :data:`KINDS`) says what the rows are; ``sparseblocks report`` reads it instead of guessing from
the rows. ``env`` is where the numbers came from; a value that a run did not record is ``null``. Other header
fields (``ceilings``, ``model``, ``experiment``, ``note``, ...) sit beside them. :func:`write_result` refuses a
payload of another form, so a file of the wrong form is never written.

This module imports neither torch nor triton until :func:`environment` is called: the report reads files without
them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path

from sparseblocks.integrations.files import write_atomic

SCHEMA = 1
# what every result's env holds (more keys, e.g. "python", may follow)
ENV_KEYS = ("gpu", "torch", "triton", "commit", "command")
# kind -> what writes it
KINDS: dict[str, str] = {
    "spmm": "sparseblocks bench spmm: one layer, Y = X·Wᵀ",
    "mlp": "sparseblocks bench mlp and benchmarks/diagnose/gated_mlp.py: whole MLPs",
    "decode": "sparseblocks bench decode: a few tokens through Llama MLP weights",
    "e2e": "sparseblocks bench e2e: whole models",
    "train": "sparseblocks bench train: forward + backward, training steps, convergence",
    "accuracy_minilm": "benchmarks/minilm_sparsify.py: MiniLM embeddings after pruning",
    "accuracy_tinyshakespeare": "benchmarks/tinyshakespeare_pruning.py: a character GPT after pruning",
    "accuracy_digits": "benchmarks/digits_supermask.py: supermask ViT on digits",
    "accuracy_quantized": "benchmarks/quantized_accuracy.py: int8 / fp8 tiles against the unquantized sparse model",
    "accuracy_distill": "sparseblocks distill, benchmarks/llama_char_distill.py: pruning, recovery by distillation",
    "tune_spmm": "benchmarks/tune/spmm.py: launch configs of the forward kernels",
    "tune_decode": "benchmarks/tune/decode.py: launch configs of the few-token decode kernel",
    "tune_column_sums": "benchmarks/tune/column_sums.py: launch configs of the column-sum kernel",
    "one_token_mlp": "benchmarks/diagnose/one_token_mlp_pdl.py: a one-token MLP in four or two launches, PDL",
    "ab": "benchmarks/ab.py: one bench command against two source trees",
    "quantized_tokens": "benchmarks/diagnose/quantized_tokens.py: quantized against bf16 tiles at 1-8192 tokens",
}


class ResultError(ValueError):
    """A payload that is not a schema-1 result."""


def environment(command: str) -> dict:
    """GPU, versions, commit and the command line: a result's ``env``."""
    import torch
    import triton

    # SPARSEBLOCKS_COMMIT names the commit of a copied tree (the GPU machine's copy has no matching .git)
    commit = os.environ.get("SPARSEBLOCKS_COMMIT")
    if commit is None:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "command": command,
    }


def new_result(kind: str, command: str, **header: object) -> dict:
    """An empty result of ``kind``: schema, kind, the environment of this process, ``header`` and no rows."""
    if kind not in KINDS:
        raise ResultError(f"unknown result kind {kind!r}; known: {', '.join(KINDS)}")
    return {"schema": SCHEMA, "kind": kind, "env": environment(command), **header, "rows": []}


def check(payload: object) -> dict:
    """``payload`` if it is a schema-1 result of a known kind, else :class:`ResultError` saying what is wrong."""
    if not isinstance(payload, dict):
        raise ResultError(f"a result is a JSON object, not {type(payload).__name__}")
    if payload.get("schema") != SCHEMA:
        raise ResultError(f"schema {payload.get('schema')!r}, not {SCHEMA}")
    kind = payload.get("kind")
    if kind not in KINDS:
        raise ResultError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    env = payload.get("env")
    if not isinstance(env, dict):
        raise ResultError("no env object")
    missing = [key for key in ENV_KEYS if key not in env]
    if missing:
        raise ResultError(f"env lacks {', '.join(missing)}")
    if not isinstance(payload.get("rows"), list):
        raise ResultError("rows is not a list")
    return payload


def write_result(path: str | Path, payload: dict) -> Path:
    """Check ``payload`` and write it to ``path`` (folders made), atomically: a run killed while writing leaves the
    previous file; return the path."""
    check(payload)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, json.dumps(payload, indent=1) + "\n")


def read_result(path: str | Path) -> dict:
    """The checked result stored at ``path``."""
    return check(json.loads(Path(path).read_text()))


def versions(env: dict) -> str:
    """``torch X, triton Y, commit Z``: the versions line of a per-run table's head."""
    return f"torch {env.get('torch')}, triton {env.get('triton')}, commit {env.get('commit')}"


def markdown_table(header: Iterable[object], rows: Iterable[Iterable[object]]) -> list[str]:
    """A Markdown table's lines: the header, the rule and a line per row (``|`` and newlines in cells escaped)."""

    def line(cells: Iterable[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    header = list(header)
    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def ratio_cell(numerator: float | None, denominator: float | None) -> str:
    """``numerator / denominator`` as a table cell (``"2.50x"``), ``"—"`` when either is missing."""
    return "—" if numerator is None or denominator is None else f"{numerator / denominator:.2f}x"
