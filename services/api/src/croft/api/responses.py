"""LXD's response envelopes: sync, async (an operation) and error.

Bodies are compact JSON followed by a newline, as LXD's Go encoder writes them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import Response, StreamingResponse
from starlette.websockets import WebSocket

from croft.api.limits import MAX_MESSAGE
from croft.common.errors import CroftError, lxd_error_envelope

JSON_TYPE = "application/json"


def render(body: Any) -> bytes:
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    try:
        return (text + "\n").encode()
    except UnicodeEncodeError:
        # A lone surrogate (from a record written before croft refused them) cannot be
        # UTF-8: escaped, it is still JSON, which clients decode as U+FFFD.
        return (json.dumps(body, separators=(",", ":")) + "\n").encode()


class LXDResponse(Response):
    media_type = JSON_TYPE

    def render(self, content: Any) -> bytes:
        return render(content)


def sync(
    metadata: Any = None,
    *,
    status: int = 200,
    etag: str | None = None,
    location: str | None = None,
) -> LXDResponse:
    """A sync response; `location` makes it LXD's "201 Created" form."""
    headers: dict[str, str] = {}
    if etag is not None:
        headers["ETag"] = f'"{etag}"'
    if location is not None:
        headers["Location"] = location
        if status == 200:
            status = 201
    body = {
        "type": "sync",
        "status": "Success",
        "status_code": 200,
        "operation": "",
        "error_code": 0,
        "error": "",
        "metadata": metadata,
    }
    return LXDResponse(body, status_code=status, headers=headers)


def empty_sync() -> LXDResponse:
    """LXD's EmptySyncResponse: metadata `{}`."""
    return sync({})


def created(location: str) -> LXDResponse:
    """LXD's SyncResponseLocation(true, nil, url): 201, Location, metadata null."""
    return sync(None, location=location)


def async_operation(operation: dict[str, Any]) -> LXDResponse:
    """202 with the operation in metadata and its URL in `Location` and `operation`."""
    url = f"/1.0/operations/{operation['id']}"
    body = {
        "type": "async",
        "status": "Operation created",
        "status_code": 100,
        "operation": url,
        "error_code": 0,
        "error": "",
        "metadata": operation,
    }
    return LXDResponse(body, status_code=202, headers={"Location": url})


def attachment(body: AsyncIterator[bytes], filename: str) -> StreamingResponse:
    """A file to download, streamed as LXD's backup exports send it."""
    return StreamingResponse(
        body,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f"attachment;filename={filename}"},
    )


def error(err: CroftError) -> LXDResponse:
    """LXD's error envelope for `err`. It cannot fail, whatever the message holds: a
    client always gets an envelope, never a bare "Internal Server Error"."""
    body = lxd_error_envelope(err)
    body["error"] = _message(err.message)
    status = err.http_status if isinstance(err.http_status, int) else 500
    return LXDResponse(body, status_code=status, headers={"X-Content-Type-Options": "nosniff"})


def _message(message: Any) -> str:
    """An error message fit for the envelope: text that encodes (a client's lone
    surrogate becomes `\\ud800`), cut at MAX_MESSAGE characters."""
    text = message if isinstance(message, str) else repr(message)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE] + f"... ({len(text) - MAX_MESSAGE} more characters)"
    return text


async def deny(websocket: WebSocket, err: CroftError) -> None:
    """Refuse a websocket before accepting it, with LXD's error envelope when the server
    can send an HTTP response to an upgrade request."""
    if websocket.client_state.name != "CONNECTING":
        await websocket.close(code=1011, reason=err.message[:120])
        return
    try:
        await websocket.send_denial_response(error(err))
    except RuntimeError:
        await websocket.close(code=1008, reason=err.message[:120])
