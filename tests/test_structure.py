"""The shape of the code, checked from its source: the packages form layers that import only downwards,
no module imports itself back through others, and modules and functions stay short enough to read.

Layers, bottom to top (a module may import its own package and anything below its layer):

    errors, version, files, console  ->  config  ->  data, backbones, metrics  ->  accel, methods  ->  engine
    ->  train, pretrain  ->  generate  ->  inference, study  ->  demo  ->  the package root with the CLI

Run as a script (``python tests/test_structure.py``) it prints the package import graph.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = [
    {"medpeft.errors", "medpeft.version", "medpeft.files", "medpeft.console"},
    {"medpeft.config"},
    {"medpeft.data", "medpeft.backbones", "medpeft.metrics"},
    {"medpeft.accel", "medpeft.methods"},
    {"medpeft.engine"},
    {"medpeft.train", "medpeft.pretrain"},
    {"medpeft.generate"},
    {"medpeft.inference", "medpeft.study"},
    {"medpeft.demo", "medpeft.demo_generative"},
    {"medpeft"},  # the package root with the command line (the medpeft.cli package, medpeft.__main__)
]
MAX_MODULE_LINES = 400
MAX_RECIPE_MODULE_LINES = 300  # the modules that replaced the one training recipe
RECIPE_PACKAGES = ("medpeft.train", "medpeft.engine", "medpeft.pretrain")
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its __init__)."""
    found = {}
    for path in sorted((SRC / "medpeft").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The medpeft modules that `path` imports, at any depth of its code (function-level imports too)."""
    found, stack = set(), [ast.parse(path.read_text())]
    while stack:
        node = stack.pop()
        if _type_checking(node):
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "medpeft"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "medpeft":
            for alias in node.names:  # `from medpeft.engine import rundir` imports the module rundir
                name = f"{node.module}.{alias.name}"
                found.add(name if name in known else node.module)
    return found


def package(module: str) -> str:
    """The layered unit a module belongs to: its top-level subpackage or module; the root, the CLI and
    ``python -m medpeft`` are one unit, 'medpeft'."""
    unit = ".".join(module.split(".")[:2])
    return "medpeft" if unit in ("medpeft.cli", "medpeft.__main__") else unit


def layer(module: str) -> int:
    unit = package(module)
    for index, units in enumerate(LAYERS):
        if unit in units:
            return index
    raise AssertionError(f"{unit} is in no layer of tests/test_structure.py: place it")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def test_every_import_points_down_the_layers_or_within_its_own_package():
    wrong = [f"{module} imports {target}" for module, targets in graph().items() for target in sorted(targets)
             if package(target) != package(module) and layer(target) >= layer(module)]
    assert not wrong, "upward or sideways imports:\n" + "\n".join(wrong)


def test_no_module_imports_a_private_name_of_another_package():
    wrong = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medpeft"):
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
                if private and package(node.module) != package(name):
                    wrong.append(f"{name} imports {', '.join(private)} from {node.module}")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_itself_back_through_others():
    edges, cycles = graph(), []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [module, target]))
            elif target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
    assert not cycles, "import loops:\n" + "\n".join(cycles)


def test_the_graph_sees_function_level_and_package_imports(tmp_path):
    """The checks above can fail: an import inside a function is an edge, `from medpeft.x import y` is an
    edge to the module medpeft.x.y where there is one."""
    source = tmp_path / "probe.py"
    source.write_text("from medpeft.engine import rundir\n\ndef f():\n    from medpeft.cli import main\n")
    found = imports(source, modules())
    assert found == {"medpeft.engine.rundir", "medpeft.cli"}
    assert layer("medpeft.cli") > layer("medpeft.engine.rundir") > layer("medpeft.methods.lora")


def test_modules_and_functions_stay_short():
    long = []
    for name, path in modules().items():
        lines = len(path.read_text().splitlines())
        limit = MAX_RECIPE_MODULE_LINES if name.startswith(RECIPE_PACKAGES) else MAX_MODULE_LINES
        if lines > limit:
            long.append(f"{name}: {lines} lines (at most {limit})")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length} lines (at most {MAX_FUNCTION_LINES})")
    assert not long, "\n".join(long)


if __name__ == "__main__":  # the package-level import graph, bottom layer first
    edges: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph().items():
        edges[package(module)] |= {package(t) for t in targets} - {package(module)}
    for units in LAYERS:
        for unit in sorted(units):
            print(f"{unit} -> {', '.join(sorted(edges.get(unit, ()))) or '(nothing)'}")
    sys.exit(0)
