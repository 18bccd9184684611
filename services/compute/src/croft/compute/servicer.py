"""The compute service's gRPC surface: protobuf in, core calls, protobuf out."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from croft.common.errors import Cancelled, CroftError, InvalidArgument
from croft.common.models import InstanceRecord, SnapshotRecord
from croft.common.models.instance_wire import (
    instance_from_wire,
    instance_to_wire,
    snapshot_from_wire,
    snapshot_to_wire,
)
from croft.common.records import DEFAULT_PROJECT
from croft.common.riders import Rider, from_wire
from croft.compute.core import ComputeCore, CopyOf, RestoreOf
from croft.compute.drivers import ExecProcess
from croft.compute.publish import properties_of
from croft.compute.vga import vga_console
from croft.v1 import common_pb2, compute_pb2, compute_pb2_grpc

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# A command's output is read this much at a time, and at most OUTPUT_BACKLOG reads wait
# for the caller to take them: what an exec can hold here whatever the caller's pace.
READ_SIZE = 65536
OUTPUT_BACKLOG = 8
# After the command exits, how long output still held open by its children is relayed.
DRAIN_SECONDS = 1.0

Context = grpc.aio.ServicerContext[Any, Any]


def _ref(ref: common_pb2.InstanceRef) -> tuple[str, str]:
    if not ref.name:
        raise InvalidArgument("No instance name given")
    return ref.project or DEFAULT_PROJECT, ref.name


def _record(message: compute_pb2.Instance) -> dict[str, Any]:
    """The instance record of a request, as the core takes it (the stored shape)."""
    return instance_from_wire(message).dump()


def _reply(record: dict[str, Any], rider: Rider | None = None) -> compute_pb2.InstanceReply:
    return compute_pb2.InstanceReply(
        instance=instance_to_wire(InstanceRecord.model_validate(record)),
        closed=rider is not None and rider.written,
    )


def _snapshot_reply(snapshot: dict[str, Any]) -> compute_pb2.SnapshotReply:
    return compute_pb2.SnapshotReply(
        snapshot=snapshot_to_wire(SnapshotRecord.model_validate(snapshot))
    )


# How much of a refused upload compute still reads so its caller sees the refusal.
_DRAIN_LIMIT = 64 << 20


class ComputeServicer(compute_pb2_grpc.ComputeServicer):
    def __init__(self, core: ComputeCore) -> None:
        self.core = core

    async def CreateInstance(
        self, request: compute_pb2.CreateInstanceRequest, context: Context
    ) -> compute_pb2.InstanceReply:
        rider = from_wire(request.closing)
        created = await self.core.create(
            _record(request.instance), request.image_fingerprint, request.start, rider
        )
        return _reply(created, rider)

    async def UpdateInstance(
        self, request: compute_pb2.UpdateInstanceRequest, context: Context
    ) -> compute_pb2.InstanceReply:
        return _reply(await self.core.update(_record(request.instance), request.revision))

    async def DeleteInstance(
        self, request: common_pb2.InstanceRef, context: Context
    ) -> common_pb2.Empty:
        await self.core.delete(*_ref(request), force=True)
        return common_pb2.Empty()

    async def RenameInstance(
        self, request: compute_pb2.RenameInstanceRequest, context: Context
    ) -> compute_pb2.InstanceReply:
        return _reply(await self.core.rename(*_ref(request.instance), request.new_name))

    async def CopyInstance(
        self, request: compute_pb2.CopyInstanceRequest, context: Context
    ) -> compute_pb2.InstanceReply:
        project, name = _ref(request.source)
        source = CopyOf(
            project,
            name,
            snapshot=request.source_snapshot,
            instance_only=request.instance_only,
            allow_inconsistent=request.allow_inconsistent,
        )
        rider = from_wire(request.closing)
        return _reply(await self.core.copy(_record(request.instance), source, rider), rider)

    async def ImportInstance(
        self, request: compute_pb2.ImportInstanceRequest, context: Context
    ) -> compute_pb2.InstanceReply:
        snapshots = [snapshot_from_wire(snap).dump() for snap in request.snapshots]
        restore = RestoreOf(request.upload, snapshots)
        rider = from_wire(request.closing)
        return _reply(await self.core.import_(_record(request.instance), restore, rider), rider)

    async def MoveInstance(
        self, request: compute_pb2.MoveInstanceRequest, context: Context
    ) -> compute_pb2.InstanceReply:
        project, name = _ref(request.instance)
        moved = await self.core.move(
            project, name, request.pool, request.instance_only, live=request.live
        )
        return _reply(moved)

    async def ChangeState(
        self, request: compute_pb2.StateRequest, context: Context
    ) -> compute_pb2.InstanceReply:
        project, name = _ref(request.instance)
        known = (_record(request.known), request.revision) if request.HasField("known") else None
        rider = from_wire(request.closing)
        record = await self.core.change_state(
            project,
            name,
            request.action,
            force=request.force,
            timeout=request.timeout,
            known=known,
            rider=rider,
        )
        return _reply(record, rider)

    async def GetState(
        self, request: common_pb2.InstanceRef, context: Context
    ) -> compute_pb2.InstanceStateReply:
        state = await self.core.state(*_ref(request))
        return compute_pb2.InstanceStateReply(state=json.dumps(state))

    async def GetStates(
        self, request: compute_pb2.InstanceStatesRequest, context: Context
    ) -> compute_pb2.InstanceStatesReply:
        states = await self.core.states([_ref(ref) for ref in request.instances])
        return compute_pb2.InstanceStatesReply(
            states=[json.dumps(state) if state is not None else "" for state in states]
        )

    # ------------------------------------------------------------------ exec

    async def Exec(self, request_iterator, context):  # type: ignore[no-untyped-def]
        inputs = request_iterator.__aiter__()
        first = await anext(inputs)
        if first.WhichOneof("input") != "start":
            raise InvalidArgument("an exec stream must begin with its start message")
        start = first.start
        project, name = _ref(start.instance)
        if start.vga:
            process = await vga_console(self.core, project, name)
        elif start.console:
            process = await self.core.console(project, name, start.size.width, start.size.height)
        else:
            process = await self.core.exec(
                project,
                name,
                list(start.command),
                dict(start.environment) or None,
                start.cwd,
                start.user,
                start.group,
                start.interactive,
                start.size.width,
                start.size.height,
            )
        try:
            yield compute_pb2.ExecOutput(pid=process.pid)
            detach = start.console or start.vga
            async for output in _pump(process, inputs, detach_at_eof=detach):
                yield output
        finally:
            process.close()

    # ------------------------------------------------------------------ files

    async def PullFile(
        self, request: compute_pb2.FileRef, context: Context
    ) -> AsyncIterator[compute_pb2.FileChunk]:
        project, name = _ref(request.instance)
        entry = await self.core.pull_file(project, name, request.path)
        yield compute_pb2.FileChunk(
            header=compute_pb2.FileHeader(
                path=entry.path,
                uid=entry.uid,
                gid=entry.gid,
                mode=entry.mode,
                type=entry.type,
                entries=entry.entries or [],
                target=entry.target or "",
            )
        )
        content = entry.content or b""
        for offset in range(0, len(content), CHUNK):
            yield compute_pb2.FileChunk(data=content[offset : offset + CHUNK])

    async def PushFile(self, request_iterator, context):  # type: ignore[no-untyped-def]
        chunks = request_iterator.__aiter__()
        first = await anext(chunks)
        if first.WhichOneof("part") != "header":
            raise InvalidArgument("a file upload must begin with its header")
        header = first.header
        project, name = _ref(header.instance)

        async def data() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                if chunk.WhichOneof("part") == "end":
                    return
                yield chunk.data
            # No end: the caller's stream was cancelled (its client went away), which a
            # server reads as a plain end of stream. The driver then keeps the old file.
            raise Cancelled("The upload was cut short")

        try:
            await self.core.push_file(
                project,
                name,
                header.path,
                header.type or "file",
                data(),
                uid=max(header.uid, 0),
                gid=max(header.gid, 0),
                mode=header.mode
                if header.mode >= 0
                else (0o755 if header.type == "directory" else 0o644),
                append=header.write == "append",
            )
        except CroftError:
            # Refused while the body still comes: take the rest of it first (up to a
            # bound), so that the caller gets this refusal and not the transport's
            # "Internal error from Core" for a stream the server stopped reading.
            drained = 0
            async for chunk in chunks:
                drained += len(chunk.data)
                if chunk.WhichOneof("part") == "end" or drained > _DRAIN_LIMIT:
                    break
            raise
        return common_pb2.Empty()

    async def DeleteFile(self, request: compute_pb2.FileRef, context: Context) -> common_pb2.Empty:
        await self.core.delete_file(*_ref(request.instance), request.path)
        return common_pb2.Empty()

    # ------------------------------------------------------------------ snapshots and logs

    async def CreateSnapshot(
        self, request: compute_pb2.SnapshotRequest, context: Context
    ) -> compute_pb2.SnapshotReply:
        project, name = _ref(request.instance)
        return _snapshot_reply(
            await self.core.create_snapshot(project, name, request.snapshot, request.expires_at)
        )

    async def DeleteSnapshot(
        self, request: compute_pb2.SnapshotRequest, context: Context
    ) -> common_pb2.Empty:
        await self.core.delete_snapshot(*_ref(request.instance), request.snapshot)
        return common_pb2.Empty()

    async def RenameSnapshot(
        self, request: compute_pb2.SnapshotRequest, context: Context
    ) -> compute_pb2.SnapshotReply:
        project, name = _ref(request.instance)
        return _snapshot_reply(
            await self.core.rename_snapshot(project, name, request.snapshot, request.new_name)
        )

    async def RestoreSnapshot(
        self, request: compute_pb2.SnapshotRequest, context: Context
    ) -> compute_pb2.InstanceReply:
        project, name = _ref(request.instance)
        return _reply(await self.core.restore_snapshot(project, name, request.snapshot))

    async def ClearConsoleLog(
        self, request: common_pb2.InstanceRef, context: Context
    ) -> common_pb2.Empty:
        await self.core.clear_console_log(*_ref(request))
        return common_pb2.Empty()

    async def ConsoleLog(
        self, request: common_pb2.InstanceRef, context: Context
    ) -> compute_pb2.LogReply:
        return compute_pb2.LogReply(content=await self.core.console_log(*_ref(request)))

    async def Logs(self, request: compute_pb2.LogRequest, context: Context) -> compute_pb2.LogReply:
        project, name = _ref(request.instance)
        if not request.file:
            return compute_pb2.LogReply(files=["lxc.log"])
        if request.file != "lxc.log":
            raise InvalidArgument(f'Log file "{request.file}" does not exist')
        return compute_pb2.LogReply(content=await self.core.log_file(project, name))

    # ------------------------------------------------------------------ publish

    async def PublishInstance(
        self, request: compute_pb2.PublishRequest, context: Context
    ) -> AsyncIterator[compute_pb2.PublishChunk]:
        project, name = _ref(request.instance)
        stream = self.core.publish(
            project,
            name,
            request.snapshot,
            properties_of(request.properties),
            request.expires_at,
            request.compression,
        )
        async for data in stream:
            yield compute_pb2.PublishChunk(data=data)


async def _pump(
    process: ExecProcess, inputs: AsyncIterator[compute_pb2.ExecInput], detach_at_eof: bool
) -> AsyncIterator[compute_pb2.ExecOutput]:
    """Relay a running command's output as ExecOutputs and the caller's input to it; the
    exit code comes last. At the end of the caller's input, the command gets EOF, or with
    `detach_at_eof` (a console) is ended.

    Output is read only as fast as the caller takes it: at most `OUTPUT_BACKLOG` reads
    wait here, then the command's pipes are left unread (the command blocks writing, as
    under LXD) until the caller catches up. The gRPC stream's own flow control holds a
    yield here while the caller is behind."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[compute_pb2.ExecOutput | None] = asyncio.Queue()
    watched: dict[int, Callable[[], None]] = {}  # open output fds and their callbacks
    paused = False

    def pause() -> None:
        nonlocal paused
        paused = True
        for fd in watched:
            loop.remove_reader(fd)

    def resume() -> None:
        nonlocal paused
        paused = False
        for fd, readable in watched.items():
            loop.add_reader(fd, readable)

    def watch(fd: int, field: str) -> None:
        os.set_blocking(fd, False)

        def readable() -> None:
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:  # EIO: the pty's other side is gone
                if exc.errno != errno.EIO:
                    raise
                data = b""
            if data:
                # `field` is "stdout" or "stderr", both bytes fields of ExecOutput.
                queue.put_nowait(compute_pb2.ExecOutput(**{field: data}))  # type: ignore[arg-type]
                if queue.qsize() >= OUTPUT_BACKLOG and not paused:
                    pause()
            else:
                loop.remove_reader(fd)
                del watched[fd]
                queue.put_nowait(None)

        watched[fd] = readable
        loop.add_reader(fd, readable)

    if process.pty is not None:
        watch(process.pty, "stdout")
    else:
        assert process.stdout is not None and process.stderr is not None
        watch(process.stdout, "stdout")
        watch(process.stderr, "stderr")
    open_streams = len(watched)
    stdin_fd = process.pty if process.pty is not None else process.stdin

    def taken() -> None:
        if paused and queue.qsize() < OUTPUT_BACKLOG:
            resume()

    async def feed() -> None:
        async for message in inputs:
            try:
                await apply(message)
            except Exception as exc:
                # One bad input (a signal the kernel refuses, an impossible window size)
                # must not end the handling of the ones after it.
                log.info("exec of pid %d: ignoring %s: %s", process.pid,
                         message.WhichOneof("input"), exc)  # fmt: skip

    async def apply(message: compute_pb2.ExecInput) -> None:
        kind = message.WhichOneof("input")
        if kind == "stdin" and stdin_fd is not None:
            await _write_all(stdin_fd, message.stdin)
        elif kind == "stdin_closed":
            if detach_at_eof:
                process.signal(signal.SIGKILL)
            elif process.pty is not None:
                await _write_all(process.pty, b"\x04")
            elif process.stdin is not None:
                os.close(process.stdin)
                process.stdin = None
        elif kind == "resize":
            process.resize(message.resize.width, message.resize.height)
        elif kind == "signal":
            process.signal(message.signal)

    feeder = asyncio.create_task(feed())
    waiter = asyncio.create_task(process.wait())
    try:
        while open_streams:
            getter = asyncio.create_task(queue.get())
            done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break  # exited: drain below
            item = getter.result()
            taken()
            if item is None:
                open_streams -= 1
            else:
                yield item
        # The command is gone (or closed its output): relay what is left. Output still
        # held open by its children is waited for `DRAIN_SECONDS` at most; the time the
        # caller takes to read what is relayed does not count.
        waited = 0.0
        while open_streams and waited < DRAIN_SECONDS:
            began = loop.time()
            try:
                item = await asyncio.wait_for(queue.get(), DRAIN_SECONDS - waited)
            except TimeoutError:
                break
            waited += loop.time() - began
            taken()
            if item is None:
                open_streams -= 1
            else:
                yield item
        code = await waiter
        yield compute_pb2.ExecOutput(exit_code=code)
    finally:
        for fd in list(watched):
            loop.remove_reader(fd)
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await feeder
        if not waiter.done():
            waiter.cancel()


async def _write_all(fd: int, data: bytes) -> None:
    os.set_blocking(fd, False)
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
            view = view[written:]
        except BlockingIOError:
            ready = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().add_writer(fd, ready.set_result, None)
            try:
                await ready
            finally:
                asyncio.get_running_loop().remove_writer(fd)
        except OSError:
            return  # the command closed its input
