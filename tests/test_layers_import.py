"""The package's layering, read from the source: each module imports only its own layer and the
ones below it, and no two modules import each other, directly or round a loop. Imports inside
functions count (they run too); imports under `if TYPE_CHECKING:` do not (they never run).
docs/architecture.md describes the layers."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "imagetx"

# lowest first; a module belongs to the layer of the longest name that is it or a package above it
LAYERS = [
    ("base", ["imagetx", "imagetx.errors", "imagetx.console", "imagetx.checks"]),
    ("system", ["imagetx.system"]),
    ("model", ["imagetx.model"]),  # tensors in, tensors out: reads no files, knows no data set
    ("data", ["imagetx.data"]),  # data/batches shapes a data set to a model's config
    ("storage", ["imagetx.storage"]),
    ("config", ["imagetx.config"]),
    ("training", ["imagetx.training"]),
    ("commands", ["imagetx.train", "imagetx.eval_bpd", "imagetx.eval_fid", "imagetx.sample", "imagetx.superres",
                  "imagetx.plot", "imagetx.export"]),
    ("serve", ["imagetx.serve"]),  # the web server: the commands' library functions behind HTTP
    ("cli", ["imagetx.cli"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    best, rank = "", None
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, rank = name, i
    assert rank is not None, f"{module} belongs to no layer: add it to LAYERS in {Path(__file__).name}"
    return rank


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _runtime_nodes(tree: ast.AST):
    """Every node except the bodies of `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = child.test if isinstance(child, ast.If) else None
            if test is not None and "TYPE_CHECKING" in ast.unparse(test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(module: str) -> set[str]:
    """The imagetx modules `module` imports (a name imported from a package counts as its
    submodule when there is one)."""
    path = MODULES[module]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, path.name == "__init__.py", node)
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_imports_only_its_layer_and_the_ones_below():
    wrong = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in GRAPH.items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not wrong, "imports that point up the layers:\n" + "\n".join(wrong)


def test_no_import_cycles():
    cycles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(module, path):
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_imports_inside_functions_and_skips_type_checking():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n"
                     "def f():\n    import b\n")
    names = {alias.name for n in _runtime_nodes(tree) if isinstance(n, ast.Import) for alias in n.names}
    assert names == {"b"}
    assert "imagetx.storage.checkpoint" in GRAPH["imagetx.training.rundir"]
    assert "imagetx.system.cpu" in GRAPH["imagetx.model.native"]  # imported inside a function
