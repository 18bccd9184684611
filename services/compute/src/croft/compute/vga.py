"""The VGA console of a virtual machine (`lxc console --type vga`): one stream per
connection to the VM's SPICE server, as LXD's `Console("vga")` dials its SPICE socket once
for each dynamic websocket of the console operation."""

from __future__ import annotations

from croft.common.errors import NotFound
from croft.compute.core import ComputeCore, driver_name
from croft.compute.drivers import ExecProcess


async def vga_console(core: ComputeCore, project: str, name: str) -> ExecProcess:
    """A byte stream to instance `name`'s SPICE server (stdin to it, stdout from it)."""
    try:
        driver = await core.driver_of(project, name)
        return await driver.vga_console(driver_name(project, name))
    except NotFound:
        raise NotFound("Instance not found") from None
