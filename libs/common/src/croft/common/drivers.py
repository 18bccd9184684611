"""One registry shape for every driver family (compute, storage, network).

A family declares its drivers as a plain `name -> "module:Class"` map, as Incus's
`load.go` does; a driver's module is imported only when it is first asked for, so that
listing the names never imports liblxc, libvirt or rados. Every family raises the same
error for a name it does not know: InvalidArgument, since the name always comes from
a caller (a pool's `driver`, a network's `type`, an instance's `type`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Generic, TypeVar

from croft.common.errors import InvalidArgument

T = TypeVar("T")


class Registry(Generic[T]):
    """The drivers of one family: `names()`, `get(name)` -> class, `load(name, ...)` -> instance."""

    def __init__(self, family: str, base: type[T], entries: Mapping[str, str]) -> None:
        self.family = family
        self.base = base
        self._entries = dict(entries)
        self._loaded: dict[str, type[T]] = {}

    def names(self) -> list[str]:
        """Every driver name croft knows (not all may run on this host)."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> type[T]:
        """The class registered under `name`; InvalidArgument for an unknown name."""
        cls = self._loaded.get(name)
        if cls is not None:
            return cls
        try:
            target = self._entries[name]
        except KeyError:
            known = ", ".join(self.names())
            raise InvalidArgument(
                f'Unknown {self.family} driver "{name}" (known: {known})'
            ) from None
        module_name, class_name = target.split(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{target} is not a {self.base.__name__}")
        self._loaded[name] = cls
        return cls

    def load(self, name: str, *args: object, **kwargs: object) -> T:
        """A new instance of the driver registered under `name`."""
        return self.get(name)(*args, **kwargs)
