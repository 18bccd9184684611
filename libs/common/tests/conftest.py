"""Fixtures that start real etcd members (see croft.common.testing.etcd)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

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
