"""Where records live in the store and how their LXD URLs and ETags are made.

Layout (shared by every service): `/croft/records/<kind>/<project>/<name>` holds one JSON
record in LXD's API shape; projects themselves are `/croft/records/projects/<name>`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from croft.common.errors import Conflict, NotFound
from croft.common.store import Store, dump

RECORDS = "/croft/records/"
DEFAULT_PROJECT = "default"


def record_prefix(kind: str, project: str) -> str:
    return f"{RECORDS}{kind}/{project}/"


def record_key(kind: str, project: str, name: str) -> str:
    return f"{RECORDS}{kind}/{project}/{name}"


def project_key(name: str) -> str:
    return f"{RECORDS}projects/{name}"


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


async def modify(
    store: Store,
    key: str,
    change: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    missing: str,
    default: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Read-modify-write of one record under compare-and-swap, retried when another writer
    got in between. `change` gets the current record and returns the new one (it may raise
    to refuse, e.g. an ETag mismatch, and is re-run on a retry). A missing record is
    NotFound(`missing`), or starts from `default` when one is given."""
    for _ in range(20):
        found = await store.get(key)
        if found is None:
            if default is None:
                raise NotFound(missing)
            new = change(copy.deepcopy(default))
            try:
                await store.create(key, dump(new))
            except Conflict:
                continue
            return new
        new = change(found.json())
        try:
            await store.update(key, dump(new), revision=found.revision)
        except Conflict:
            continue
        except NotFound:
            if default is None:
                raise NotFound(missing) from None
            continue
        return new
    raise Conflict(f"{key} is changing too fast to be updated; try again")
