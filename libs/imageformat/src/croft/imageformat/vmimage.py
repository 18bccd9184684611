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
  on the serial console (`lxc console`), python3 (this host's interpreter and the part of
  its stdlib the agent imports) and the agent loader;
- `rootfs.img` is a small disk whose first bytes are a marker the init checks, so a boot
  proves the root disk is attached.

The agent is not in the image: as LXD's lxd-agent-loader does, the loader mounts the VM's
configuration drive (9p, tag `config`), which the host fills with croft's agent at each
start (croft.compute.guest_agent), and runs it with `python3 -S -E`.
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
from collections.abc import Callable
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
    "kernel/drivers/virtio/virtio_balloon.ko",  # limits.memory lowered live
    "kernel/drivers/block/virtio_blk.ko",
    "kernel/drivers/char/virtio_console.ko",
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
    "kernel/drivers/acpi/button.ko",
    "kernel/drivers/input/evdev.ko",
    "kernel/fs/netfs/netfs.ko",
    "kernel/fs/fscache/fscache.ko",
    "kernel/net/9p/9pnet.ko",
    "kernel/net/9p/9pnet_virtio.ko",
    "kernel/fs/9p/9p.ko",
)
CMDLINE = "console=ttyS0 quiet panic=-1 rdinit=/init"
XZ_MAGIC = b"\xfd7zXZ\x00"
# The guest's python for the agent (stdlib only): this host's interpreter, with what these
# modules import, compiled (sourceless .pyc where the .py would be).
PYTHON = "/usr/bin/python3.11"
GUEST_STDLIB = (
    "__future__", "json", "pty", "selectors", "shutil", "signal", "socket", "struct", "subprocess",
    "termios", "fcntl", "errno", "stat", "typing", "time", "contextlib", "base64", "tty",
    "itertools", "encodings.utf_8", "encodings.latin_1", "encodings.ascii",
)  # fmt: skip
_LIST_MODULES = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
for m in list(sys.modules.values()):
    f = getattr(m, "__file__", None)
    if f:
        print(f)
"""

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
/bin/croft-agent-loader &
# A root shell on the serial console (lxc console), again after each exit.
(while true; do setsid -c sh -i </dev/ttyS0 >/dev/ttyS0 2>&1; sleep 1; done) &
while true; do sleep 3600; done
"""

# The agent loader (LXD's lxd-agent-loader): the agent is not in the image but on the
# VM's configuration drive (a 9p share tagged `config` the host fills at each start), so
# that updating croft updates the agent without rebuilding images. Restarted if it dies.
AGENT_LOADER = r"""#!/bin/sh
mkdir -p /run/croft_agent/config
if ! mount -t 9p config /run/croft_agent/config -o ro,trans=virtio,version=9p2000.L,access=0; then
    echo "croft-agent: no configuration drive" >/dev/console
    exit 1
fi
cp /run/croft_agent/config/croft-agent.py /run/croft_agent/croft-agent.py
umount /run/croft_agent/config
while true; do
    /usr/bin/python3 -S -E /run/croft_agent/croft-agent.py
    sleep 1
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


def _copy_with_libraries(binary: Path, root: Path) -> None:
    """`binary` and the shared libraries it loads, at the same paths under `root`."""
    out = run(["ldd", str(binary)]).stdout.decode()
    paths = [str(binary)]
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            paths.append(parts[2])
        elif parts and parts[0].startswith("/"):
            paths.append(parts[0])
    for path in paths:
        dest = root / path.lstrip("/")
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(path), dest)


def _python(root: Path, python: Path) -> None:
    """The agent's python (usr/bin/python3) and the part of its stdlib it imports."""
    import py_compile

    _copy_with_libraries(python, root)
    (root / "usr/bin/python3").symlink_to(python.name)
    out = run([str(python), "-S", "-E", "-c", _LIST_MODULES, *GUEST_STDLIB]).stdout.decode()
    for line in sorted(set(out.split())):
        source = Path(line)
        if source.suffix == ".so":
            _copy_with_libraries(source, root)
        elif source.suffix == ".py" and source.is_file():
            dest = root / str(source.with_suffix(".pyc")).lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            py_compile.compile(str(source), cfile=str(dest), dfile=str(source), doraise=True)


def _initramfs(kernel: Path, busybox: Path, dest: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix=".initramfs-", dir=dest.parent))
    try:
        for d in ("bin", "sbin", "proc", "sys", "dev", "tmp", "etc/acpi/PWRF", "lib/modules"):
            (root / d).mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)  # mkdtemp's 0700 would keep every other user out of "/"
        (root / "tmp").chmod(0o1777)
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
            ("bin/croft-agent-loader", AGENT_LOADER),
            ("etc/udhcpc.script", UDHCPC),
            ("etc/acpi/PWRF/00000080", POWER_BUTTON),
        ):
            (root / path).write_text(text)
            (root / path).chmod(0o755)
        (root / "etc/hostname").write_text("tiny-vm\n")
        (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc/group").write_text("root:x:0:\n")
        (root / "root").mkdir(mode=0o700, exist_ok=True)
        _python(root, Path(PYTHON))
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
        raw = work / "disk.raw"
        with open(raw, "wb") as f:
            f.write(DISK_MARKER)
            f.truncate(DISK_SIZE)
        properties = {
            "description": "croft tiny VM (busybox initramfs, direct kernel boot)",
            "os": "busybox",
            "release": "tiny",
            "variant": "vm",
            "kernel": vmlinuz.name.removeprefix("vmlinuz-"),
        }
        return pack_vm_image(work, properties, raw, meta_out, rootfs_out, extra=("boot",))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pack_vm_image(
    work: Path,
    properties: dict[str, str],
    raw: Path,
    meta_out: Path,
    rootfs_out: Path,
    *,
    extra: tuple[str, ...] = (),
    timeout: float = 600,
) -> tuple[Path, Path, ImageInfo]:
    """Pack a VM image in LXD's split format from `work` (where it builds): the metadata
    tarball (metadata.yaml with `properties`, an empty templates/ and the `extra` entries
    of `work`; gzip or xz as `meta_out`'s name says) and the raw disk `raw` as a compressed
    qcow2. Both land at their final names only once whole."""
    metadata = {
        "architecture": "x86_64",
        "creation_date": int(time.time()),
        "properties": properties,
        "templates": {},
    }
    (work / "templates").mkdir()
    (work / "metadata.yaml").write_text(yaml.safe_dump(metadata, sort_keys=False))
    xz = meta_out.name.endswith(".xz")
    meta_part = work / ("meta.tar.xz" if xz else "meta.tar.gz")
    with (
        tarfile.open(meta_part, "w:xz")
        if xz
        else tarfile.open(meta_part, "w:gz", compresslevel=6) as tar
    ):
        for name in ("metadata.yaml", "templates", *extra):
            tar.add(work / name, arcname=name, filter=_root_owned)
    rootfs_part = work / "rootfs.img"
    run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", str(raw), str(rootfs_part)],
        timeout=timeout,
    )
    info = parse_image(meta_part, rootfs_part, filename=meta_out.name)
    os.rename(meta_part, meta_out)
    os.rename(rootfs_part, rootfs_out)
    return meta_out, rootfs_out, info


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def report_build(build: Callable[[], tuple[Path, Path, ImageInfo]]) -> int:
    """A builder's command-line ending: what was built and how long it took, or the error."""
    started = time.monotonic()
    try:
        meta, rootfs, info = build()
    except CroftError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(
        f"{meta} + {rootfs}: fingerprint {info.fingerprint}, type {info.type.value}, "
        f"built in {time.monotonic() - started:.1f}s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build croft's tiny VM image")
    parser.add_argument("output_dir")
    parser.add_argument("--kernel-cache", default=None)
    args = parser.parse_args(argv)
    return report_build(lambda: build_vm_image(args.output_dir, kernel_cache=args.kernel_cache))


if __name__ == "__main__":
    sys.exit(main())
