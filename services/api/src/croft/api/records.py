"""Where records live in the store and how their LXD URLs and ETags are made.

Layout (shared by every service): `/croft/records/<kind>/<project>/<name>` holds one JSON
record in LXD's API shape; projects themselves are `/croft/records/projects/<name>`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import quote

from croft.common.errors import NotFound
from croft.common.records import (  # the layout is shared by every service
    DEFAULT_PROJECT,
    RECORDS,
    modify,
    project_key,
    record_key,
    record_prefix,
)
from croft.common.store import Store

__all__ = [
    "DEFAULT_PROJECT",
    "RECORDS",
    "SERVER_CONFIG_KEY",
    "etag",
    "list_records",
    "modify",
    "project_key",
    "record_key",
    "record_prefix",
    "require_project",
    "url",
]

SERVER_CONFIG_KEY = f"{RECORDS}server/config"


def url(kind: str, name: str, project: str = DEFAULT_PROJECT) -> str:
    """`/1.0/<kind>/<name>`, with `?project=` outside the default project, as LXD's
    `used_by` and `Location` show them."""
    path = f"/1.0/{kind}/{quote(name, safe='')}"
    return path if project == DEFAULT_PROJECT else f"{path}?project={quote(project, safe='')}"


def etag(fields: Any) -> str:
    """The ETag of a record: a hash of its writable fields, so that only a change a client
    could have made invalidates the client's copy."""
    blob = json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


async def require_project(store: Store, project: str) -> dict[str, Any] | None:
    """The project's record; NotFound as LXD words it. The default project always exists
    (created at first start, never deletable), so it costs no store read."""
    if project == DEFAULT_PROJECT:
        return None
    found = await store.get_json(project_key(project))
    if found is None:
        raise NotFound(f'Failed loading project "{project}": Project not found')
    record: dict[str, Any] = found[0]
    return record


async def list_records(store: Store, kind: str, project: str) -> list[dict[str, Any]]:
    entries = await store.list(record_prefix(kind, project))
    return [entry.json() for entry in entries]
