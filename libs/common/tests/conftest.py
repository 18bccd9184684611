"""Fixtures that start real etcd members (see croft.common.testing.etcd)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from croft.common.store.etcd import EtcdStore
from croft.common.testing.etcd import EtcdCluster, EtcdServer

TEMP_PREFIX = "croft-store-test-"


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """One etcd member shared by the tests of a session; each test works under its own
    key prefix (`key_prefix`), so tests do not see each other's keys."""
    with EtcdServer(prefix=TEMP_PREFIX) as server:
        yield server


@pytest.fixture
def own_etcd_server() -> Iterator[EtcdServer]:
    """A fresh etcd member for a test that compacts, kills or otherwise spoils it."""
    with EtcdServer(prefix=TEMP_PREFIX) as server:
        yield server


@pytest.fixture
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A fresh 3-member etcd cluster on loopback."""
    with EtcdCluster(size=3, prefix=TEMP_PREFIX) as cluster:
        yield cluster


@pytest.fixture
async def store(etcd_server: EtcdServer) -> AsyncIterator[EtcdStore]:
    store = EtcdStore(etcd_server.endpoints)
    await store.start()
    yield store
    await store.close()


@pytest.fixture
def key_prefix() -> str:
    return f"/croft-store-test/{uuid.uuid4().hex[:12]}/"


@pytest.fixture(scope="session")
def captured_records() -> list[tuple[str, dict[str, Any]]]:
    """The records a real croft wrote, by store key (`fixtures/records.json`, captured by
    `tests/test_record_models.py`)."""
    captured = json.loads((Path(__file__).parent / "fixtures/records.json").read_text())
    return [(key, value) for key, value in captured]
