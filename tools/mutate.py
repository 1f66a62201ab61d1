"""Mutation testing: change one thing in a source file, run the tests that cover it, count the changes they catch.

    python tools/mutate.py                                  # every mutation of every target (hours on a CPU)
    python tools/mutate.py --sample 40 --seed 0 src/sparseblocks/format.py src/sparseblocks/integrations/checkpoint.py

Mutations (one per mutant, found with ``ast``): a comparison flipped (``<`` / ``<=``, ``>`` / ``>=``, ``==`` / ``!=``,
``is`` / ``is not``, ``in`` / ``not in``), ``and`` / ``or`` swapped, a ``not`` dropped, an integer constant plus one.
Each mutant is the module unparsed from its mutated tree (comments and layout are lost, the behaviour is that of the
one change), written into a copy of ``src/`` under a temporary folder; the target's tests run against it with
``PYTHONPATH`` pointing at the copy (``-x``: the first failure kills the mutant; a timeout counts as killed). Prints a
line per mutant, then the kill rate and the survivors (file:line and the change), which a reader then explains:
equivalent mutants (no behaviour changes) or a test to add. Not part of CI.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# target -> the tests that cover it
TARGETS = {
    "src/sparseblocks/format.py": ["tests/core/test_format.py", "tests/core/test_properties.py"],
    "src/sparseblocks/integrations/checkpoint.py": [
        "tests/integrations/test_checkpoint_integrity.py",
        "tests/integrations/test_checkpoint_properties.py",
        "tests/integrations/test_sparsify.py",
    ],
    "src/sparseblocks/integrations/files.py": ["tests/integrations/test_checkpoint_integrity.py"],
    "src/sparseblocks/integrations/sparsify.py": ["tests/integrations/test_sparsify.py"],
    "src/sparseblocks/pruning/pruner.py": ["tests/pruning/test_prune.py", "tests/pruning/test_registries.py"],
    "src/sparseblocks/ops/spmm.py": ["tests/ops/test_sparse_training.py", "tests/core/test_properties.py"],
    "src/sparseblocks/ops/mlp.py": ["tests/ops/test_sparse_training.py", "tests/core/test_properties.py"],
}
FLIPS = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
}  # fmt: skip


@dataclass(frozen=True)
class Mutation:
    path: str
    index: int  # the index-th mutable node of the file, in ast.walk order
    line: int
    change: str


def _mutable(tree: ast.AST) -> list[tuple[ast.AST, int, str]]:
    """(node, line, what the mutation does) for every mutation point, in ``ast.walk`` order."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)}  # fmt: skip
    points = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in FLIPS:
            op = type(node.ops[0])
            points.append((node, node.lineno, f"{op.__name__} -> {FLIPS[op].__name__}"))
        elif isinstance(node, ast.BoolOp):
            swapped = "Or" if isinstance(node.op, ast.And) else "And"
            points.append((node, node.lineno, f"{type(node.op).__name__} -> {swapped}"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            points.append((node, node.lineno, "drop not"))
        elif isinstance(node, ast.Constant) and type(node.value) is int and id(node) not in docstrings:
            points.append((node, node.lineno, f"{node.value} -> {node.value + 1}"))
    return points


def _mutant_source(source: str, index: int) -> str:
    tree = ast.parse(source)
    node, _, _ = _mutable(tree)[index]

    class Apply(ast.NodeTransformer):
        def visit(self, current):
            if current is node:
                if isinstance(current, ast.Compare):
                    current.ops = [FLIPS[type(current.ops[0])]()]
                elif isinstance(current, ast.BoolOp):
                    current.op = ast.Or() if isinstance(current.op, ast.And) else ast.And()
                elif isinstance(current, ast.UnaryOp):
                    return current.operand
                else:
                    current.value += 1
                return current
            return self.generic_visit(current)

    return ast.unparse(ast.fix_missing_locations(Apply().visit(tree)))


def mutations(paths: list[str]) -> list[Mutation]:
    found = []
    for path in paths:
        for index, (_, line, change) in enumerate(_mutable(ast.parse((ROOT / path).read_text()))):
            found.append(Mutation(path, index, line, change))
    return found


def _run_tests(copy: Path, tests: list[str], timeout: float) -> str:
    """``killed`` (a test failed or timed out) or ``survived``."""
    env = {**os.environ, "PYTHONPATH": str(copy / "src"), "TRITON_INTERPRET": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed"
    return "survived" if result.returncode == 0 else "killed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", default=list(TARGETS), help="targets (keys of TARGETS)")
    parser.add_argument("--sample", type=int, default=0, help="run this many mutants drawn at random (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant's tests")
    args = parser.parse_args(argv)
    unknown = [path for path in args.files if path not in TARGETS]
    if unknown:
        parser.error(f"no tests known for {unknown}; targets: {', '.join(TARGETS)}")
    chosen = mutations(args.files)
    if args.sample:
        chosen = sorted(random.Random(args.seed).sample(chosen, min(args.sample, len(chosen))),
                        key=lambda m: (m.path, m.index))  # fmt: skip
    print(f"{len(chosen)} mutants of {len(mutations(args.files))} in {', '.join(args.files)}", flush=True)
    survivors, start = [], time.time()
    with tempfile.TemporaryDirectory(prefix="mutate-") as folder:
        copy = Path(folder)
        shutil.copytree(ROOT / "src", copy / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        for path in args.files:  # the unmutated copy must pass, or every mutant would count as killed
            if _run_tests(copy, TARGETS[path], args.timeout) != "survived":
                print(f"the tests of {path} fail without any mutation: fix them first", file=sys.stderr)
                return 2
        for number, mutation in enumerate(chosen, 1):
            original = (ROOT / mutation.path).read_text()
            (copy / mutation.path).write_text(_mutant_source(original, mutation.index))
            try:
                outcome = _run_tests(copy, TARGETS[mutation.path], args.timeout)
            finally:
                (copy / mutation.path).write_text(original)
            if outcome == "survived":
                survivors.append(mutation)
            print(f"[{number}/{len(chosen)}] {outcome:8} {mutation.path}:{mutation.line} {mutation.change}", flush=True)
    killed = len(chosen) - len(survivors)
    print(f"\nkilled {killed}/{len(chosen)} ({killed / max(len(chosen), 1):.0%}) in {time.time() - start:.0f} s")
    for mutation in survivors:
        print(f"  survived: {mutation.path}:{mutation.line} {mutation.change}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
