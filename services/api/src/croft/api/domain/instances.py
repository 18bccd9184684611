"""Instance records as the handlers see them: LXD's request types shared by several
endpoints, name checks, loading a record, profile expansion, the ETag's fields and
the rendering.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr
from starlette.requests import Request

from croft.api import limits, query, records
from croft.api.context import context
from croft.common.errors import InvalidArgument, NotFound
from croft.common.records import public

KIND = "instances"
Devices = dict[str, dict[str, StrictStr]]
_NAME = re.compile(r"^[a-zA-Z0-9-]+$")


def validate_name(name: str) -> None:
    """LXD's instance names are host names; its checks, in its order, with its words."""
    problem = ""
    if not 1 <= len(name) <= 63:
        problem = "Name must be 1-63 characters long"
    elif name[0] == "-":
        problem = 'Name must not start with "-" character'
    elif name[-1] == "-":
        problem = 'Name must not end with "-" character'
    elif name[0] in "0123456789":
        problem = "Name must not start with a number"
    elif not _NAME.match(name):
        problem = "Name can only contain alphanumeric and hyphen characters"
    if problem:
        raise InvalidArgument(f"Invalid instance name: {problem}")


class InstanceSource(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: StrictStr = ""
    alias: StrictStr = ""
    fingerprint: StrictStr = ""
    server: StrictStr = ""
    protocol: StrictStr = ""
    certificate: StrictStr = ""
    properties: dict[str, StrictStr] | None = None
    # source.type "copy": the instance or snapshot ("c1/snap0") copied, and how.
    source: StrictStr = ""
    instance_only: StrictBool = False
    container_only: StrictBool = False
    refresh: StrictBool = False
    live: StrictBool = False
    allow_inconsistent: StrictBool = False


class InstancePut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    architecture: StrictStr = ""
    config: dict[str, StrictStr] | None = None
    devices: Devices | None = None
    ephemeral: StrictBool = False
    profiles: list[StrictStr] | None = None
    stateful: StrictBool = False
    description: limits.Description = ""
    restore: limits.Name = ""


class NamePost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: limits.Name = ""
    migration: StrictBool = False
    # With migration: a move to another storage pool (`lxc move --storage`), project or
    # cluster member.
    live: StrictBool = False
    instance_only: StrictBool = False
    container_only: StrictBool = False
    pool: StrictStr = ""
    project: StrictStr = ""
    target: StrictStr | None = None
    allow_inconsistent: StrictBool = False


async def expand(
    store: Any,
    project: str,
    profiles: list[str],
    config: dict[str, str],
    devices: dict[str, Any],
    known: dict[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, str], dict[str, Any]]:
    """Apply profiles in order, then the instance's own config and devices. `known`:
    profiles by name to use instead of the stored ones (one about to be written)."""
    expanded_config: dict[str, str] = {}
    expanded_devices: dict[str, Any] = {}
    for name in profiles:
        if known and name in known:
            profile = known[name]
            expanded_config.update(profile.get("config") or {})
            expanded_devices.update(profile.get("devices") or {})
            continue
        found = await store.get_json(records.record_key("profiles", project, name))
        if found is None:
            raise NotFound(f'Requested profile "{name}" doesn\'t exist')
        profile = found[0]
        expanded_config.update(profile.get("config") or {})
        expanded_devices.update(profile.get("devices") or {})
    expanded_config.update(config)
    expanded_devices.update(devices)
    return expanded_config, expanded_devices


def writable(record: dict[str, Any]) -> list[Any]:
    """The fields an ETag covers (LXD: what a PUT can change)."""
    return [
        record.get("architecture", ""),
        {k: v for k, v in (record.get("config") or {}).items() if not k.startswith("volatile.")},
        record.get("devices", {}),
        record.get("ephemeral", False),
        record.get("profiles", []),
        record.get("description", ""),
    ]


async def load(request: Request, name: str) -> tuple[str, dict[str, Any], int]:
    store = context(request).store
    project = query.project(request)
    found = await store.get_json(records.record_key(KIND, project, name))
    if found is None or found[0].get("_croft", {}).get("state") == "creating":
        raise NotFound("Instance not found")
    return project, found[0], found[1]


def render(record: dict[str, Any], standalone: bool) -> dict[str, Any]:
    """The instance as clients see it. A record's `location` is its member; a standalone
    server shows LXD's member name for itself, "none"."""
    body = public(record)
    if standalone:
        body["location"] = "none"
    return body


def resources(name: str, project: str) -> dict[str, list[str]]:
    return {
        "containers": [records.url("containers", name, project)],
        "instances": [records.url(KIND, name, project)],
    }


@contextlib.contextmanager
def failing(prefix: str) -> Iterator[None]:
    """Put LXD's context (`Failed creating instance record: `) before a refusal's message."""
    try:
        yield
    except InvalidArgument as exc:
        raise InvalidArgument(f"{prefix}{exc}") from None
