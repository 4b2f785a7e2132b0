"""docs/architecture.md stays true to the code (no Redis needed).

* its module map names every ``.py`` file of ``exq_fast/`` (``__init__.py``,
  ``__main__.py`` and ``_version.py`` included), and only files that exist;
* the layer of each module in the map agrees with the layer table;
* the import layering it documents holds: computed with ``ast`` from every
  ``import`` of the package (inside functions and under ``TYPE_CHECKING``
  included), no module imports from a higher layer, except the edges the
  page lists under "Upward imports", and the import graph has no cycle.

The layer order is read from the page itself, so moving a module means
editing the page. The last tests feed the checkers wrong inputs, to show
that they can fail.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "exq_fast"
DOC = ROOT / "docs" / "architecture.md"

_HEADING = re.compile(r"^(#+)\s+(.*?)\s*$")
_MODULE_ROW = re.compile(r"^\|\s*`(exq_fast/[\w/]+\.py)`\s*\|\s*(\d+)\s*\|")
_LAYER_ROW = re.compile(r"^\|\s*(\d+)\s*\|[^|]*\|([^|]*)\|\s*$")
_UPWARD_ITEM = re.compile(
    r"^\s*[-*]\s+`(exq_fast/[\w/]+\.py)`\s*(?:→|->)\s*`(exq_fast/[\w/]+\.py)`")

Graph = Mapping[str, set[str]]
"""Module file (``exq_fast/x.py``) -> the package's module files it imports."""


# -- reading the page ------------------------------------------------------------------


def section(text: str, title: str) -> str:
    """The body of the heading whose text ends with ``title``, up to the next heading
    of the same or a higher level."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = _HEADING.match(line)
        if match and match.group(2).endswith(title):
            level = len(match.group(1))
            body = []
            for other in lines[index + 1:]:
                found = _HEADING.match(other)
                if found and len(found.group(1)) <= level:
                    break
                body.append(other)
            return "\n".join(body)
    raise AssertionError(f"docs/architecture.md has no section {title!r}")


def module_table(text: str) -> dict[str, int]:
    """The module map: module file -> layer. Fails on a module listed twice."""
    layers: dict[str, int] = {}
    for line in section(text, "Module map").splitlines():
        match = _MODULE_ROW.match(line)
        if match:
            path, layer = match.group(1), int(match.group(2))
            assert path not in layers, f"{path} is listed twice in the module map"
            layers[path] = layer
    assert layers, "the module map has no rows"
    return layers


def layer_table(text: str, files: list[str]) -> dict[str, int]:
    """The layer table of the import-layering section: module file -> layer.

    Names are written without ``exq_fast/`` and ``.py``; ``middleware/*`` is every
    file of the middleware package.
    """
    layers: dict[str, int] = {}
    body = section(text, "Import layering").split("### ")[0]
    for line in body.splitlines():
        match = _LAYER_ROW.match(line)
        if not match:
            continue
        for name in re.findall(r"`([\w/*]+)`", match.group(2)):
            if name.endswith("/*"):
                prefix = f"{PACKAGE}/{name[:-1]}"
                paths = [f for f in files if f.startswith(prefix)]
                assert paths, f"layer table: {name} matches no file"
            else:
                paths = [f"{PACKAGE}/{name}.py"]
            for path in paths:
                layers[path] = int(match.group(1))
    return layers


def upward_exceptions(text: str) -> set[tuple[str, str]]:
    """The ``(importer, imported)`` edges the page allows to go upward."""
    found = set()
    for line in section(text, "Upward imports").splitlines():
        match = _UPWARD_ITEM.match(line)
        if match:
            found.add((match.group(1), match.group(2)))
    return found


# -- reading the code ------------------------------------------------------------------


def package_files() -> list[str]:
    """Every ``.py`` file of the package, as ``exq_fast/...`` paths."""
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / PACKAGE).rglob("*.py"))


def dotted(path: str) -> str:
    """``exq_fast/middleware/job.py`` -> ``exq_fast.middleware.job`` (packages: no
    ``__init__``)."""
    parts = path[:-len(".py")].split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _targets(node: ast.Import | ast.ImportFrom, package: str, known: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = package.split(".")
        base = base[:len(base) - node.level + 1]
        source = ".".join([*base, node.module] if node.module else base)
    else:
        source = node.module or ""
    # ``from X import name``: the submodule X.name if there is one, else X itself.
    return [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
            for alias in node.names]


def imports_of(path: str, by_name: Mapping[str, str]) -> set[str]:
    """The package's module files that ``path`` imports, anywhere in the file."""
    name = dotted(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"), path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        for target in _targets(node, package, set(by_name)):
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue  # stdlib or a third-party package
            assert target in by_name, f"{path}: cannot resolve the import of {target!r}"
            if target != name:
                found.add(by_name[target])
    return found


def import_graph() -> dict[str, set[str]]:
    """Every module file -> the module files it imports."""
    files = package_files()
    by_name = {dotted(f): f for f in files}
    return {f: imports_of(f, by_name) for f in files}


# -- the checks ------------------------------------------------------------------------


def upward_imports(graph: Graph, layers: Mapping[str, int],
                   allowed: set[tuple[str, str]]) -> list[str]:
    """Every import from a higher layer that ``allowed`` does not list."""
    return [f"{src} (layer {layers[src]}) imports {dst} (layer {layers[dst]})"
            for src, targets in sorted(graph.items()) for dst in sorted(targets)
            if layers[dst] > layers[src] and (src, dst) not in allowed]


def find_cycle(graph: Graph) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


# -- the page against the code ---------------------------------------------------------


def test_module_map_names_every_module() -> None:
    missing = sorted(set(package_files()) - set(module_table(_doc())))
    assert not missing, f"modules missing from the module map of docs/architecture.md: {missing}"


def test_module_map_names_only_existing_modules() -> None:
    extra = sorted(set(module_table(_doc())) - set(package_files()))
    assert not extra, f"the module map of docs/architecture.md names no such file: {extra}"


def test_layer_table_agrees_with_module_map() -> None:
    text = _doc()
    table, modules = layer_table(text, package_files()), module_table(text)
    differ = sorted(f"{path}: layer table {table.get(path)}, module map {modules.get(path)}"
                    for path in set(table) | set(modules) if table.get(path) != modules.get(path))
    assert not differ, "\n".join(differ)


def test_no_import_goes_up_a_layer() -> None:
    text = _doc()
    layers = module_table(text)
    graph = import_graph()
    assert set(graph) <= set(layers), "every module needs a layer (see the module map test)"
    found = upward_imports(graph, layers, upward_exceptions(text))
    assert not found, "imports against the layering of docs/architecture.md:\n" + "\n".join(found)


def test_listed_upward_imports_are_real() -> None:
    text = _doc()
    layers, graph = module_table(text), import_graph()
    for src, dst in upward_exceptions(text):
        assert dst in graph.get(src, set()), f"listed upward import {src} -> {dst} does not exist"
        assert layers[dst] > layers[src], f"listed upward import {src} -> {dst} is not upward"


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}"


def test_graph_sees_function_level_and_package_imports() -> None:
    graph = import_graph()
    assert "exq_fast/keys.py" in graph["exq_fast/embedded.py"]  # inside a function
    assert "exq_fast/__init__.py" in graph["exq_fast/cli.py"]  # from . import __version__
    assert "exq_fast/middleware/__init__.py" in graph["exq_fast/worker.py"]
    assert "exq_fast/inflight.py" in graph["exq_fast/middleware/base.py"]  # TYPE_CHECKING


# -- the checkers can fail -------------------------------------------------------------


def test_checker_catches_a_wrong_layer() -> None:
    layers = module_table(_doc())
    wrong = {**layers, "exq_fast/keys.py": max(layers.values()) + 1}
    found = upward_imports(import_graph(), wrong, set())
    assert any("imports exq_fast/keys.py" in line for line in found)
    allowed = {(src, "exq_fast/keys.py") for src in layers}
    assert not upward_imports(import_graph(), wrong, allowed)


def test_checker_catches_a_missing_or_unknown_row() -> None:
    text = _doc()
    without = "\n".join(line for line in text.splitlines()
                        if not line.startswith("| `exq_fast/heartbeat.py`"))
    assert "exq_fast/heartbeat.py" not in module_table(without)
    with_ghost = text.replace("| `exq_fast/app.py` |", "| `exq_fast/ghost.py` | 5 | x |\n"
                              "| `exq_fast/app.py` |", 1)
    assert set(module_table(with_ghost)) - set(package_files()) == {"exq_fast/ghost.py"}


def test_checker_catches_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
