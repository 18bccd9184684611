"""The cgroup2 `favordynmods` remount, on this host's real mounts."""

from __future__ import annotations

from pathlib import Path

from croft.compute.host import OPTION, cgroup2_mounts, favor_cgroup_migrations


def test_the_option_is_in_effect_after_start() -> None:
    assert favor_cgroup_migrations() is True
    mounts = cgroup2_mounts()
    assert mounts, "this host has a cgroup2 mount (hybrid: /sys/fs/cgroup/unified)"
    assert any(OPTION in options for _, options in mounts)
    # Idempotent: a second start changes nothing and still reports it in effect.
    assert favor_cgroup_migrations() is True


def test_a_host_without_cgroup2_is_left_alone(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n"
        "proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0\n"
    )
    assert cgroup2_mounts(str(mounts)) == []
    assert favor_cgroup_migrations(str(mounts)) is False
