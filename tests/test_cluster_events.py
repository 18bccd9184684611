"""`/1.0/events` in the 3-member cluster (the session's `cluster_rig`): a listener on any
member hears what is done through the others."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from croft.common.testing.cluster import ClusterRig


def test_a_listener_on_m1_hears_an_instance_made_through_m2_on_m3(
    cluster_rig: ClusterRig, busybox_image: Path
) -> None:
    rig = cluster_rig
    rig.wait_online(120)
    aliases = [a["name"] for a in rig.lxc_json(0, "image", "alias", "list", "m1:")]
    if "busybox" not in aliases:
        rig.lxc(0, "image", "import", str(busybox_image), "m1:", "--alias", "busybox")
    rig.lxc(0, "profile", "device", "remove", "m1:default", "eth0", check=False)
    assert rig.lxc_home is not None
    monitor = subprocess.Popen(
        ["lxc", "monitor", "m1:", "--type", "lifecycle", "--format", "json"],
        env={**os.environ, "HOME": str(rig.lxc_home), "LXD_DIR": "/nonexistent"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2)  # the listener's websocket is up before the change it must hear
        rig.lxc(1, "init", "m2:busybox", "m2:heard", "--target", "m3")
        rig.lxc(2, "delete", "m3:heard")
        time.sleep(2)  # events travel through the store's log; let them arrive
    finally:
        monitor.send_signal(signal.SIGINT)
        out, err = monitor.communicate(timeout=30)
    events = [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]
    heard = {
        e["metadata"]["action"]: e["location"]
        for e in events
        if e["metadata"].get("source", "").endswith("/instances/heard")
    }
    # Each says where it happened: on m3, which holds the instance.
    assert heard.get("instance-created") == "m3", (out, err)
    assert heard.get("instance-deleted") == "m3", (out, err)
