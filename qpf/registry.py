"""Name -> component registries, filled explicitly where the components are defined.

A component is registered under the ``type`` name of its config dataclass (``qpf.config``).
Each registry lives beside its components and lists them in one table, so using a registry
imports what fills it (no import side effects): ``BANKS`` in ``qpf.layers.banks``,
``COUPLERS`` in ``qpf.layers.coupler``, ``MEMORIES`` in ``qpf.layers.memory``, ``BACKBONES``
in ``qpf.layers.backbones``, the model families in ``qpf.zoo``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> component map with clear errors for unknown or duplicate names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    @classmethod
    def of(cls, kind: str, entries: Mapping[str, T]) -> Registry[T]:
        """A registry holding exactly ``entries`` (name -> component)."""
        registry: Registry[T] = cls(kind)
        for name, obj in entries.items():
            registry.register(name)(obj)
        return registry

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
