"""Name -> function registries for each method family (timm's ``@register_model`` idea)."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """A plain dict of named functions, filled by the ``register`` decorator."""

    def __init__(self, family: str):
        self.family = family
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.family} {name!r} is registered twice")
            self._items[name] = fn
            return fn

        return add

    def __getitem__(self, name: str) -> F:
        if name not in self._items:
            raise KeyError(f"unknown {self.family} {name!r}; choose one of {self.names()}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        return sorted(self._items)
