"""Files the library writes: atomic replacement, SHA-256 digests, and JSON read with bounded nesting.

* :func:`replacing` yields a temporary sibling of the target (same folder, ``.tmp-<name>-<pid>``); when the block
  ends without an error, the file is flushed to disk and renamed over the target (``os.replace``: readers see the old
  file or the new one, never a half-written one). On an error the temporary file is removed.
* :func:`tensor_sha256` is the digest of a tensor's bytes as safetensors stores them (C order, native little-endian);
  :func:`file_sha256` of a whole file. Writers record them in their JSON; loaders compare and name what differs.
* :func:`read_json` parses JSON and refuses nesting deeper than ``max_depth`` with a ``ValueError`` (Python's parser
  would raise ``RecursionError`` for deep input, and the recursive code that walks the result would too).

A folder of several files is committed by its JSON, written last: see
:func:`sparseblocks.integrations.checkpoint.save_sparse`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads when a tensor is hashed: the result writer and the report work without it
    import torch

TEMPORARY_PREFIX = ".tmp-"
MAX_JSON_DEPTH = 64  # the files we write nest at most ~12 deep (a training state's optimizer moments)
_CHUNK = 1 << 20


def temporary_sibling(path: Path) -> Path:
    """Where :func:`replacing` writes ``path`` before the rename."""
    return path.with_name(f"{TEMPORARY_PREFIX}{path.name}-{os.getpid()}")


def _sync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _commit(folder: Path, temporaries: dict[str, Path], record: str) -> None:
    """Flush the written ``temporaries`` (file name -> temporary path) and rename them into ``folder``, ``record``
    last. With several files the old ``record`` goes first: until the new one lands, the folder has none (a reader
    refuses it) rather than an old record beside new files."""
    for temporary in temporaries.values():
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
    if len(temporaries) > 1:
        (folder / record).unlink(missing_ok=True)
    for name, temporary in temporaries.items():
        if name != record:
            os.replace(temporary, folder / name)
    os.replace(temporaries[record], folder / record)


@contextmanager
def replacing_files(folder: str | Path, names: list[str], record: str) -> Iterator[dict[str, Path]]:
    """Replace the files ``names`` of ``folder`` together: the block writes each to the temporary path the yielded
    dict gives for its name; then they are renamed into place, ``record`` (the file that describes and hashes the
    others) last. A process killed at any point leaves the old files with the old record, the new files with the
    new record, or no record; temporary files are removed on errors."""
    folder = Path(folder)
    temporaries = {name: temporary_sibling(folder / name) for name in names}
    try:
        yield temporaries
        _commit(folder, temporaries, record)
    finally:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)
    _sync_folder(folder)


def move_into(folder: str | Path, staged: str | Path, record: str) -> None:
    """Move every file of the folder ``staged`` (written beside ``folder``, on the same file system) into
    ``folder``, replacing files of the same names, ``record`` (the file readers look for first) last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _commit(folder, {path.name: path for path in Path(staged).iterdir() if path.is_file()}, record)
    _sync_folder(folder)


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Write ``path`` atomically: the block writes the yielded temporary path, which then replaces ``path``."""
    path = Path(path)
    with replacing_files(path.parent, [path.name], path.name) as temporaries:
        yield temporaries[path.name]


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Replace ``path`` by ``data`` (str: UTF-8) atomically; return the path."""
    path = Path(path)
    with replacing(path) as temporary:
        temporary.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of ``tensor``'s bytes in C order (what a safetensors file holds for it)."""
    import torch

    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def json_depth(value: object) -> int:
    """How deeply ``value`` (parsed JSON) nests lists and dicts; a scalar is 0. Iterative: no recursion limit."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((child, depth) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def read_json(text: str | bytes, what: str, max_depth: int = MAX_JSON_DEPTH) -> object:
    """``text`` parsed; ``ValueError`` naming ``what`` for text that is not JSON or nests deeper than ``max_depth``."""
    try:
        value = json.loads(text)
    except RecursionError as error:
        raise ValueError(f"{what}: JSON nested too deeply (more than {max_depth} levels)") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{what}: not valid JSON ({error})") from error
    if json_depth(value) > max_depth:
        raise ValueError(f"{what}: JSON nested too deeply (more than {max_depth} levels)")
    return value
