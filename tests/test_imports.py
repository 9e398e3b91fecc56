"""The package's module-level imports form no cycle.

Every module of :mod:`cloudlets` is parsed (never imported); the imports run
when the module is imported are collected: those at module level, in class
bodies and under ``if``/``try``/``with``, not those inside functions nor
under ``if TYPE_CHECKING:``. An edge goes to the module imported (``from a
import b`` to ``a.b`` when that is a module, else to ``a``) and to every
package on its way that the importer is not inside of: importing
``cloudlets.rootfs.stream`` from ``cloudlets.disk`` runs
``cloudlets/rootfs/__init__.py`` too.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

import cloudlets

Graph = Mapping[str, Iterable[str]]


def _modules(package: str, path: Iterable[str]) -> dict[str, tuple[Path, bool]]:
    """Every module under a package: name to (source file, is a package)."""
    found = {package: (Path(next(iter(path))) / "__init__.py", True)}
    for info in pkgutil.walk_packages(list(path), prefix=package + "."):
        spec = info.module_finder.find_spec(info.name, None)  # type: ignore[call-arg]
        assert spec is not None and spec.origin is not None, info.name
        found[info.name] = (Path(spec.origin), info.ispkg)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _executed(body: Iterable[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements run when ``body`` runs at import time."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _executed(node.body)
            yield from _executed(node.orelse)
        elif isinstance(node, ast.Try | ast.TryStar):
            for block in (node.body, node.orelse, node.finalbody,
                          *(handler.body for handler in node.handlers)):
                yield from _executed(block)
        elif isinstance(node, (ast.ClassDef, ast.With, ast.For, ast.While)):
            yield from _executed(node.body)
            if isinstance(node, (ast.For, ast.While)):
                yield from _executed(node.orelse)


def imports_of(name: str, source: str, *, is_package: bool, known: Iterable[str]) -> set[str]:
    """The modules of ``known`` that importing module ``name`` imports.

    :param name: the module's dotted name.
    :param source: its source text.
    :param is_package: whether it is a package's ``__init__``.
    :param known: the dotted names of the package's modules.
    """
    modules = set(known)
    here = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _executed(ast.parse(source).body):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module or ""
        targets.add(base)
        for alias in node.names:
            if f"{base}.{alias.name}" in modules:
                targets.add(f"{base}.{alias.name}")
    edges: set[str] = set()
    for target in targets:
        parts = target.split(".")
        for depth in range(1, len(parts) + 1):
            step = ".".join(parts[:depth])
            inside = name == step or name.startswith(step + ".")
            if step in modules and not inside:
                edges.add(step)
    return edges


def find_cycle(graph: Graph) -> list[str] | None:
    """A cycle of the graph, as the path ``[a, b, ..., a]``, or ``None``.

    :param graph: each node to the nodes it has an edge to.
    """
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path = [start]
        stack = [iter(sorted(graph.get(start, ())))]
        while stack:
            node = next(stack[-1], None)
            if node is None:
                stack.pop()
                done.add(path.pop())
            elif node in path:
                return [*path[path.index(node):], node]
            elif node not in done:
                path.append(node)
                stack.append(iter(sorted(graph.get(node, ()))))
    return None


def import_graph(package: str = "cloudlets") -> dict[str, set[str]]:
    """The module-level import graph inside ``package``."""
    root = __import__(package)
    modules = _modules(package, root.__path__)
    return {name: imports_of(name, path.read_text(encoding="utf-8"), is_package=is_pkg,
                             known=modules)
            for name, (path, is_pkg) in modules.items()}


# -- the cycle finder and the parser can fail ---------------------------------------


def test_find_cycle_names_the_cycle_of_a_small_graph() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"x"}}) == ["x", "x"]


def test_find_cycle_accepts_a_graph_without_cycle() -> None:
    graph = {"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}
    assert find_cycle(graph) is None


def test_imports_of_follows_only_what_runs_at_import_time() -> None:
    known = {"p", "p.a", "p.b", "p.c", "p.d", "p.e", "p.sub", "p.sub.x", "p.sub.y"}
    source = """
from __future__ import annotations
from typing import TYPE_CHECKING
import os
from .. import a
from . import x
if TYPE_CHECKING:
    from p import b
else:
    import p.e
try:
    from .. import nothing
except ImportError:
    pass
class K:
    from p import d
def later():
    from p import c
"""
    assert imports_of("p.sub.y", source, is_package=False,
                      known=known) == {"p.a", "p.sub.x", "p.d", "p.e"}
    assert imports_of("p.sub", "from . import x\nfrom .x import y\nimport p.a\n",
                      is_package=True, known=known) == {"p.sub.x", "p.a"}
    assert imports_of("p.a", "from .sub.y import z\n", is_package=False,
                      known=known) == {"p.sub", "p.sub.y"}


def test_the_real_graph_is_not_empty() -> None:
    graph = import_graph()
    assert "cloudlets.renderer" in graph
    assert "cloudlets.errors" in graph["cloudlets.renderer"]


# -- the package ----------------------------------------------------------------------


def test_cloudlets_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    if cycle is not None:
        pytest.fail("import cycle: " + " -> ".join(cycle))


def test_every_module_is_found() -> None:
    names = set(import_graph())
    assert {"cloudlets", "cloudlets.errors", "cloudlets.drivers.providers"} <= names
    assert all(name == "cloudlets" or name.startswith("cloudlets.") for name in names)
    assert cloudlets.__name__ == "cloudlets"


# -- the packages split from single modules keep their names --------------------------

_KEPT_NAMES = {
    "cloudlets.rootfs": ["METADATA_PATH", "ArchivePolicy", "Compression", "Entry", "EntryType",
                         "RootTree", "TreeStream", "detect_compression", "image_metadata",
                         "read_tarball"],
    "cloudlets.fetch": ["DownloadCancelled", "DownloadRestarted", "DownloadWatch",
                        "FetchResult", "Fetcher", "RetryPolicy", "UrlPolicy", "check_sha256"],
    "cloudlets.drivers.storage.san": ["HEADER_SIZE", "SANStorage", "redact_target"],
}


@pytest.mark.parametrize("package", sorted(_KEPT_NAMES))
def test_split_packages_export_what_the_modules_did(package: str) -> None:
    module = importlib.import_module(package)
    missing = [name for name in _KEPT_NAMES[package] if not hasattr(module, name)]
    assert not missing, f"{package} lost {missing}"
    assert sorted(module.__all__) == sorted(_KEPT_NAMES[package])


def test_the_san_driver_keeps_its_class_path() -> None:
    from cloudlets.drivers.providers import get_driver

    driver = get_driver("storage", "san")
    assert f"{driver.__module__}.{driver.__qualname__}" == \
        "cloudlets.drivers.storage.san.SANStorage"


def test_no_module_of_a_split_package_imports_its_own_package_face() -> None:
    # the package's __init__ imports its modules: one importing it back runs up
    graph = import_graph()
    for package in _KEPT_NAMES:
        for name, source in _modules(package, importlib.import_module(package).__path__).items():
            if name == package:
                continue
            tree = ast.parse(source[0].read_text(encoding="utf-8"))
            faces = [node.lineno for node in _executed(tree.body)
                     if isinstance(node, ast.ImportFrom) and node.module == package]
            assert not faces, f"{name} imports {package} at line {faces}"
        assert graph[package], package
