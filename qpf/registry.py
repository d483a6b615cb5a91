"""Registries of named components: banks, couplers, backbones, memories and models.

A component is registered under the ``type`` name of its config dataclass
(``qpf.config``); the model looks modules up here, so a new bank is one config dataclass
plus one decorated module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> component map with clear errors for unknown or duplicate names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise KeyError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._entries))}"
            )
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        return name in self._entries


BANKS: Registry = Registry("bank")
COUPLERS: Registry = Registry("coupler")
BACKBONES: Registry = Registry("backbone")
MEMORIES: Registry = Registry("memory")
