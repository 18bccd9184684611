"""Which project owns the records of a kind, as LXD's project features decide it.

A project always owns its instances. Its profiles, images (and aliases), custom storage
volumes and networks are its own only while the matching feature is on
(`features.profiles`, `features.images`, `features.storage.volumes`,
`features.networks`); otherwise it shares those of the `default` project. Every service
that reads such records for a project asks here, so that the api and the images service
agree on where an image of a project without `features.images` lives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from croft.common.records import DEFAULT_PROJECT, project_key
from croft.common.store import Store

# The feature that gives a project its own records of a kind (record kinds as stored).
FEATURE_OF_KIND = {
    "profiles": "features.profiles",
    "images": "features.images",
    "image-aliases": "features.images",
    "storage-volumes": "features.storage.volumes",
    "networks": "features.networks",
}


def is_true(value: str | None) -> bool:
    """LXD's shared.IsTrue."""
    return (value or "").lower() in ("true", "1", "yes", "on")


def owner(project: str, config: Mapping[str, str] | None, kind: str) -> str:
    """The project whose records of `kind` `project` uses, given `project`'s config."""
    feature = FEATURE_OF_KIND.get(kind)
    if project == DEFAULT_PROJECT or feature is None:
        return project
    return project if is_true((config or {}).get(feature)) else DEFAULT_PROJECT


async def owning_project(store: Store, project: str, kind: str) -> str:
    """`owner`, reading `project`'s record (a missing project owns nothing: its own name
    is returned, so that a lookup in it finds nothing)."""
    if project == DEFAULT_PROJECT or kind not in FEATURE_OF_KIND:
        return project
    found = await store.get_json(project_key(project))
    if found is None:
        return project
    record: dict[str, Any] = found[0]
    return owner(project, record.get("config"), kind)
