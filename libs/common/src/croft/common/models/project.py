"""Projects and profiles (LXD's `api.Project`, `api.Profile`).

project_key(<name>)                          ProjectRecord
record_key("profiles", <project>, <name>)    ProfileRecord
"""

from __future__ import annotations

from pydantic import Field

from croft.common.models._base import Record
from croft.common.records import PROFILES, project_key, record_key


class ProjectRecord(Record):
    """A project (`used_by` is computed when read, not stored)."""

    name: str
    description: str = ""
    config: dict[str, str] = Field(default_factory=dict)

    @staticmethod
    def store_key(name: str) -> str:
        return project_key(name)

    def key(self) -> str:
        return self.store_key(self.name)


class ProfileRecord(Record):
    """A profile (the project is in its key, not its body)."""

    name: str
    description: str = ""
    config: dict[str, str] = Field(default_factory=dict)
    devices: dict[str, dict[str, str]] = Field(default_factory=dict)

    @staticmethod
    def store_key(project: str, name: str) -> str:
        return record_key(PROFILES, project, name)

    def key(self, project: str) -> str:
        return self.store_key(project, self.name)
