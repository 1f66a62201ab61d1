"""Same-run A/B: one bench command against two source trees, alternating, into one result of kind ``ab``.

    PYTHONPATH=src python3 benchmarks/ab.py OLD_TREE NEW_TREE [--repeats 2] [--out FILE.json] -- <bench command>

e.g. ``benchmarks/ab.py /tmp/old . -- sparseblocks bench decode --quick --out {out}`` or
``benchmarks/ab.py /tmp/old . -- python3 benchmarks/diagnose/launch_overhead.py``. A tree is a checkout (``git
worktree add /tmp/old <commit>``, or ``git archive <commit> | tar -x -C /tmp/old``): its ``src`` goes first on
``PYTHONPATH``. The command runs ``--repeats`` times per tree in fresh processes, old and new alternating (old, new,
old, new, ...), from the current folder, so a drift of the machine falls on both. ``sparseblocks`` at the head of the
command runs ``python -m sparseblocks.cli`` of that tree; ``{out}`` is replaced by a fresh folder per run. Rows:
every row of every schema-1 result the run wrote there, with ``side`` (old, new), ``tree``, ``repeat``, ``file``
and the result's own ``kind``; a run that wrote no result (a script that prints) gives one row with its standard
output instead. Default out: ``benchmarks/results/<gpu>/ab.json``.
"""

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from sparseblocks.bench.harness import results_folder
from sparseblocks.bench.results import ResultError, new_result, read_result, write_result


def command_for(command: list[str]) -> list[str]:
    """``sparseblocks ...`` as ``python -m sparseblocks.cli ...`` (so PYTHONPATH picks the tree); else as given."""
    return [sys.executable, "-m", "sparseblocks.cli", *command[1:]] if command[0] == "sparseblocks" else command


def run_once(side: str, tree: Path, repeat: int, command: list[str]) -> list[dict]:
    """Run ``command`` against ``tree``; its result rows (or its output), each tagged with the side and repeat."""
    with tempfile.TemporaryDirectory(prefix=f"ab_{side}_") as out:
        argv = [part.replace("{out}", out) for part in command_for(command)]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(tree / "src"), os.environ.get("PYTHONPATH")])),
        }
        print(f"===== {side} ({tree}), repeat {repeat}: {shlex.join(argv)}", flush=True)
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        sys.stdout.write(done.stdout)
        sys.stderr.write(done.stderr)
        tag = {"side": side, "tree": str(tree), "repeat": repeat, "returncode": done.returncode}
        rows = []
        for path in sorted(Path(out).rglob("*.json")):
            try:
                result = read_result(path)
            except (ValueError, ResultError):
                continue  # not a result file
            rows += [{**tag, "file": path.name, "kind": result["kind"], **row} for row in result["rows"]]
        return rows or [{**tag, "stdout": done.stdout}]


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: ab.py OLD_TREE NEW_TREE [--repeats N] [--out FILE] -- <bench command>")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--repeats", type=int, default=2, help="runs per tree, alternating (default 2)")
    parser.add_argument("--out", type=Path, help="result file (default benchmarks/results/<gpu>/ab.json)")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        raise SystemExit("ab.py: no bench command after --")
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    for side, tree in trees.items():
        if not (tree / "src" / "sparseblocks").is_dir():
            raise SystemExit(f"ab.py: {side} tree {tree} has no src/sparseblocks")
    payload = new_result("ab", "python3 benchmarks/ab.py " + shlex.join(argv), bench_command=shlex.join(command),
                         trees={side: str(tree) for side, tree in trees.items()})  # fmt: skip
    out = args.out or results_folder(payload) / "ab.json"
    for repeat in range(args.repeats):
        for side, tree in trees.items():
            payload["rows"] += run_once(side, tree, repeat, command)
            write_result(out, payload)
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
