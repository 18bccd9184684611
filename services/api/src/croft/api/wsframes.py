"""One encoded websocket frame, written to many connections: the `/1.0/events` fan-out.

Through ASGI, every message to every listener is framed again and goes through the
listener's own task: an event that ten `lxc` clients listen to cost ten task switches and
ten framings. `FramedWebSocketProtocol` (uvicorn's protocol, used for every croft
websocket) offers the app a writer for whole text frames, in the connection's scope under
`FRAME_WRITER`, so the events hub encodes an event once and writes it to each listener's
transport directly.

Only offered when no extension was negotiated (a permessage-deflate connection gets its
frames from the protocol, as before).
"""

from __future__ import annotations

import struct
from collections.abc import Generator
from typing import Any, Protocol

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

FRAME_WRITER = "croft.frame-writer"


class FrameWriter(Protocol):
    def __call__(self, frame: bytes, limit: int) -> bool: ...


def text_frame(payload: bytes) -> bytes:
    """A final, unmasked (server-to-client) text frame holding `payload` (UTF-8)."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload


# The longest request line a websocket upgrade may have: what the HTTP parser in front
# accepts for any request (Go's net/http, LXD's, reads 1 MiB of head). websockets alone
# stops at 8 KiB, and uvicorn never sends the answer it prepares for a longer one.
REQUEST_LINE_LIMIT = 1 << 20


class FramedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websocket protocol, offering `write_text_frame` to the app, taking the
    request lines plain HTTP takes, and answering a handshake it cannot parse."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        reader = self.conn.reader
        read_line = reader.read_line
        lines = 0

        def read_longer_first_line(
            limit: int, too_long: type[Exception]
        ) -> Generator[None, None, bytearray]:
            nonlocal lines
            lines += 1
            return read_line(max(limit, REQUEST_LINE_LIMIT) if lines == 1 else limit, too_long)

        # A bound method replaced by a plain function of the same call: mypy sees a method.
        reader.read_line = read_longer_first_line  # type: ignore[method-assign,assignment]
        # The handshake parser took the reader's method when the connection was made;
        # it has read nothing yet: start it again with the new one.
        self.conn.parser = self.conn.parse()
        next(self.conn.parser)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.handshake_initiated or self.conn.handshake_exc is None:
            return
        # A request websockets refused (a header line over its limit, say): it prepared
        # an HTTP answer (or only an end of stream) that uvicorn leaves unsent.
        if not self.transport.is_closing():
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if not self.close_sent and not self.conn.extensions:
            # ASGI types an extension as a dict of its options; croft's own is the writer.
            self.scope["extensions"][FRAME_WRITER] = self.write_text_frame  # type: ignore[assignment]

    def write_text_frame(self, frame: bytes, limit: int) -> bool:
        """Write a frame from `text_frame`. False when the client has more than `limit`
        bytes still to read: it is not keeping up. A closing connection takes nothing and
        the app hears of the close through `receive`, as usual."""
        transport = self.transport
        if not self.handshake_complete or self.close_sent or transport.is_closing():
            return True
        if transport.get_write_buffer_size() > limit:
            return False
        transport.write(frame)
        return True
