"""Lazy package exports (PEP 562): a package's public names imported from their modules on first access.

A package keeps its ``__init__`` cheap by declaring where each name lives instead of importing it, so that
``import mtijax`` (and the CLI's start-up) does not pull in optax, orbax, matplotlib or pyarrow before a
technique needs them.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_exports(namespace: dict[str, Any], exports: Mapping[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for the package whose ``globals()`` is ``namespace``.

    ``exports``: public name -> ``"module"`` (the name is that module's attribute of the same name, or the
    module itself when its last component is the name) or ``"module:attribute"`` (exported under another
    name). A name is imported once and then kept in ``namespace``.
    """
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module_name, _, attribute = exports[name].partition(":")
        module = importlib.import_module(module_name)
        value = getattr(module, attribute) if attribute else (
            module if module_name.rsplit(".", 1)[-1] == name else getattr(module, name))
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
