"""The images service's records as any service reads them: where they live in the store and
how a name finds an image, the way LXD looks one up.

The images service is their only writer (`croft.images.core` describes the records); these
functions only read the store, so the api can resolve `lxc launch NAME` without a call.
"""

from __future__ import annotations

import re
from typing import Any

from croft.common.errors import InvalidArgument, NotFound
from croft.common.events import rfc3339_nano
from croft.common.records import record_key
from croft.common.store import Store

IMAGES = "images"
ALIASES = "image-aliases"
NEVER_USED = "0001-01-01T00:00:00Z"  # Go's zero time, as LXD shows an unused image

IMAGE_NOT_FOUND = "Image not found"
ALIAS_NOT_FOUND = "Image alias not found"

_HEX = re.compile(r"^[0-9a-f]{1,64}$")


def image_key(project: str, fingerprint: str) -> str:
    return record_key(IMAGES, project, fingerprint)


def alias_key(project: str, name: str) -> str:
    return record_key(ALIASES, project, name)


async def find(store: Store, project: str, fingerprint: str) -> tuple[dict[str, Any], int]:
    """The record (and its revision) of the image whose fingerprint is `fingerprint` or
    starts with it. NotFound, or InvalidArgument when a prefix matches several."""
    if not _HEX.match(fingerprint):
        raise NotFound(IMAGE_NOT_FOUND)
    if len(fingerprint) == 64:
        entry = await store.get(image_key(project, fingerprint))
        entries = [] if entry is None else [entry]
    else:
        entries = await store.list(image_key(project, fingerprint))
    if not entries:
        raise NotFound(IMAGE_NOT_FOUND)
    if len(entries) > 1:
        raise InvalidArgument("More than one image matches")
    return entries[0].json(), entries[0].revision


async def lookup(store: Store, project: str, name: str) -> tuple[dict[str, Any], int]:
    """The record (and its revision) of the image an alias, a fingerprint or a unique
    fingerprint prefix names, the way `lxc launch NAME` looks it up: the alias first (a
    full fingerprint is looked up as one first: that is what a launch sends). Only reads,
    so any service may look an image up in the store. NotFound("Image not found")."""
    if not name:
        raise NotFound(IMAGE_NOT_FOUND)
    if len(name) == 64 and _HEX.match(name):
        entry = await store.get(image_key(project, name))
        if entry is not None:
            return entry.json(), entry.revision
    alias = await store.get(alias_key(project, name))
    target = alias.json()["target"] if alias is not None else name
    return await find(store, project, target)


def used_lately(record: dict[str, Any]) -> bool:
    """Whether the image's last use is recorded within the current second: marking it used
    again would change nothing (see ImagesCore.resolve)."""
    return bool(record.get("last_used_at", "")[:19] == rfc3339_nano()[:19])
