"""The helpers every service shares: the driver registry, the reverter, per-key locks."""

from __future__ import annotations

import asyncio

import pytest

from croft.common.drivers import Registry
from croft.common.errors import InvalidArgument, NotFound
from croft.common.locks import KeyedLock
from croft.common.revert import Reverter


class Base:
    pass


def test_a_registry_loads_by_name_and_refuses_an_unknown_name_with_the_known_ones() -> None:
    registry = Registry("thing", Base, {"b": "croft.common.drivers:Registry", "a": "x:Y"})
    assert registry.names() == ["a", "b"]
    assert "a" in registry and "z" not in registry
    with pytest.raises(InvalidArgument, match='Unknown thing driver "z" \\(known: a, b\\)'):
        registry.get("z")
    with pytest.raises(TypeError, match="is not a Base"):
        registry.get("b")  # a class that is not of the family is never handed out


async def test_a_reverter_undoes_newest_first_skips_not_found_and_keeps_going() -> None:
    done: list[str] = []

    async def step(name: str, exc: Exception | None = None) -> None:
        done.append(name)
        if exc:
            raise exc

    with pytest.raises(RuntimeError, match="boom"):
        async with Reverter() as revert:
            revert.add(lambda: step("first"))
            revert.add(lambda: step("gone", NotFound("gone")))
            revert.add(lambda: step("broken", OSError("disk")))
            raise RuntimeError("boom")
    assert done == ["broken", "gone", "first"]


async def test_a_reverter_that_succeeded_undoes_nothing() -> None:
    done: list[str] = []

    async def step() -> None:
        done.append("undone")

    with pytest.raises(RuntimeError):
        async with Reverter() as revert:
            revert.add(step)
            revert.success()
            raise RuntimeError("after success")
    assert done == []


async def test_keyed_locks_serialize_one_key_and_are_dropped_when_free() -> None:
    locks: KeyedLock[str] = KeyedLock()
    order: list[str] = []

    async def hold(key: str, tag: str) -> None:
        async with locks.hold(key):
            order.append(f"{tag}+")
            await asyncio.sleep(0.01)
            order.append(f"{tag}-")

    await asyncio.gather(hold("a", "1"), hold("a", "2"), hold("b", "3"))
    assert order.index("1-") < order.index("2+")  # one key: one at a time
    assert order.index("3+") < order.index("1-")  # another key: not blocked
    assert len(locks) == 0
