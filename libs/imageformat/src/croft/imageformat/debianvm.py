"""Build a Debian 12 virtual-machine image locally (no image server): `debian-12-vm`.

The image is in LXD's split VM format: `debian-12-vm.meta.tar.xz` (metadata.yaml,
templates/) and a qcow2 `debian-12-vm.rootfs.img` (`lxc image import META ROOTFS`). Unlike
croft's tiny image it carries no kernel for direct boot: it boots as LXD's own VM images
do, through UEFI (OVMF) from its own disk, with secure boot:

- the disk is GPT: an EFI system partition (Debian's Microsoft-signed shim as
  `EFI/BOOT/BOOTX64.EFI`, its signed GRUB beside it, and a grub.cfg that boots the kernel
  from the root partition) and an ext4 root labelled `croft-root`;
- the root is `debootstrap --variant=minbase` of bookworm with systemd, udev, dbus,
  Debian's signed kernel and a small initramfs (virtio, ext4), networkd asking DHCP on
  every `en*` NIC, and root's password empty (for `lxc console`);
- croft's agent loader (`croft.imageformat.vmimage.AGENT_LOADER`, the same as the tiny image's: it runs the agent the host offers on the configuration drive) is
  installed as `/usr/local/bin/croft-agent`, started by `croft-agent.service` when udev
  sees the virtio-serial port `org.croft.agent.0` (as lxd-agent-loader's unit and rule do).

Nothing is mounted and no loop device is used: each partition is built as a file
(`mkfs.vfat -C` + mtools, `mkfs.ext4 -d`) and written into the disk at its offset.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from croft.common.errors import Internal
from croft.common.proc import run
from croft.imageformat.builder import default_mirror
from croft.imageformat.format import ImageInfo
from croft.imageformat.vmimage import AGENT_LOADER, AGENT_PORT, pack_vm_image, report_build

NAME = "debian-12-vm"
SUITE = "bookworm"
ROOT_LABEL = "croft-root"
DISK_SIZE = 2 * 1024**3
ESP_SIZE = 64 * 1024**2
ESP_START = 2048  # sectors
SECTOR = 512
PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",
    "iproute2",
    "kmod",
    "python3",
    "linux-image-amd64",
    "initramfs-tools",
)
# Downloaded on the host and unpacked (their maintainer scripts would run grub-install).
EFI_PACKAGES = ("shim-signed", "grub-efi-amd64-signed")
EFI_CACHE = Path("/var/cache/croft/vm-efi")
DEBOOTSTRAP_TIMEOUT = 1800
# Kernel module trees a VM never needs (about two thirds of the package's size).
DROP_MODULES = (
    "drivers/gpu",
    "drivers/net/wireless",
    "drivers/net/ethernet",
    "drivers/media",
    "drivers/infiniband",
    "drivers/staging",
    "drivers/bluetooth",
    "drivers/isdn",
    "drivers/iio",
    "drivers/hid",
    "drivers/usb",
    "drivers/scsi/qla2xxx",
    "drivers/scsi/lpfc",
    "drivers/scsi/mpt3sas",
    "drivers/mmc",
    "drivers/mtd",
    "sound",
    "net/wireless",
    "net/mac80211",
    "net/bluetooth",
)
INITRAMFS_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "virtio_console",
    "virtio_net",
    "ext4",
    "crc32c_generic",
)
# Under emulation on a busy host the guest runs many times slower than the wall clock:
# no service watchdogs (journald's 3 min would kill it), and udev gets time.
CMDLINE = (
    f"root=LABEL={ROOT_LABEL} ro console=tty0 console=ttyS0,115200n8 quiet "
    "systemd.service_watchdogs=0 udev.event_timeout=600"
)

GRUB_CFG = """set timeout=0
search --no-floppy --label {label} --set=root
linux /boot/vmlinuz-{version} {cmdline}
initrd /boot/initrd.img-{version}
boot
"""

AGENT_UNIT = f"""[Unit]
Description=croft guest agent
ConditionPathExists=/dev/virtio-ports/{AGENT_PORT}
DefaultDependencies=no
After=systemd-udevd.service

[Service]
ExecStart=/usr/local/bin/croft-agent
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""

AGENT_RULE = (
    f'ACTION=="add", SYMLINK=="virtio-ports/{AGENT_PORT}", TAG+="systemd", '
    'ENV{SYSTEMD_WANTS}+="croft-agent.service"\n'
)

NETWORK = """[Match]
Name=en* eth*

[Network]
DHCP=ipv4
LinkLocalAddressing=no
"""

FSTAB = f"LABEL={ROOT_LABEL} / ext4 defaults,errors=remount-ro 0 1\n"

# systemd's 90 s defaults for a device to appear or a unit to start are minutes of
# guest work under TCG when the host is loaded; a guest that gives up on ttyS0 or
# journald boots degraded for no reason.
SYSTEM_CONF = """[Manager]
DefaultTimeoutStartSec=900s
DefaultDeviceTimeoutSec=900s
"""


def fetch_efi(cache: Path) -> tuple[Path, Path]:
    """Debian's signed shim and GRUB (downloaded once): (shimx64.efi, grubx64.efi)."""
    tree = cache / "tree"
    shim = tree / "usr/lib/shim/shimx64.efi.signed"
    grub = tree / "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"
    if shim.is_file() and grub.is_file():
        return shim, grub
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".efi-", dir=cache))
    try:
        run(["apt-get", "download", *EFI_PACKAGES], cwd=str(work), timeout=600)
        unpacked = work / "tree"
        for deb in work.glob("*.deb"):
            run(["dpkg-deb", "-x", str(deb), str(unpacked)], timeout=300)
        shutil.rmtree(tree, ignore_errors=True)
        os.rename(unpacked, tree)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not (shim.is_file() and grub.is_file()):
        raise Internal(f"{' and '.join(EFI_PACKAGES)} hold no signed shim and GRUB")
    return shim, grub


def bootstrap(rootfs: Path, mirror: str) -> None:
    """debootstrap of bookworm with a kernel into `rootfs` (a new directory)."""
    argv = ["debootstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES)]
    run([*argv, SUITE, str(rootfs), mirror], timeout=DEBOOTSTRAP_TIMEOUT)


def _write(root: Path, path: str, text: str, mode: int = 0o644) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(mode)


def configure(rootfs: Path) -> str:
    """Make the bootstrapped tree a VM's root; returns the kernel version."""
    versions = sorted(p.name.removeprefix("vmlinuz-") for p in (rootfs / "boot").glob("vmlinuz-*"))
    if not versions:
        raise Internal("the bootstrapped tree has no kernel in /boot")
    version = versions[-1]
    modules = rootfs / "lib/modules" / version / "kernel"
    for rel in DROP_MODULES:
        shutil.rmtree(modules / rel, ignore_errors=True)
    _write(rootfs, "/etc/fstab", FSTAB)
    _write(rootfs, "/etc/hostname", "debian\n")
    _write(rootfs, "/etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n")
    _write(rootfs, "/etc/systemd/network/50-dhcp.network", NETWORK)
    _write(rootfs, "/etc/systemd/system.conf.d/croft.conf", SYSTEM_CONF)
    _write(rootfs, "/usr/local/bin/croft-agent", AGENT_LOADER, 0o755)
    _write(rootfs, "/etc/systemd/system/croft-agent.service", AGENT_UNIT)
    _write(rootfs, "/etc/udev/rules.d/99-croft-agent.rules", AGENT_RULE)
    _write(rootfs, "/etc/initramfs-tools/conf.d/croft.conf", "MODULES=list\nCOMPRESS=gzip\n")
    _write(rootfs, "/etc/initramfs-tools/modules", "\n".join(INITRAMFS_MODULES) + "\n")
    _write(
        rootfs,
        "/etc/apt/sources.list",
        f"deb http://deb.debian.org/debian {SUITE} main\n"
        f"deb http://deb.debian.org/debian-security {SUITE}-security main\n",
    )
    chroot = ["chroot", str(rootfs)]
    run([*chroot, "depmod", "-a", version], timeout=300)
    run([*chroot, "update-initramfs", "-u", "-k", version], timeout=600)
    run([*chroot, "systemctl", "enable", "systemd-networkd.service", "croft-agent.service"])
    # Nothing in the image waits for a network it may never get.
    run([*chroot, "systemctl", "mask", "systemd-networkd-wait-online.service"])
    run([*chroot, "passwd", "-d", "root"])
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootfs / cache).glob("*"):
            if entry.is_file():
                entry.unlink()
    return version


def _esp(dest: Path, shim: Path, grub: Path, grub_cfg: str) -> None:
    run(["mkfs.vfat", "-F", "32", "-n", "ESP", "-C", str(dest), str(ESP_SIZE // 1024)])
    cfg = dest.with_suffix(".cfg")
    cfg.write_text(grub_cfg)
    img = ["-i", str(dest)]
    run(["mmd", *img, "::/EFI", "::/EFI/BOOT", "::/EFI/debian"])
    for src, target in (
        (shim, "::/EFI/BOOT/BOOTX64.EFI"),
        (grub, "::/EFI/BOOT/grubx64.efi"),
        (cfg, "::/EFI/BOOT/grub.cfg"),
        (shim, "::/EFI/debian/shimx64.efi"),
        (grub, "::/EFI/debian/grubx64.efi"),
        (cfg, "::/EFI/debian/grub.cfg"),
    ):
        run(["mcopy", *img, str(src), target])
    cfg.unlink()


def disk_image(rootfs: Path, version: str, shim: Path, grub: Path, dest: Path) -> None:
    """A raw GPT disk of DISK_SIZE at `dest`: the ESP, then the ext4 root."""
    with open(dest, "wb") as f:
        f.truncate(DISK_SIZE)
    esp_sectors = ESP_SIZE // SECTOR
    layout = (
        "label: gpt\nunit: sectors\n"
        f"start={ESP_START}, size={esp_sectors}, type=uefi, name=esp\n"
        f"start={ESP_START + esp_sectors}, type=4f68bce3-e8cd-4db1-96e7-fbcaf984b709, name=root\n"
    )
    run(["sfdisk", "--quiet", str(dest)], input=layout.encode())
    table = json.loads(run(["sfdisk", "--json", str(dest)]).stdout)["partitiontable"]
    root_part = table["partitions"][1]
    work = dest.parent
    esp = work / "esp.img"
    _esp(esp, shim, grub, GRUB_CFG.format(label=ROOT_LABEL, version=version, cmdline=CMDLINE))
    root = work / "root.img"
    root_bytes = root_part["size"] * SECTOR
    run(
        [
            "mkfs.ext4",
            "-q",
            "-L",
            ROOT_LABEL,
            "-d",
            str(rootfs),
            str(root),
            f"{root_bytes // 1024}k",
        ],
        timeout=900,
    )
    for part, start in ((esp, ESP_START), (root, root_part["start"])):
        run(
            ["dd", f"if={part}", f"of={dest}", "bs=1M", "conv=notrunc,sparse",
             f"seek={start * SECTOR}", "oflag=seek_bytes", "status=none"],
            timeout=900,
        )  # fmt: skip
        part.unlink()


def build_debian_vm_image(
    output_dir: str | os.PathLike[str],
    *,
    mirror: str | None = None,
    rootfs: str | os.PathLike[str] | None = None,
    efi_cache: str | os.PathLike[str] | None = None,
) -> tuple[Path, Path, ImageInfo]:
    """Write `debian-12-vm.meta.tar.xz` and `debian-12-vm.rootfs.img` into `output_dir`;
    returns their paths and the image's info (type virtual-machine). `rootfs`: an
    already bootstrapped tree to use (and change) instead of a new debootstrap."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    shim, grub = fetch_efi(Path(efi_cache) if efi_cache else EFI_CACHE)
    meta_out, rootfs_out = out / f"{NAME}.meta.tar.xz", out / f"{NAME}.rootfs.img"
    work = Path(tempfile.mkdtemp(prefix=f".build-{NAME}-", dir=out))
    try:
        tree = Path(rootfs) if rootfs else work / "rootfs"
        if not rootfs:
            bootstrap(tree, mirror or default_mirror())
        version = configure(tree)
        raw = work / "disk.raw"
        disk_image(tree, version, shim, grub, raw)
        properties = {
            "description": "Debian bookworm (UEFI, secure boot, systemd, croft agent)",
            "os": "debian",
            "release": SUITE,
            "version": "12",
            "variant": "vm",
            "kernel": version,
        }
        return pack_vm_image(work, properties, raw, meta_out, rootfs_out, timeout=1800)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build croft's Debian 12 UEFI VM image")
    parser.add_argument("output_dir")
    parser.add_argument("--mirror", default=None)
    parser.add_argument("--rootfs", default=None, help="an already bootstrapped tree to use")
    args = parser.parse_args(argv)
    return report_build(
        lambda: build_debian_vm_image(args.output_dir, mirror=args.mirror, rootfs=args.rootfs)
    )


if __name__ == "__main__":
    sys.exit(main())
