"""The package layout stays as ARCHITECTURE.md draws it: no import circles (counting imports inside functions
too), no module importing another module's private names, and the library never importing the command line or
the report. Read from the source with ``ast``: nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LIBRARY = ("sstoken.selection", "sstoken.data", "sstoken.training", "sstoken.evaluation")
FRONT_ENDS = ("sstoken.cli", "sstoken.report")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sstoken_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import of sstoken code in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("sstoken"):
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("sstoken")]
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names in sstoken_imports(path):
            # `from sstoken.data import sources` imports the module sstoken.data.sources
            taken = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            for dependency in taken or [target]:
                if dependency in modules and dependency != name:
                    graph[name].add(dependency)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_circles_are_found_by_the_checker():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_no_module_imports_private_names_of_another():
    private = []
    for path in SRC.rglob("*.py"):
        for target, names in sstoken_imports(path):
            private += [f"{module_name(path)} takes {target}.{n}" for n in names
                        if n.startswith("_") and not n.endswith("__")]
    assert private == []


def test_the_library_never_imports_the_command_line_or_the_report():
    graph = import_graph()
    wrong = [f"{name} -> {dep}" for name, deps in graph.items() for dep in deps
             if name.startswith(LIBRARY) and dep.startswith(FRONT_ENDS)]
    assert wrong == []
