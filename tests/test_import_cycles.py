"""No import loops among the project's modules: imports point down (entry points -> recaption -> alip_hf ->
modeling_alip), so that each module can be read, tested and changed knowing only those below it.

Every import counts, wherever it stands: at module level, inside a function (a deferred import is still a
dependency) and under `if TYPE_CHECKING:` (the annotation still ties the two modules), plus `lazy_import("...")`
and `importlib.import_module("...")` with a literal name.
"""

import ast
from pathlib import Path

from conftest import REPO_ROOT

PACKAGES = ("alip_hf", "modeling_alip", "recaption")
ENTRY_POINTS = ("train.py", "eval.py")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages and the checkout's entry points."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for name in ENTRY_POINTS:
        modules[Path(name).stem + " (entry point)"] = REPO_ROOT / name
    return modules


def imported_names(path: Path, module: str) -> list[tuple[str, int]]:
    """`(dotted name, line)` of every import in the file, relative ones resolved, `from X import y` as `X.y`
    (a submodule when one exists, else the name is looked up as `X`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("lazy_import", "import_module")):
            found.append((node.args[0].value, node.lineno))
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported project module: line of the first such import}."""
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        edges = {}
        for name, line in imported_names(path, module.removesuffix(" (entry point)")):
            while name and name not in modules:  # `pkg.mod.Class` -> `pkg.mod`; outside names end empty
                name = name.rpartition(".")[0]
            if name and name != module:
                edges.setdefault(name, line)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_project_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40 and "alip_hf.evaluation.cards" in graph  # the scan sees the whole project
    loops = cycles(graph)
    described = ["\n".join(f"  {a} imports {b} (line {graph[a][b]})" for a in loop for b in loop if b in graph[a])
                 for loop in loops]
    assert not loops, "import cycles:\n" + "\n\n".join(described)


def test_the_cycle_finder_sees_deferred_and_type_checking_imports(tmp_path):
    """The scan itself: a loop closed only by an import inside a function or under TYPE_CHECKING is found."""
    a = tmp_path / "a.py"
    a.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n")
    b = tmp_path / "b.py"
    b.write_text("def f():\n    from pkg import a\n    return a\n")
    graph = {"pkg.a": {}, "pkg.b": {}}
    for name, path in (("pkg.a", a), ("pkg.b", b)):
        for imported, line in imported_names(path, name):
            while imported and imported not in graph:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                graph[name][imported] = line
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
