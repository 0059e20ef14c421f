"""One registry shape for data sets, models, methods and proxies: a name -> entry map with one error sentence."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from rumflow.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries registered by name; `get` names the choices when a name is unknown."""

    def __init__(self, kind: str, hint: str = ""):
        self.kind = kind
        self.hint = hint
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name` (a second registration of the same name is a bug)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`."""
        return lambda entry: self.add(name, entry)

    def unknown(self, name: str) -> str:
        """The sentence for an unknown name (without the final period, for embedding)."""
        return f"unknown {self.kind} '{name}'; choose one of: {', '.join(sorted(self._entries))}{self.hint}"

    def get(self, name: str) -> T:
        """The entry registered as `name`, or a ConfigError listing the choices."""
        if name not in self._entries:
            raise ConfigError(self.unknown(name) + ".")
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()

    def keys(self):
        return self._entries.keys()
