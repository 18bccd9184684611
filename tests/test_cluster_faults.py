"""Faults of the 3-member cluster (the session's `cluster_rig`, after tests/test_cluster.py):
the store losing its quorum. Each test leaves every member Online again."""

from __future__ import annotations

import time

from croft.common.testing.cluster import ClusterRig


def _set(rig: ClusterRig, value: str) -> tuple[int, str]:
    """`lxc config set user.quorum VALUE` through m1: its exit code and error. The
    subprocess timeout (90 s) is the bound: a write that hangs fails the test."""
    result = rig.lxc(0, "config", "set", "user.quorum", value, check=False, timeout=90)
    return result.returncode, result.stderr.strip()


def test_two_voters_down_refuses_writes_clearly_and_one_back_serves_again(
    cluster_rig: ClusterRig,
) -> None:
    """m2 and m3 (two of the three etcd voters) killed: a write through m1 fails with
    a message saying the store is unavailable, within the client's bound, and changes
    nothing; once m2 is back the same write goes through."""
    rig = cluster_rig
    rig.wait_online(120)
    assert _set(rig, "before") == (0, "")
    m2, m3 = rig.members[1], rig.members[2]
    try:
        m2.kill()
        m3.kill()
        started = time.monotonic()
        code, error = _set(rig, "lost")
        print(f"write without quorum refused in {time.monotonic() - started:.1f}s: {error}")
        assert code != 0
        assert "unavailable" in error.lower() or "quorum" in error.lower(), error
        m2.up()
        # The refused write changed nothing.
        assert rig.lxc(0, "config", "get", "user.quorum").stdout.strip() == "before"

        def written() -> bool:
            return _set(rig, "back")[0] == 0

        deadline = time.monotonic() + 120
        while not written():
            assert time.monotonic() < deadline, "no write within 120 s of m2's return"
            time.sleep(1)
        got = rig.lxc(0, "config", "get", "user.quorum").stdout.strip()
        assert got == "back"
    finally:
        for member in (m2, m3):
            if not member.processes():
                member.up()
    rig.wait_online(120)
    rig.lxc(0, "config", "unset", "user.quorum")
