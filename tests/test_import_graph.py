"""No import loop between mixserve's packages or between the modules inside them.

Every module of every package pyproject.toml maps (kernels/ -> mixserve.kernels, ...) is parsed with
`ast`, and each `import` / `from ... import` anywhere in it counts, those inside functions too: a
lazy import is still a dependency, it only moves the failure to run time. Two graphs are checked:
modules (mixserve.workers.config -> mixserve.workers.gguf_checkpoint) and packages (cluster ->
workers); a loop in either fails the test with the loop spelled out. Also the layer rule of
kernels/: it imports nothing from another mixserve package. `mixserve bench` reaches the benchmarks
through an entry point (pyproject.toml), not an import: cluster/ never imports bench/.
"""

import ast
import tomllib
from pathlib import Path

from tests.helpers import REPOSITORY

PREFIX = "mixserve."


def _package_folders() -> dict[str, Path]:
    """{"mixserve.kernels": <repository>/kernels, ...} as pyproject.toml's package-dir declares them."""
    setup = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {package: REPOSITORY / folder for package, folder in setup["package-dir"].items()}


def _modules() -> dict[str, Path]:
    """Every module's dotted name and file; a package's __init__.py is the package's own name."""
    modules = {}
    for package, folder in _package_folders().items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The mixserve modules `module` imports anywhere in its file (relative imports resolved); for
    `from package import name`, the module package.name when there is one, else the package."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target not in modules and "." in target:  # `import mixserve.a.b` -> mixserve.a.b, a module
                target = target.rsplit(".", 1)[0]
            if target in modules and target != module:
                found.add(target)
    return found


def _module_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {module: _imported(module, path, modules) for module, path in modules.items()}


def _package_of(module: str) -> str:
    return module.removeprefix(PREFIX).split(".")[0]


def _package_graph(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    packages = {_package_of(module): set() for module in modules}
    for module, imports in modules.items():
        packages[_package_of(module)] |= {_package_of(target) for target in imports} - {_package_of(module)}
    return packages


def _edges_named(modules: dict[str, set[str]], loop: list[str]) -> str:
    """Which module imports which along a package loop (the edges to break)."""
    steps = []
    for source, target in zip(loop, loop[1:]):
        steps += [f"{m} -> {t}" for m, imports in sorted(modules.items()) if _package_of(m) == source
                  for t in sorted(imports) if _package_of(t) == target]
    return "; ".join(steps)


def _loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """One loop through each strongly connected part of the graph that has one (Tarjan, then a path
    back to the start inside the part), each as [a, b, ..., a]."""
    index, low, stack, on_stack, parts = {}, {}, [], set(), []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            part = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                part.add(member)
                if member == node:
                    break
            if len(part) > 1:
                parts.append(part)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    loops = []
    for part in parts:
        start = min(part)
        paths, seen = [[start]], {start}
        while paths:  # breadth first: the shortest way back to start
            path = paths.pop(0)
            targets = sorted(graph[path[-1]] & part)
            if start in targets:
                loops.append(path + [start])
                break
            for target in targets:
                if target not in seen:
                    seen.add(target)
                    paths.append(path + [target])
    return loops


def test_the_graph_sees_lazy_and_relative_imports():
    graph = _module_graph()
    assert "mixserve.workers.config" in graph["mixserve.workers.engine"]  # `from .config import ...`
    assert "mixserve.router.generate_pb2" in graph["mixserve.router.grpc_service"]  # `from . import generate_pb2`
    assert "mixserve.workers.ray_executor" in graph["mixserve.workers.executor"]  # inside make_executor
    assert {"kernels", "workers", "router", "cluster", "bench", "random_models"} <= set(_package_graph(graph))


def test_the_loop_finder_names_a_loop():
    assert _loops({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _loops({"a": {"b"}, "b": set()}) == []


def test_no_import_loop_between_modules():
    loops = _loops(_module_graph())
    assert not loops, "import loops between modules: " + "; ".join(" -> ".join(loop) for loop in loops)


def test_no_import_loop_between_packages():
    modules = _module_graph()
    graph = _package_graph(modules)
    loops = _loops(graph)
    assert not loops, "import loops between packages: " + "; ".join(
        f"{' -> '.join(loop)} ({_edges_named(modules, loop)})" for loop in loops)


def test_kernels_import_no_other_mixserve_package():
    assert _package_graph(_module_graph())["kernels"] == set()


def test_bench_is_a_mixserve_subcommand_by_its_entry_point():
    from mixserve.cluster.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert "bench" in commands, ("`mixserve bench` is missing: the installed metadata predates the entry point "
                                 "group mixserve.commands in pyproject.toml; reinstall (make venv)")
    assert "bench" not in _package_graph(_module_graph())["cluster"]
