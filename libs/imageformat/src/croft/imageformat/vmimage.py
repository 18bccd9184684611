"""Build croft's small virtual-machine image locally (no image server): `tiny-vm`.

The image is in LXD's split VM format: a metadata tarball and a qcow2 `rootfs.img`
(`lxc image import tiny-vm.meta.tar.gz tiny-vm.rootfs.img`). LXD's VM images boot their
own kernel through UEFI; under TCG (no usable KVM on many hosts, this one included) that
costs a minute per boot. croft's image therefore also carries, in its metadata tarball,
a kernel for direct boot (`boot/vmlinux`, `boot/initrd.img`, `boot/cmdline`); the stock
client and LXD ignore the extra files. The qemu driver boots them when present.

- the kernel is Debian's (`apt-get download` of the package `linux-image-<arch>` depends
  on), decompressed to its ELF `vmlinux`: QEMU then enters it through PVH and skips the
  7 s the XZ decompressor takes under emulation;
- the initramfs is the whole system: static busybox, the virtio, ACPI-button and evdev
  modules, an init that answers the ACPI power button (`lxc stop`), DHCP on eth0, a shell
  on the serial console (`lxc console`), and the agent (`croft-agent`, a shell loop on the virtio-serial port `org.croft.agent.0`);
- `rootfs.img` is a small disk whose first bytes are a marker the init checks, so a boot
  proves the root disk is attached.

The agent speaks lines: it sends `READY` when it starts and in answer to `HELLO`; `EXEC ID
COMMAND` (or `EXECB ID B64` for a command with a line break) runs the command in a
subshell and answers `RESULT ID RC B64STDOUT B64STDERR` (`-` for no output); `RUN ID
COMMAND` (`RUNB`) runs one in the background with its stdin fed by `STDIN ID B64` lines
until `EOF ID`, and answers the same `RESULT`; `PUT ID B64PATH MODE UID GID SIZE` + SIZE raw bytes writes a file (`DONE ID` or
`FAIL ID B64MSG`); `GET ID B64PATH` answers `STAT ID HEXMODE UID GID SIZE` + SIZE raw
bytes (the file, a directory's names, a symlink's target) or `FAIL`; `POWEROFF` powers
the guest off.
"""

from __future__ import annotations

import argparse
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

from croft.common.errors import CroftError, Internal
from croft.common.proc import run
from croft.imageformat.format import ImageInfo, parse_image

NAME = "tiny-vm"
AGENT_PORT = "org.croft.agent.0"
DISK_MARKER = b"CROFT-TINY-VM-DISK\n"
DISK_SIZE = 64 * 1024**2
KERNEL_META_PACKAGE = "linux-image-amd64"
# Debian's kernel package, downloaded once per host and version.
KERNEL_CACHE = Path("/var/cache/croft/vm-kernel")
# Load order (each after what it depends on).
MODULES = (
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/drivers/block/virtio_blk.ko",
    "kernel/drivers/char/virtio_console.ko",
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
    "kernel/drivers/acpi/button.ko",
    "kernel/drivers/input/evdev.ko",
)
CMDLINE = "console=ttyS0 quiet panic=-1 rdinit=/init"
XZ_MAGIC = b"\xfd7zXZ\x00"

INIT = r"""#!/bin/sh
# PID 1 of croft's tiny VM: the initramfs is the whole system.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /tmp /var/run /var/log
mount -t devpts devpts /dev/pts
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m" 2>/dev/null; done
ip link set lo up
# The ACPI power button (lxc stop) powers off: busybox acpid runs /etc/acpi/PWRF/00000080.
acpid -c /etc/acpi -l /var/log/acpid.log
echo "croft-tiny-vm: init started"
if [ -b /dev/vda ] && [ "$(head -c 18 /dev/vda)" = "CROFT-TINY-VM-DISK" ]; then
    echo "croft-tiny-vm: root disk attached"
fi
[ -e /sys/class/net/eth0 ] && ip link set eth0 up && udhcpc -b -q -S -i eth0 -s /etc/udhcpc.script >/dev/null 2>&1 &
/bin/croft-agent &
# A root shell on the serial console (lxc console), again after each exit.
(while true; do setsid -c sh -i </dev/ttyS0 >/dev/ttyS0 2>&1; sleep 1; done) &
while true; do sleep 3600; done
"""

AGENT = r"""#!/bin/sh
# croft's agent for the tiny VM: lines on the virtio-serial port org.croft.agent.0.
port=
for i in $(seq 1 100); do
    for n in /sys/class/virtio-ports/*/name; do
        [ -f "$n" ] && [ "$(cat "$n")" = "org.croft.agent.0" ] && port=/dev/$(basename "$(dirname "$n")")
    done
    [ -n "$port" ] && [ -c "$port" ] && break
    sleep 0.1
done
[ -n "$port" ] || { echo "croft-agent: no port" >/dev/console; exit 1; }
exec 3<>"$port"
trap '' PIPE  # a command that ended before its stdin did must not end the agent
echo READY >&3
echo "croft-agent: ready" >/dev/console
# A read returns EOF while no host end is connected (between two host connections), and
# the port offers no way to wait for the next one: poll, quickly for a few seconds after
# the last request (requests come in bursts), then slowly (each sleep is a fork).
idle=0
while true; do
    # IFS= keeps the line whole: a command is passed as it was sent.
    if ! IFS= read -r line <&3; then
        idle=$((idle + 1))
        if [ "$idle" -lt 150 ]; then sleep 0.02; else sleep 0.25; fi
        continue
    fi
    idle=0
    verb=${line%% *}; rest=${line#* }; id=${rest%% *}; arg=${rest#"$id"}; arg=${arg# }
    case "$verb" in
    HELLO) echo READY >&3 ;;
    EXEC|EXECB)
        # EXEC ID COMMAND (one line) or EXECB ID B64; a subshell runs it (a fork, no
        # exec of a new shell: each exec costs under emulation). One answer line:
        # RESULT ID RC B64STDOUT B64STDERR ("-" for nothing).
        if [ "$verb" = EXECB ]; then arg=$(echo "$arg" | base64 -d); fi
        ( exec 3>&-; eval "$arg" ) </dev/null >/tmp/o 2>/tmp/e
        rc=$?
        o=-; e=-
        [ -s /tmp/o ] && o=$(base64 -w 0 /tmp/o)
        [ -s /tmp/e ] && e=$(base64 -w 0 /tmp/e)
        echo "RESULT $id $rc $o $e" >&3 ;;
    RUN|RUNB)
        # RUN ID COMMAND (RUNB: base64): the command runs in the background, its stdin a
        # FIFO that STDIN ID B64 lines feed and EOF ID closes; it answers RESULT as EXEC.
        if [ "$verb" = RUNB ]; then arg=$(echo "$arg" | base64 -d); fi
        exec 4>&-
        rm -f /tmp/i.$id; mkfifo /tmp/i.$id
        (
            ( exec 3>&-; eval "$arg" ) </tmp/i.$id >/tmp/o.$id 2>/tmp/e.$id
            rc=$?; o=-; e=-
            [ -s /tmp/o.$id ] && o=$(base64 -w 0 /tmp/o.$id)
            [ -s /tmp/e.$id ] && e=$(base64 -w 0 /tmp/e.$id)
            echo "RESULT $id $rc $o $e" >&3
            rm -f /tmp/i.$id /tmp/o.$id /tmp/e.$id
        ) &
        exec 4>/tmp/i.$id ;;
    STDIN) echo "$arg" | base64 -d >&4 ;;
    EOF) exec 4>&- ;;
    PUT)
        # PUT ID B64PATH MODE UID GID SIZE, then SIZE raw bytes: written beside the path
        # and renamed over it (whole or not at all).
        set -- $arg
        p=$(echo "$1" | base64 -d); tmp="$p.croft-agent-$id"
        head -c "$5" <&3 >/tmp/put.$id  # always read the bytes off the port
        if { cp /tmp/put.$id "$tmp" && chown "$3:$4" "$tmp" && chmod "$2" "$tmp" \
            && mv -f "$tmp" "$p"; } 2>/tmp/err.$id; then
            echo "DONE $id" >&3
        else
            rm -f "$tmp"
            echo "FAIL $id $(base64 -w 0 /tmp/err.$id)" >&3
        fi
        rm -f /tmp/put.$id /tmp/err.$id ;;
    GET)
        # GET ID B64PATH: STAT ID HEXMODE UID GID SIZE, then SIZE raw bytes (a file's
        # content, a directory's names one a line, a symlink's target); or FAIL ID.
        p=$(echo "$arg" | base64 -d)
        if ! st=$(stat -c '%f %u %g' "$p" 2>/tmp/err.$id); then
            echo "FAIL $id $(base64 -w 0 /tmp/err.$id)" >&3
        else
            if [ -L "$p" ]; then readlink "$p" | tr -d '\n' >/tmp/out.$id
            elif [ -d "$p" ]; then ls -1A "$p" >/tmp/out.$id
            else cat "$p" >/tmp/out.$id; fi
            echo "STAT $id $st $(wc -c </tmp/out.$id)" >&3
            cat /tmp/out.$id >&3
        fi
        rm -f /tmp/out.$id /tmp/err.$id ;;
    POWEROFF) sync; poweroff -f ;;
    esac
done
"""

UDHCPC = r"""#!/bin/sh
case "$1" in
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
    ;;
esac
"""

POWER_BUTTON = "#!/bin/sh\nsync\npoweroff -f\n"


def kernel_package() -> str:
    """The versioned Debian kernel package the meta-package depends on."""
    out = run(["apt-cache", "depends", KERNEL_META_PACKAGE]).stdout.decode()
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    raise Internal(f"apt-cache names no kernel package for {KERNEL_META_PACKAGE}")


def fetch_kernel(cache: Path) -> Path:
    """Debian's kernel package unpacked under `cache` (downloaded once); returns the tree."""
    package = kernel_package()
    tree = cache / package
    if (tree / "boot").is_dir():
        return tree
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".kernel-", dir=cache))
    try:
        run(["apt-get", "download", package], cwd=str(work), timeout=600)
        debs = list(work.glob("*.deb"))
        if not debs:
            raise Internal(f"apt-get download {package} left no .deb")
        unpacked = work / "tree"
        run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], timeout=300)
        os.rename(unpacked, tree)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tree


def extract_vmlinux(vmlinuz: Path) -> bytes:
    """The ELF kernel inside an XZ-compressed bzImage (QEMU boots it through PVH)."""
    data = vmlinuz.read_bytes()
    offset = data.find(XZ_MAGIC)
    if offset < 0:
        raise Internal(f"{vmlinuz} holds no XZ stream (not an XZ-compressed bzImage)")
    elf = lzma.LZMADecompressor().decompress(data[offset:])
    if not elf.startswith(b"\x7fELF"):
        raise Internal(f"the XZ stream in {vmlinuz} is not an ELF kernel")
    return elf


def _initramfs(kernel: Path, busybox: Path, dest: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix=".initramfs-", dir=dest.parent))
    try:
        for d in ("bin", "sbin", "proc", "sys", "dev", "tmp", "etc/acpi/PWRF", "lib/modules"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(busybox, root / "bin/busybox")
        applets = run([str(busybox), "--list"]).stdout.decode().split()
        for applet in applets:
            link = root / "bin" / applet
            if applet != "busybox" and not link.exists():
                link.symlink_to("busybox")
        modules = next((kernel / "lib/modules").iterdir())
        order = []
        for rel in MODULES:
            shutil.copy2(modules / rel, root / "lib/modules" / Path(rel).name)
            order.append(Path(rel).name)
        (root / "lib/modules/order").write_text("\n".join(order) + "\n")
        for path, text in (
            ("init", INIT),
            ("bin/croft-agent", AGENT),
            ("etc/udhcpc.script", UDHCPC),
            ("etc/acpi/PWRF/00000080", POWER_BUTTON),
        ):
            (root / path).write_text(text)
            (root / path).chmod(0o755)
        (root / "etc/hostname").write_text("tiny-vm\n")
        names = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        with open(dest, "wb") as out:
            subprocess.run(
                ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
                cwd=root,
                input=names,
                stdout=out,
                check=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def build_vm_image(
    output_dir: str | os.PathLike[str],
    *,
    kernel_cache: str | os.PathLike[str] | None = None,
    busybox: str | os.PathLike[str] = "/bin/busybox",
) -> tuple[Path, Path, ImageInfo]:
    """Write `tiny-vm.meta.tar.gz` and `tiny-vm.rootfs.img` into `output_dir`; returns
    their paths and the image's info (type virtual-machine)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(kernel_cache) if kernel_cache else KERNEL_CACHE
    kernel = fetch_kernel(cache)
    vmlinuz = next((kernel / "boot").glob("vmlinuz-*"))
    meta_out, rootfs_out = out / f"{NAME}.meta.tar.gz", out / f"{NAME}.rootfs.img"
    work = Path(tempfile.mkdtemp(prefix=f".build-{NAME}-", dir=out))
    try:
        boot = work / "boot"
        boot.mkdir()
        (boot / "vmlinux").write_bytes(extract_vmlinux(vmlinuz))
        _initramfs(kernel, Path(busybox), boot / "initrd.img")
        (boot / "cmdline").write_text(CMDLINE + "\n")
        (work / "templates").mkdir()
        metadata = {
            "architecture": "x86_64",
            "creation_date": int(time.time()),
            "properties": {
                "description": "croft tiny VM (busybox initramfs, direct kernel boot)",
                "os": "busybox",
                "release": "tiny",
                "variant": "vm",
                "kernel": vmlinuz.name.removeprefix("vmlinuz-"),
            },
            "templates": {},
        }
        (work / "metadata.yaml").write_text(yaml.safe_dump(metadata, sort_keys=False))
        meta_part = work / "meta.tar.gz"
        with tarfile.open(meta_part, "w:gz", compresslevel=6) as tar:
            for name in ("metadata.yaml", "templates", "boot"):
                tar.add(work / name, arcname=name, filter=_root_owned)
        raw = work / "disk.raw"
        with open(raw, "wb") as f:
            f.write(DISK_MARKER)
            f.truncate(DISK_SIZE)
        rootfs_part = work / "rootfs.img"
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", str(raw), str(rootfs_part)])
        info = parse_image(meta_part, rootfs_part, filename=meta_out.name)
        os.rename(meta_part, meta_out)
        os.rename(rootfs_part, rootfs_out)
        return meta_out, rootfs_out, info
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build croft's tiny VM image")
    parser.add_argument("output_dir")
    parser.add_argument("--kernel-cache", default=None)
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        meta, rootfs, info = build_vm_image(args.output_dir, kernel_cache=args.kernel_cache)
    except CroftError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(
        f"{meta} + {rootfs}: fingerprint {info.fingerprint}, type {info.type.value}, "
        f"built in {time.monotonic() - started:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
