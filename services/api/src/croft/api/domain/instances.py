"""Instance records as the handlers see them: LXD's request types shared by several
endpoints, name checks, loading a record, profile expansion, the ETag's fields and
the rendering.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr
from starlette.requests import Request

from croft.api import limits, query, records
from croft.api.config_keys import device_type_problem, validate_devices, validate_instance_config
from croft.api.context import context
from croft.api.domain.images import ImageSource
from croft.common.errors import InvalidArgument, NotFound
from croft.common.models import InstanceMeta, InstanceRecord
from croft.common.projects import owning_project
from croft.common.records import DEFAULT_PROJECT, public
from croft.common.store import Store

KIND = "instances"
Body = TypeVar("Body", bound=BaseModel)
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


class InstanceSource(ImageSource):
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
    profiles by name to use instead of the stored ones (one about to be written). A
    project without `features.profiles` uses `default`'s profiles."""
    project = await owning_project(store, project, "profiles")
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


def writable(record: InstanceRecord) -> list[Any]:
    """The fields an ETag covers (LXD: what a PUT can change)."""
    return [
        record.architecture,
        {k: v for k, v in record.config.items() if not k.startswith("volatile.")},
        record.devices,
        record.ephemeral,
        record.profiles,
        record.description,
    ]


async def load(request: Request, name: str) -> tuple[str, InstanceRecord, int]:
    """The instance `name` of the request's project, and the revision it was read at;
    NotFound for one that is not there or not created yet."""
    store = context(request).store
    project = query.project(request)
    found = await store.get_json(InstanceRecord.store_key(project, name))
    if found is None:
        raise NotFound("Instance not found")
    record = InstanceRecord.model_validate(found[0])
    if record.croft.creating:
        raise NotFound("Instance not found")
    return project, record, found[1]


async def load_with(
    request: Request, name: str, body: type[Body]
) -> tuple[str, InstanceRecord, int, Body]:
    """`load`, then the request's body as `body`: what a handler that acts on one instance
    reads first. An instance that is not there is a 404 whatever the body says."""
    project, record, revision = await load(request, name)
    return project, record, revision, await query.body(request, body)


@dataclass(frozen=True, slots=True)
class Listed:
    """An instance as a listing reads it: its stored record, unparsed, and its `_croft`.
    No whole model per record: a listing of hundreds costs what the dicts did."""

    stored: dict[str, Any]
    meta: InstanceMeta

    @property
    def name(self) -> str:
        return str(self.stored["name"])

    @property
    def project(self) -> str:
        return str(self.stored.get("project") or DEFAULT_PROJECT)


async def listed(store: Store, project: str) -> list[Listed]:
    """The project's instances, less those not created yet."""
    found = []
    for stored in await records.list_records(store, KIND, project):
        meta = InstanceRecord.meta_of(stored)
        if not meta.creating:
            found.append(Listed(stored, meta))
    return found


def render(record: InstanceRecord | Listed, standalone: bool) -> dict[str, Any]:
    """The instance as clients see it (`_croft` never leaves the api). A record's
    `location` is its member; a standalone server shows LXD's member name for itself,
    "none"."""
    body = record.public() if isinstance(record, InstanceRecord) else public(record.stored)
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


async def checked_expansion(
    store: Store,
    project: str,
    profiles: list[str],
    config: dict[str, str],
    devices: dict[str, Any],
) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
    """A new instance's config and devices checked, expanded with `profiles` and checked
    again, as LXD checks a create's (and a copy's): the expanded config and devices, and
    the root disk device. InvalidArgument with LXD's message for the first problem."""
    with failing("Failed creating instance record: "):
        if len(set(profiles)) != len(profiles):
            raise InvalidArgument("Duplicate profile found in request")
        validate_instance_config(config, profile=False)
        problem = device_type_problem(devices)
        if problem:
            raise InvalidArgument(problem)
    expanded_config, expanded_devices = await expand(store, project, profiles, config, devices)
    with failing("Failed creating instance record: "):
        validate_instance_config(expanded_config, profile=False)
    with failing("Failed creating instance record: Failed initialising instance: "):
        with failing("Invalid devices: "):
            validate_devices(devices)
            validate_devices(expanded_devices)
        roots = [
            d for d in expanded_devices.values() if d.get("type") == "disk" and d.get("path") == "/"
        ]
        if not roots:
            raise InvalidArgument("Failed getting root disk: No root device could be found")
    return expanded_config, expanded_devices, roots[0]
