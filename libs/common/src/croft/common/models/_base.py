"""What every record model shares: unknown fields kept, `_croft` by its alias, and the
two ways out (the stored shape and the public one)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from croft.common.records import DEFAULT_PROJECT, record_key


class Model(BaseModel):
    """A record, or a part of one, as the store holds it.

    Fields croft does not model (an LXD field not handled yet, a key an older croft
    wrote) are kept as extras, and `dump()` leaves out the fields the stored record did
    not have: a record read and written back is the record that was read."""

    # Fields are set by name in code and read by alias (`_croft`) from the store.
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def dump(self, exclude: set[str] | None = None) -> dict[str, Any]:
        """The stored shape: `_croft` by its name, only the fields that are set (less
        `exclude`, by field name: a key to drop, as `dict.pop` would)."""
        return self.model_dump(by_alias=True, exclude_unset=True, exclude=exclude)


class CroftMeta(Model):
    """Croft's own bookkeeping in a record (its `_croft`), which never leaves the api."""


class Record(Model):
    """A top-level record: a `public()` shape for clients besides the stored one."""

    def public(self) -> dict[str, Any]:
        """The record without croft's private `_` keys, as clients see it (what
        `croft.common.records.public` does to a dict)."""
        return {k: v for k, v in self.dump().items() if not k.startswith("_")}


class ClusterRecord(Record):
    """A cluster-wide record named by `name` alone, in the default project (LXD's
    networks and storage pools): what those share."""

    #: The store collection its records are kept in.
    collection: ClassVar[str]

    name: str
    description: str = ""
    config: dict[str, str] = Field(default_factory=dict)
    status: str = ""
    used_by: list[str] = Field(default_factory=list)
    locations: list[str] = Field(default_factory=list)

    @classmethod
    def store_key(cls, name: str) -> str:
        return record_key(cls.collection, DEFAULT_PROJECT, name)

    def key(self) -> str:
        return self.store_key(self.name)
