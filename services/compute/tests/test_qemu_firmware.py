"""The qemu driver's UEFI boot (OVMF) for images without a kernel for direct boot: the
domain it defines with and without secure boot, and what it refuses (missing firmware,
an image that cannot secure-boot, secure boot asked of a direct-boot image). Real
libvirt; no guest boots here (tests/test_vm_debian.py boots one)."""

from __future__ import annotations

import asyncio
import shutil
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from croft.common.errors import InvalidArgument
from croft.compute import virtd
from croft.compute.drivers import InstanceSpec

libvirt = pytest.importorskip("libvirt")
qemu = pytest.importorskip("croft.compute.drivers.qemu")

ROOT = Path("/tmp/croft-qemu-firmware-test")


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    if qemu.QemuDriver.unavailable_reason():
        pytest.skip(qemu.QemuDriver.unavailable_reason())
    if not Path(qemu.OVMF_DIR, "OVMF_CODE_4M.fd").is_file():
        pytest.skip("ovmf is not installed (make setup)")
    path = ROOT / f"run-{uuid.uuid4().hex[:8]}"
    (path / "volume").mkdir(parents=True)
    (path / "direct" / "boot").mkdir(parents=True)
    (path / "direct" / "boot" / "vmlinux").write_bytes(b"\x7fELF")
    with open(path / "volume" / "root.img", "wb") as f:
        f.truncate(64 * 1024**2)
    virtd.ensure_running(path / "state", path / "log")
    yield path
    driver = qemu.QemuDriver(vmpath=str(path / "vms"))
    conn = libvirt.open(qemu.URI)
    try:
        for dom in conn.listAllDomains():
            if dom.name().startswith(driver.prefix):
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    finally:
        conn.close()
    shutil.rmtree(path, ignore_errors=True)


def spec(work: Path, name: str, config: dict[str, str], direct: bool = False) -> InstanceSpec:
    volume = work / ("direct" if direct else "volume")
    return InstanceSpec(
        name=name,
        rootfs="",
        config={
            "limits.memory": "256MiB",
            "volatile.uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, str(work / name))),
            **config,
        },
        devices={"root": {"type": "disk", "path": "/", "pool": "default"}},
        volume=str(volume),
        disk=str(work / "volume" / "root.img"),
    )


def defined(work: Path, name: str) -> ET.Element | None:
    driver = qemu.QemuDriver(vmpath=str(work / "vms"))
    conn = libvirt.open(qemu.URI)
    try:
        dom = conn.lookupByName(driver.domain_name(name))
        return ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()


def test_uefi_with_secure_boot_by_default(work: Path) -> None:
    driver = qemu.QemuDriver(vmpath=str(work / "vms"))
    asyncio.run(driver.create(spec(work, "sb", {})))
    xml = defined(work, "sb")
    assert xml is not None
    loader = xml.find("os/loader")
    assert loader is not None and loader.get("secure") == "yes"
    assert loader.text == "/usr/share/OVMF/OVMF_CODE_4M.ms.fd"
    assert xml.find("os/kernel") is None
    nvram = xml.find("os/nvram")
    assert nvram is not None and nvram.get("template") == "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"
    assert xml.find("features/smm") is not None
    # Secure boot off (a redefinition, as `lxc config set` makes): plain OVMF, its own
    # variables store.
    asyncio.run(driver.redefine(spec(work, "sb", {"security.secureboot": "false"})))
    xml = defined(work, "sb")
    assert xml is not None
    loader = xml.find("os/loader")
    assert loader is not None and loader.get("secure") == "no"
    assert loader.text == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    nvram = xml.find("os/nvram")
    assert nvram is not None and nvram.get("template") == "/usr/share/OVMF/OVMF_VARS_4M.fd"
    assert nvram.text != str(work / "vms" / "sb" / "nvram-secureboot.fd")
    asyncio.run(driver.delete("sb"))
    assert defined(work, "sb") is None


def test_missing_ovmf_refused(work: Path) -> None:
    empty = work / "no-ovmf"
    empty.mkdir(exist_ok=True)
    driver = qemu.QemuDriver(vmpath=str(work / "vms"), ovmf_dir=str(empty))
    with pytest.raises(InvalidArgument, match="Required EFI firmware with secure boot is missing"):
        asyncio.run(driver.create(spec(work, "noovmf", {})))
    with pytest.raises(InvalidArgument, match=r"OVMF_CODE_4M.fd, .*install the ovmf package\)$"):
        asyncio.run(driver.create(spec(work, "noovmf", {"security.secureboot": "false"})))
    assert defined(work, "noovmf") is None
    assert not (work / "vms" / "noovmf").exists()


def test_secure_boot_refused_where_it_cannot_work(work: Path) -> None:
    driver = qemu.QemuDriver(vmpath=str(work / "vms"))
    with pytest.raises(InvalidArgument, match="incompatible with secureboot"):
        asyncio.run(driver.create(spec(work, "req", {"image.requirements.secureboot": "false"})))
    with pytest.raises(InvalidArgument, match="boots its kernel directly"):
        asyncio.run(driver.create(spec(work, "dir", {"security.secureboot": "true"}, direct=True)))
    assert defined(work, "req") is None and defined(work, "dir") is None
    # Without secure boot asked, a direct-boot image is defined as before.
    asyncio.run(driver.create(spec(work, "dir", {}, direct=True)))
    xml = defined(work, "dir")
    assert xml is not None and xml.find("os/loader") is None
    asyncio.run(driver.delete("dir"))
