"""Name -> function registries for each method family (timm's ``@register_model`` idea).
The one helper every layer shares (datasets, architectures, methods), so it sits below them all.

A registry also owns its methods' option schemas: a method's options are its keyword-only
parameters, so config validation asks the family's registry, never a list kept elsewhere."""
from __future__ import annotations

import inspect
import typing
from typing import Any, Callable, Generic, Iterator, TypeVar

from pydantic import ConfigDict, ValidationError, create_model

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

    def check(self, name: str) -> str:
        """``name`` if registered; otherwise a ValueError that lists what is."""
        if name not in self._items:
            raise ValueError(f"unknown {self.family} {name!r}; allowed: {', '.join(self.names())}")
        return name

    def options(self, name: str, given: dict[str, Any]) -> dict[str, Any]:
        """Validate ``given`` against the method's own option schema: its keyword-only
        parameters, their annotations (pydantic constraints included) and defaults. Returns
        the options with defaults filled in; a ValueError names the first bad option."""
        fn = self[name]
        hints = typing.get_type_hints(fn, include_extras=True)  # annotations are strings (PEP 563)
        fields = {p.name: (hints[p.name], p.default) for p in inspect.signature(fn).parameters.values()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY}
        schema = create_model(f"{name}_options", __config__=ConfigDict(extra="forbid", allow_inf_nan=False), **fields)
        try:
            return schema(**given).model_dump()
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            allowed = ", ".join(fields) or "no options"
            raise ValueError(f"{key} = {err.get('input')!r}: {err['msg']} (options of {name}: {allowed})") from None
