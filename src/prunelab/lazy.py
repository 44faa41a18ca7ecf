"""Attributes of a package imported on first use (PEP 562), so that importing the package does
not import what only some runs need (torchvision for the image datasets and ResNet-18)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any


def lazy_attributes(
    package: str, lazy: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose names in ``lazy`` (name -> module) are
    imported from their module on first access and then cached in ``namespace`` (the
    package's ``globals()``)."""

    def __getattr__(name: str) -> Any:
        module = lazy.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted([*namespace, *lazy])

    return __getattr__, __dir__


class LazyClasses(Mapping):
    """``{option name: class}`` whose classes are looked up in ``package`` (which may import
    them lazily) when asked for."""

    def __init__(self, package: str, names: dict[str, str]) -> None:
        self._package = package
        self._names = names

    def __getitem__(self, key: str) -> Any:
        return getattr(importlib.import_module(self._package), self._names[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
