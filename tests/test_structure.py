"""The package's shape: the library imports no script (experiments/, data_prep/) and its modules import
one another without cycles (function-local imports included). ``python -m pytest tests/test_structure.py``
is the check."""

import ast
import os

from conftest import REPO

PACKAGE = os.path.join(REPO, "lgmrec_jax")


def module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-len(".py")].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def imports_of(path: str) -> set[str]:
    """Every module an import statement in the file names (top-level or inside a function)."""
    with open(path) as handle:
        tree = ast.parse(handle.read(), path)
    package = module_name(path) if path.endswith("__init__.py") else module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def library_modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                found[module_name(path)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    modules = library_modules()
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_library_imports_no_script():
    offenders = sorted(f"{name} imports {m}" for name, path in library_modules().items()
                       for m in imports_of(path) if m.split(".")[0] in ("experiments", "data_prep"))
    assert offenders == []


def test_no_two_library_modules_import_each_other():
    graph = import_graph()
    # The package's __init__ is imported by every submodule; it must import none of them back.
    assert {m for m in graph.get("lgmrec_jax", set()) if m != "lgmrec_jax.configs"} == set()
    graph.pop("lgmrec_jax", None)
    for deps in graph.values():
        deps.discard("lgmrec_jax")
    assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
