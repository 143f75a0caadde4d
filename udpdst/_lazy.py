"""
A package's public names loaded from their modules on first use (PEP 562),
so that importing one submodule does not import the others: C{twistd udpdst
--help} and the reactor plugins must stay cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazyNames(
    namespace: dict[str, Any],
    homes: Mapping[str, str],
    computed: Mapping[str, Callable[[], Any]] | None = None,
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """
    The C{__getattr__} and C{__dir__} of a package whose module globals are
    C{namespace}: a name of C{homes} is imported from the module it names,
    one of C{computed} is what its function returns; either is then kept in
    C{namespace}, so that it is looked up once.
    """
    package = namespace["__name__"]
    computed = computed or {}

    def __getattr__(name: str) -> Any:
        if name in computed:
            value = computed[name]()
        elif name in homes:
            value = getattr(import_module(homes[name]), name)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(homes) | set(computed))

    return __getattr__, __dir__
