"""A streaming reader of `multipart/form-data` bodies: LXD's split image upload (`lxc
image import META ROOTFS`) and the body another LXD's `/export` sends for a split image.
The parts' data is never held whole, only a delimiter's length of it between chunks.
`part_head` writes such a body's part headers (an export, the client's upload)."""

from __future__ import annotations

import email.message

from croft.common.errors import InvalidArgument


def part_head(boundary: str, name: str, filename: str, *, first: bool) -> bytes:
    """The delimiter and headers that open a file part of a multipart/form-data body (the
    data follows; the body ends with `\r\n--<boundary>--\r\n`)."""
    return (
        ("" if first else "\r\n")
        + f"--{boundary}\r\n"
        + f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        + "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


class MultipartPart:
    """The start of a part of a multipart/form-data body."""

    def __init__(self, name: str, filename: str) -> None:
        self.name = name
        self.filename = filename


class MultipartParser:
    """A streaming multipart/form-data parser: `feed(chunk)` returns, in order, a
    MultipartPart at the start of each part and the part's data as bytes; the data is
    never held whole, only a delimiter's length of it between chunks."""

    MAX_HEADERS = 16 << 10

    def __init__(self, boundary: bytes) -> None:
        self.delimiter = b"\r\n--" + boundary
        self.buffer = bytearray(b"\r\n")  # so that the first boundary looks like the others
        self.state = "preamble"

    def feed(self, chunk: bytes) -> list[MultipartPart | bytes]:
        self.buffer += chunk
        events: list[MultipartPart | bytes] = []
        keep = len(self.delimiter) - 1
        while True:
            if self.state in ("preamble", "data"):
                at = self.buffer.find(self.delimiter)
                if at < 0:
                    if self.state == "data" and len(self.buffer) > keep:
                        events.append(bytes(self.buffer[: len(self.buffer) - keep]))
                    del self.buffer[: max(len(self.buffer) - keep, 0)]
                    return events
                if self.state == "data" and at > 0:
                    events.append(bytes(self.buffer[:at]))
                del self.buffer[: at + len(self.delimiter)]
                self.state = "boundary"
            elif self.state == "boundary":
                if len(self.buffer) < 2:
                    return events
                if self.buffer[:2] == b"--":
                    self.state = "end"
                    continue
                end = self.buffer.find(b"\r\n")
                if end < 0:
                    return events
                if self.buffer[:end].strip(b" \t"):
                    raise InvalidArgument("Invalid multipart body: garbage after a boundary")
                del self.buffer[: end + 2]
                self.state = "headers"
            elif self.state == "headers":
                if self.buffer[:2] == b"\r\n":
                    head, rest = b"", 2
                else:
                    end = self.buffer.find(b"\r\n\r\n")
                    if end < 0:
                        if len(self.buffer) > self.MAX_HEADERS:
                            raise InvalidArgument("Invalid multipart body: headers too long")
                        return events
                    head, rest = bytes(self.buffer[:end]), end + 4
                del self.buffer[:rest]
                events.append(self._part(head))
                self.state = "data"
            else:  # end: the epilogue is ignored
                self.buffer.clear()
                return events

    def finish(self) -> None:
        if self.state != "end":
            raise InvalidArgument("Invalid multipart body: it ended before its closing boundary")

    @staticmethod
    def _part(head: bytes) -> MultipartPart:
        message = email.message.Message()
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, sep, value = line.partition(":")
            if sep:
                message[key.strip()] = value.strip()
        name = message.get_param("name", header="content-disposition")
        filename = message.get_param("filename", header="content-disposition")
        return MultipartPart(
            name if isinstance(name, str) else "", filename if isinstance(filename, str) else ""
        )
