"""benchmarks/ab.py: one command against two trees, alternating, into one ``ab`` result."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from sparseblocks.bench.results import check

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("ab", ROOT / "benchmarks" / "ab.py")
ab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ab)

# writes a result whose row names the sparseblocks it imported: which tree ran
WRITER = ("import sys, sparseblocks; from sparseblocks.bench.results import new_result, write_result; "
          "p = new_result('tune_spmm', 'c'); p['rows'] = [{'package': sparseblocks.__file__}]; "
          "write_result(sys.argv[1] + '/r.json', p)")  # fmt: skip


def _tree(tmp_path: Path, name: str) -> Path:
    """A tree whose src is a link to this checkout's."""
    tree = tmp_path / name
    tree.mkdir()
    (tree / "src").symlink_to(ROOT / "src")
    return tree


def test_runs_alternate_and_rows_carry_their_side(tmp_path):
    old, new = _tree(tmp_path, "old"), _tree(tmp_path, "new")
    out = tmp_path / "ab.json"
    payload = ab.main([str(old), str(new), "--repeats", "2", "--out", str(out), "--", sys.executable, "-c", WRITER,
                       "{out}"])  # fmt: skip
    assert check(json.loads(out.read_text())) == payload and payload["kind"] == "ab"
    assert [(r["side"], r["repeat"]) for r in payload["rows"]] == [("old", 0), ("new", 0), ("old", 1), ("new", 1)]
    for row in payload["rows"]:
        assert row["kind"] == "tune_spmm" and row["file"] == "r.json" and row["returncode"] == 0
        assert row["package"].startswith(str(tmp_path / row["side"] / "src"))


def test_a_command_that_writes_no_result_keeps_its_output(tmp_path):
    old, new = _tree(tmp_path, "old"), _tree(tmp_path, "new")
    payload = ab.main([str(old), str(new), "--repeats", "1", "--out", str(tmp_path / "ab.json"), "--",
                       sys.executable, "-c", "print('hello')"])  # fmt: skip
    assert [(r["side"], r["stdout"]) for r in payload["rows"]] == [("old", "hello\n"), ("new", "hello\n")]


def test_bad_calls_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="usage"):
        ab.main([str(tmp_path), str(tmp_path)])
    with pytest.raises(SystemExit, match="has no src/sparseblocks"):
        ab.main([str(tmp_path), str(tmp_path), "--", "true"])
