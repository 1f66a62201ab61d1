"""The package's layers: which may import which, no import cycles, and ``import sparseblocks`` loading neither the
recipes nor the benchmarks."""

import ast
import subprocess
import sys
from pathlib import Path

import sparseblocks

PACKAGE = Path(sparseblocks.__file__).parent

# Each layer and the layers it may import (module-level and function-level imports alike). The core modules
# (format, masks, reference, backend, dispatch) sit below everything; cli sits above everything.
CORE = {"format", "masks", "reference", "backend", "dispatch"}
ALLOWED = {
    "core": {"core"},
    "kernels": {"core", "kernels"},
    "ops": {"core", "kernels", "ops"},
    "nn": {"core", "ops", "nn"},
    "integrations": {"core", "ops", "nn", "integrations", "pruning"},
    "pruning": {"core", "ops", "nn", "integrations", "pruning"},
    "recipes": {"core", "ops", "nn", "integrations", "pruning", "recipes", "bench"},
    "bench": {"core", "kernels", "ops", "nn", "integrations", "pruning", "recipes", "bench"},
    "cli": {"core", "ops", "nn", "integrations", "pruning", "recipes", "bench", "package"},
    "package": {"core", "ops", "nn", "integrations", "pruning"},
}


def _layer(module: str) -> str:
    """The layer of a dotted module name under ``sparseblocks``."""
    parts = module.split(".")[1:]
    if not parts or parts == ["__init__"]:
        return "package"
    if parts[0] in CORE:
        return "core"
    return parts[0]


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or path.is_dir()


def _imports(path: Path) -> dict[str, bool]:
    """The ``sparseblocks`` modules ``path`` imports, each with whether the import runs when the module loads
    (module level, outside functions) or later."""
    tree = ast.parse(path.read_text())
    found: dict[str, bool] = {}

    def visit(node: ast.AST, at_load: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = at_load and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("sparseblocks"):
                # `from package import module` loads that module; `from module import name`, the module
                for alias in child.names:
                    submodule = f"{child.module}.{alias.name}"
                    name = submodule if _is_module(submodule) else child.module
                    found[name] = found.get(name, False) or inner
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("sparseblocks"):
                        found[alias.name] = found.get(alias.name, False) or inner
            visit(child, inner)

    visit(tree, True)
    return found


MODULES = {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}


def test_each_layer_imports_only_the_layers_below_it():
    wrong = [
        f"{module} imports {target}"
        for module, targets in MODULES.items()
        for target in targets
        if _layer(target) not in ALLOWED[_layer(module)] and target != "sparseblocks"
    ]
    assert not wrong, wrong


def test_no_import_cycles_at_load_time():
    graph = {
        module: {t for t, at_load in targets.items() if at_load and t in MODULES} for module, targets in MODULES.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def cycle_from(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return [*path, module, target]
            if target not in state and (found := cycle_from(target, [*path, module])):
                return found
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            assert (cycle := cycle_from(module, [])) is None, " -> ".join(cycle)


def test_import_sparseblocks_loads_no_recipes_and_no_benchmarks():
    code = (
        "import sys, sparseblocks; "
        "print(sorted(m for m in sys.modules if m.startswith(('sparseblocks.recipes', 'sparseblocks.bench'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
