"""Building images from definitions: the shipped busybox and Debian ones, and custom ones."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from croft.common.errors import InvalidArgument
from croft.imageformat.builder import build_image, default_mirror, load_definition
from croft.imageformat.format import ImageType, parse_image, unpack_image
from croft.imageformat.templates import TemplateInstance, apply_templates
from croft.imageformat.testing import DEFINITIONS


def chroot(rootfs: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chroot", str(rootfs), *argv], capture_output=True, text=True)


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


def test_busybox_definition_builds_a_bootable_looking_image(busybox_image, workdir):
    info = parse_image(busybox_image)

    assert info.fingerprint == hashlib.sha256(busybox_image.read_bytes()).hexdigest()
    assert info.type is ImageType.CONTAINER
    assert info.properties["os"] == "busybox"
    assert set(info.templates) == {"/etc/hostname", "/etc/hosts"}

    volume = workdir / "volume"
    unpack_image(busybox_image, None, volume)
    rootfs = volume / "rootfs"
    assert chroot(rootfs, "/bin/busybox", "true").returncode == 0
    assert chroot(rootfs, "/bin/sh", "-c", "echo $((6*7))").stdout == "42\n"
    assert os.readlink(rootfs / "bin/sh") == "/bin/busybox"
    init = (rootfs / "sbin/init").read_text()
    assert init.startswith("#!/bin/sh") and "PWR" in init
    assert os.access(rootfs / "sbin/init", os.X_OK)
    assert os.access(rootfs / "usr/share/udhcpc/default.script", os.X_OK)
    # The init script is at least valid shell for busybox's ash.
    assert chroot(rootfs, "/bin/sh", "-n", "/sbin/init").returncode == 0
    assert chroot(rootfs, "/bin/sh", "-n", "/usr/share/udhcpc/default.script").returncode == 0

    apply_templates(volume, "create", TemplateInstance(name="bb1"))
    assert (rootfs / "etc/hostname").read_text() == "bb1\n"
    assert "127.0.1.1\tbb1" in (rootfs / "etc/hosts").read_text()


def test_busybox_init_stops_on_sigpwr(busybox_image, workdir):
    volume = workdir / "volume"
    unpack_image(busybox_image, None, volume)
    # Run the real init as PID 1 of its own pid, mount, network and UTS namespaces, as in a
    # container: whatever it mounts or configures (hostname, lo, DHCP on an eth0) must never
    # reach the host's.
    proc = subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--mount",
            "--net",
            "--uts",
            "--ipc",
            "--propagation=private",
            "--fork",
            "--mount-proc=" + str(volume / "rootfs/proc"),
            "chroot",
            str(volume / "rootfs"),
            "/sbin/init",
        ],
    )
    try:
        # The init sets itself up, then waits; find it (PID 1 inside) and ask it to stop.
        deadline = time.monotonic() + 10
        pid1 = None
        while pid1 is None and time.monotonic() < deadline:
            out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
            pid1 = int(out.stdout.split()[0]) if out.stdout.split() else None
            time.sleep(0.1)
        assert pid1 is not None
        time.sleep(0.5)
        os.kill(pid1, 30)  # SIGPWR, LXC's halt signal
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert mounts_under(workdir) == []


def test_custom_definition_with_files_commands_and_templates(workdir):
    (workdir / "motd.txt").write_text("hello from a source file\n")
    definition = workdir / "custom.yaml"
    definition.write_text(
        """
name: custom
description: custom test image
base: busybox
compression: xz
files:
  - path: /etc/motd
    source: motd.txt
  - path: /usr/local/bin/hello
    mode: "0750"
    content: "#!/bin/sh\\necho hello\\n"
commands:
  - echo built-in-chroot > /etc/built
  - test -c /dev/null && test -r /proc/self/status
properties:
  os: custom
templates:
  /etc/greeting:
    when: [start]
    content: "hi {{ container.name }}{% if config_get(\\"user.x\\", \\"\\") %}!{% endif %}\\n"
"""
    )
    output = workdir / "out/custom.tar.xz"

    info = build_image(definition, output)

    assert info.metadata_format == "xz"
    assert info.filename == "custom.tar.xz"
    assert info.properties == {
        "os": "custom",
        "description": "custom test image",
        "architecture": "x86_64",
    }
    assert info.templates["/etc/greeting"].template == "greeting.tpl"
    assert [p.name for p in output.parent.iterdir()] == ["custom.tar.xz"]
    assert mounts_under(workdir) == []

    volume = workdir / "volume"
    unpack_image(output, None, volume)
    rootfs = volume / "rootfs"
    assert (rootfs / "etc/motd").read_text() == "hello from a source file\n"
    assert (rootfs / "etc/built").read_text() == "built-in-chroot\n"
    assert oct(os.stat(rootfs / "usr/local/bin/hello").st_mode & 0o7777) == "0o750"
    assert chroot(rootfs, "/usr/local/bin/hello").stdout == "hello\n"
    apply_templates(volume, "start", TemplateInstance(name="c", config={"user.x": "1"}))
    assert (rootfs / "etc/greeting").read_text() == "hi c!\n"


def test_failing_command_fails_the_build_and_leaves_nothing(workdir):
    definition = workdir / "bad.yaml"
    definition.write_text("name: bad\nbase: busybox\ncommands: ['false']\n")
    out = workdir / "out"

    with pytest.raises(InvalidArgument, match="'false' failed"):
        build_image(definition, out / "bad.tar.gz")

    assert list(out.iterdir()) == []
    assert mounts_under(workdir) == []


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("base: busybox\n", "'name' is required"),
        ("name: x\nbase: alpine\n", "not busybox or debootstrap"),
        ("name: x\nbase: busybox\narchitecture: s390x\n", "cannot build s390x"),
        ("name: x\nbase: busybox\nfiles: [{path: etc/x, content: y}]\n", "absolute file path"),
        ("name: x\nbase: busybox\nfiles: [{path: /x/../y, content: y}]\n", "absolute file path"),
        ("name: x\nbase: busybox\nfiles: [{path: /x}]\n", "needs content or source"),
        ("name: x\nbase: busybox\nfiles: [{path: /x, source: nope}]\n", "cannot read"),
        ("name: x\nbase: busybox\nfiles: [{path: /x, content: y, mode: rw}]\n", "not octal"),
        ("name: x\nbase: busybox\ncompression: lz4\n", "not gzip or xz"),
        ("name: x\nbase: busybox\ntemplates: {/etc/x: {when: [boot], content: y}}\n", "triggers"),
        ("name: [x\n", "not valid YAML"),
    ],
)
def test_bad_definitions_are_rejected(workdir, text, words):
    definition = workdir / "def.yaml"
    definition.write_text(text)
    with pytest.raises(InvalidArgument, match=words):
        load_definition(definition)


def test_default_mirror_comes_from_the_hosts_debian_sources(workdir):
    sources = workdir / "debian.sources"
    sources.write_text("Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n")
    assert default_mirror(sources) == "http://mirror.example/debian"
    assert default_mirror(workdir / "missing") == "http://deb.debian.org/debian"


@pytest.mark.slow
def test_debian12_definition_builds_a_systemd_image(workdir):
    output = workdir / "debian12.tar.gz"

    info = build_image(DEFINITIONS / "debian12.yaml", output)

    assert info.fingerprint == hashlib.sha256(output.read_bytes()).hexdigest()
    assert info.properties["os"] == "debian"
    assert info.properties["release"] == "bookworm"
    volume = workdir / "volume"
    unpack_image(output, None, volume)
    rootfs = volume / "rootfs"
    assert os.readlink(rootfs / "sbin/init").endswith("systemd")
    assert (rootfs / "etc/systemd/network/10-eth0.network").read_text().count("DHCP=ipv4") == 1
    for unit in ("systemd-networkd.service", "systemd-resolved.service"):
        result = chroot(rootfs, "systemctl", "is-enabled", unit)
        assert result.stdout.strip() == "enabled", unit
    assert os.readlink(rootfs / "etc/resolv.conf") == "../run/systemd/resolve/stub-resolv.conf"
    assert (rootfs / "etc/machine-id").read_text() == ""
    assert list((rootfs / "var/lib/apt/lists").glob("*_Packages")) == []
    assert (
        "cap_net_raw"
        in subprocess.run(
            ["getcap", str(rootfs / "usr/bin/ping")], capture_output=True, text=True
        ).stdout
    )
    assert chroot(rootfs, "ip", "-V").returncode == 0
    apply_templates(volume, "create", TemplateInstance(name="deb1"))
    assert (rootfs / "etc/hostname").read_text() == "deb1\n"
