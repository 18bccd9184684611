"""Files in an instance: pulled, pushed (files, directories, appends) and deleted."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from croft.common.errors import Conflict, InvalidArgument
from croft.compute.base import CoreBase, driver_name
from croft.compute.drivers import FileEntry


class InstanceFiles(CoreBase):
    """`pull_file`, `push_file`, `delete_file`."""

    async def pull_file(self, project: str, name: str, path: str) -> FileEntry:
        record, _ = await self.record(project, name)
        return await self.driver_for(record).pull_file(driver_name(project, name), path)

    async def push_file(
        self,
        project: str,
        name: str,
        path: str,
        kind: str,
        data: AsyncIterator[bytes],
        uid: int,
        gid: int,
        mode: int,
        target: str = "",
        append: bool = False,
    ) -> None:
        record, _ = await self.record(project, name)
        driver = self.driver_for(record)
        host_name = driver_name(project, name)
        if kind == "directory":
            with contextlib.suppress(Conflict):  # LXD: pushing an existing directory is fine
                await driver.mkdir(host_name, path, uid=uid, gid=gid, mode=mode)
            return
        if kind == "symlink":
            raise InvalidArgument("Pushing symlinks is not supported yet")
        if kind not in ("", "file"):
            raise InvalidArgument(f'Invalid file type "{kind}"')
        if append:
            existing = await driver.pull_file(host_name, path)
            head = existing.content or b""

            async def joined() -> AsyncIterator[bytes]:
                yield head
                async for chunk in data:
                    yield chunk

            data = joined()
        await driver.push_file(host_name, path, data, uid=uid, gid=gid, mode=mode)

    async def delete_file(self, project: str, name: str, path: str) -> None:
        record, _ = await self.record(project, name)
        await self.driver_for(record).delete_path(driver_name(project, name), path, recursive=True)
