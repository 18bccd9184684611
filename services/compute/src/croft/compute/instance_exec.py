"""Commands and consoles in an instance, and its logs."""

from __future__ import annotations

from croft.common.errors import InvalidArgument, NotFound
from croft.compute.base import CoreBase, driver_name
from croft.compute.drivers import ExecProcess


class InstanceExec(CoreBase):
    """`exec`, `console` and the logs."""

    async def exec(
        self,
        project: str,
        name: str,
        argv: list[str],
        env: dict[str, str] | None,
        cwd: str | None,
        uid: int,
        gid: int,
        interactive: bool,
        width: int,
        height: int,
    ) -> ExecProcess:
        # No record read: the api found the instance running, and the driver refuses
        # one that is not there or not running.
        if not argv:
            raise InvalidArgument("No command given")
        try:
            driver = await self.driver_of(project, name)
            return await driver.exec(
                driver_name(project, name), argv, env=env or None, cwd=cwd or None,
                uid=uid, gid=gid, interactive=interactive, width=width or 80, height=height or 24,
            )  # fmt: skip
        except NotFound:
            raise NotFound("Instance not found") from None

    async def console(self, project: str, name: str, width: int, height: int) -> ExecProcess:
        # As exec: the api found it running; the driver refuses one that is not.
        try:
            driver = await self.driver_of(project, name)
            return await driver.console(
                driver_name(project, name), width=width or 80, height=height or 24
            )
        except NotFound:
            raise NotFound("Instance not found") from None

    async def console_log(self, project: str, name: str) -> bytes:
        record, _ = await self.record(project, name)
        return await self.driver_for(record).console_log(driver_name(project, name))

    async def clear_console_log(self, project: str, name: str) -> None:
        record, _ = await self.record(project, name)
        await self.driver_for(record).clear_console_log(driver_name(project, name))
        await self.lifecycle("instance-console-reset", project, name)

    async def log_file(self, project: str, name: str) -> bytes:
        record, _ = await self.record(project, name)
        try:
            with open(self.driver_for(record).log_path(driver_name(project, name)), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""
