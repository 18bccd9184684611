"""The libvirt daemons compute starts belong to the host's network namespace, even when
compute itself runs in a cluster member's."""

import os
import subprocess
import sys

from croft.compute import virtd

PROBE = (
    "import subprocess; from croft.compute import virtd; "
    "print(subprocess.run(virtd.in_host_netns(['readlink', '/proc/self/ns/net']), "
    "capture_output=True, text=True, check=True).stdout.strip())"
)


def test_a_command_from_another_network_namespace_runs_in_the_hosts() -> None:
    host = os.readlink("/proc/self/ns/net")
    assert virtd.host_netns() is not None
    assert virtd.host_netns()[1] == host  # type: ignore[index]
    inside = subprocess.run(
        [
            "unshare",
            "--net",
            sys.executable,
            "-c",
            "import os; print(os.readlink('/proc/self/ns/net'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert inside != host  # the probe below does start elsewhere
    ran = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert ran == host


def test_in_the_hosts_namespace_the_command_is_left_alone() -> None:
    assert virtd.in_host_netns(["true"]) == ["true"]
