"""The package's shape: the library imports no script (experiments/, data_prep/), its modules import
one another without cycles (function-local imports included, subpackages too), and the grid package
reaches the training code through one module. ``python -m pytest tests/test_structure.py`` is the check."""

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


def packages() -> list[str]:
    return sorted(name for name, path in library_modules().items() if path.endswith("__init__.py"))


def test_the_library_has_its_subpackages():
    assert {"lgmrec_jax", "lgmrec_jax.configs", "lgmrec_jax.grid"} <= set(packages())
    assert {"lgmrec_jax.grid.spec", "lgmrec_jax.grid.runner", "lgmrec_jax.grid.merge"} <= set(library_modules())


def test_no_two_library_modules_import_each_other():
    graph = import_graph()
    # The package's __init__ is imported by every submodule; it must import none of them back.
    assert {m for m in graph.get("lgmrec_jax", set()) if m != "lgmrec_jax.configs"} == set()
    # Likewise a subpackage's __init__ imports none of its own modules.
    for package in packages():
        if package != "lgmrec_jax":
            assert {m for m in graph[package] if m.startswith(f"{package}.")} == set(), package
    graph.pop("lgmrec_jax", None)
    for deps in graph.values():
        deps.discard("lgmrec_jax")
    assert cycles(graph) == []


# The training code the grid package calls (lgmrec_jax.grid.training is the one module that imports it).
TRAINING_MODULES = ("lgmrec_jax.group", "lgmrec_jax.group_engine", "lgmrec_jax.run", "lgmrec_jax.loop",
                    "lgmrec_jax.engine", "lgmrec_jax.pmap_engine", "lgmrec_jax.step")


def test_the_grid_reaches_the_training_code_through_one_module():
    reaching = sorted({name for name, path in library_modules().items() if name.startswith("lgmrec_jax.grid")
                       for m in imports_of(path) if m in TRAINING_MODULES})
    assert reaching == ["lgmrec_jax.grid.training"]


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
