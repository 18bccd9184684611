"""Projects as LXD 5.0 has them: names and config keys, what a project owns (its
features), what uses it, its limits and restrictions, and the one check every instance
create, update and start goes through (`check_instance`).

Messages are LXD 5.0.2's, measured against it (`LXD_DIR=/var/lib/lxd lxc project ...`);
its checks live in lxd/api_project.go and lxd/project/permissions.go.

This module gathers them for the handlers (`projects.check_instance`, ...); each concern
has its own module: `project_config` (names, config keys, features), `project_usage` (the
record, the project a request's objects live in, `used_by`) and `project_limits` (limits,
restrictions, reservations, the project's state).
"""

from __future__ import annotations

from croft.api.domain.project_config import (
    new_project_config,
    validate_config,
    validate_name,
)
from croft.api.domain.project_limits import (
    check_instance,
    check_network_creation,
    check_profile,
    check_project_change,
    check_snapshot,
    check_volume,
    release_instance,
    state,
)
from croft.api.domain.project_usage import instance_entries, is_empty, load, scope, used_by
from croft.common.models import ProfileRecord
from croft.common.projects import FEATURE_OF_KIND, is_true, owner
from croft.common.records import record_key

__all__ = [
    "FEATURE_OF_KIND",
    "check_instance",
    "check_network_creation",
    "check_volume",
    "check_profile",
    "check_project_change",
    "check_snapshot",
    "default_profile",
    "default_profile_key",
    "is_empty",
    "is_true",
    "instance_entries",
    "load",
    "new_project_config",
    "owner",
    "release_instance",
    "scope",
    "state",
    "used_by",
    "validate_config",
    "validate_name",
]


def default_profile(project: str) -> ProfileRecord:
    """The `default` profile LXD gives a project with its own profiles: no devices."""
    return ProfileRecord(
        name="default",
        description=f"Default LXD profile for project {project}",
        config={},
        devices={},
    )


def default_profile_key(project: str) -> str:
    return record_key("profiles", project, "default")
