"""
The shape of the package, read from its source: the library (C{udpdst/} top
level) never imports the echo service (C{udpdst/echo/}), no two modules
import each other (also through imports inside functions), and the library's
import-time path carries no test double.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "udpdst"

#: Top-level modules that are not the library: the console tool (which may
#: read the service's config) and the former home of the service's
#: C{jsonLogObserver}, kept as an alias for one release.
NOT_LIBRARY = frozenset({"udpdst.check", "udpdst.__main__", "udpdst.logs"})


def moduleName(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {moduleName(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _typeCheckingOnly(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(name: str) -> dict[str, bool]:
    """
    The udpdst modules that module C{name} imports, each with whether the
    import runs when the module is imported (not inside a function).
    Imports under C{if TYPE_CHECKING:} never run and are left out.
    """
    tree = ast.parse(MODULES[name].read_text())
    found: dict[str, bool] = {}

    def visit(node: ast.AST, atImport: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _typeCheckingOnly(child):
                continue
            inFunction = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("udpdst"):
                        _add(alias.name, atImport)
            elif isinstance(child, ast.ImportFrom) and child.module:
                if child.module.startswith("udpdst"):
                    for alias in child.names:
                        sub = f"{child.module}.{alias.name}"
                        _add(sub if sub in MODULES else child.module, atImport)
            visit(child, atImport and not inFunction)

    def _add(target: str, atImport: bool) -> None:
        if target != name:
            found[target] = found.get(target, False) or atImport

    visit(tree, True)
    return found


GRAPH = {name: imports(name) for name in MODULES}


def library() -> list[str]:
    return [
        name
        for name in MODULES
        if not name.startswith("udpdst.echo") and name not in NOT_LIBRARY
    ]


@pytest.mark.parametrize("name", library())
def test_libraryNeverImportsTheService(name: str) -> None:
    service = [target for target in GRAPH[name] if target.startswith("udpdst.echo")]
    assert service == [], f"{name} imports {service}"


def test_noTwoModulesImportEachOther() -> None:
    """
    No cycle at all in the import graph, lazy imports included: arrows
    point one way.
    """
    visiting: list[str] = []
    done: set[str] = set()

    def walk(name: str) -> None:
        if name in done:
            return
        assert name not in visiting, " -> ".join(
            visiting[visiting.index(name) :] + [name]
        )
        visiting.append(name)
        for target in GRAPH.get(name, {}):
            # The package itself only names its submodules lazily.
            if target in MODULES and target not in ("udpdst", "udpdst.echo"):
                walk(target)
        visiting.pop()
        done.add(name)

    for name in MODULES:
        walk(name)


@pytest.mark.parametrize("name", library())
def test_noTestDoubleAtImport(name: str) -> None:
    """
    Only C{udpdst.testing} itself holds the test doubles; the rest of the
    library imports it, if at all, inside the branch that serves a memory
    reactor.
    """
    if name == "udpdst.testing":
        return
    assert not GRAPH[name].get("udpdst.testing", False), name


def test_theServiceOnlyLooksDown() -> None:
    """
    What the service imports of udpdst is the library or itself, never the
    console tool.
    """
    for name, targets in GRAPH.items():
        if name.startswith("udpdst.echo"):
            assert not set(targets) & {"udpdst.check", "udpdst.__main__"}, name
