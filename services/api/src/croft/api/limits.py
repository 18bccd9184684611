"""What croft accepts from a client, at most: the limits every request is held to at the
edge, before anything is read from or written to the store.

LXD has few explicit limits; croft needs them because every record is one etcd value
(etcd refuses a request over 1.5 MiB) and errors between services travel in gRPC
metadata (8 KiB soft, 16 KiB hard). The numbers leave room under both: an instance
record holds its config twice (own and expanded), and a transaction carries an
operation's closing writes with the record. README's "A client that misbehaves" says
them to clients.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any

from pydantic import Field, StrictStr, StringConstraints

from croft.common.errors import InvalidArgument

KIB = 1024
MIB = 1024 * KIB

#: A JSON request body, in bytes.
MAX_BODY = 1 * MIB
#: How deep objects and arrays may nest in a JSON body (LXD's deepest is 4).
MAX_DEPTH = 32
#: Any string in a body, config values included, in characters.
MAX_STRING = 256 * KIB
#: Any object key in a body (config keys, device names, device keys), in characters.
MAX_KEY = 256
#: Names of profiles, images aliases, snapshots, certificates... (instances: 63, as LXD).
MAX_NAME = 256
#: A description, in characters.
MAX_DESCRIPTION = 64 * KIB
#: A whole record as stored (its JSON), in bytes.
MAX_RECORD = 1 * MIB
#: A path in an instance, and each of its components, in bytes (Linux's PATH_MAX and
#: NAME_MAX: the host refuses longer ones half-way through the request).
MAX_PATH = 4096
MAX_PATH_COMPONENT = 255
#: What an error message may carry to a client, in characters.
MAX_MESSAGE = 4 * KIB

INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)
UINT32 = (0, 2**32 - 1)

# Lone UTF-16 surrogates: JSON's "\ud800" escapes decode to them, and no UTF-8 encoder
# (etcd's, gRPC's, the response's) takes them.
_SURROGATE = re.compile("[\ud800-\udfff]")

# Field types for the request models: the limit is in pydantic's message.
Name = Annotated[StrictStr, StringConstraints(max_length=MAX_NAME)]
Description = Annotated[StrictStr, StringConstraints(max_length=MAX_DESCRIPTION)]
UInt32 = Annotated[int, Field(ge=UINT32[0], le=UINT32[1])]
# A terminal's size in characters: what a pty takes (unsigned short).
WindowSide = Annotated[int, Field(ge=0, le=65535)]
# Seconds to wait, -1 for the default: what compute's int32 takes.
Timeout = Annotated[int, Field(ge=-1, le=INT32[1])]


def size(n: int) -> str:
    """A byte count as a person reads it in a limit: 1 MiB, 256 KiB."""
    if n % MIB == 0:
        return f"{n // MIB} MiB"
    if n % KIB == 0:
        return f"{n // KIB} KiB"
    return f"{n} bytes"


def check_text(value: str, what: str, *, limit: int = MAX_STRING) -> None:
    """InvalidArgument unless `value` is text every part of croft can store and send:
    no NUL, no lone surrogate, at most `limit` characters."""
    if len(value) > limit:
        raise InvalidArgument(f"{what} is longer than {limit} characters ({len(value)})")
    if "\x00" in value:
        raise InvalidArgument(f"{what} contains a NUL character")
    if _SURROGATE.search(value):
        raise InvalidArgument(f"{what} is not valid Unicode (a lone UTF-16 surrogate)")


def check_file_path(path: str) -> None:
    """InvalidArgument unless `path` is one the host can look up (see MAX_PATH)."""
    check_text(path, "The path", limit=MAX_PATH)
    if len(path.encode()) > MAX_PATH:
        raise InvalidArgument(f"The path is longer than {MAX_PATH} bytes")
    if any(len(part.encode()) > MAX_PATH_COMPONENT for part in path.split("/")):
        raise InvalidArgument(f"A component of the path is longer than {MAX_PATH_COMPONENT} bytes")


# Device keys that name a path on the host or in the instance.
_DEVICE_PATHS = ("source", "path")


def check_device_paths(devices: dict[str, Any]) -> None:
    """InvalidArgument when a device's `source` or `path` is longer than a path can be:
    the host would refuse it half-way through the change, in an error too long to carry."""
    for name, device in devices.items():
        for key in _DEVICE_PATHS:
            value = device.get(key) if isinstance(device, dict) else None
            if isinstance(value, str):
                try:
                    check_file_path(value)
                except InvalidArgument as exc:
                    raise InvalidArgument(f"Device {quote(name)}: {key}: {exc.message}") from None


def _refuse_constant(name: str) -> Any:
    raise InvalidArgument(f"The request body is not valid JSON: {name} is not a JSON number")


def parse_json(raw: bytes) -> Any:
    """A request body's JSON, held to the limits above; InvalidArgument naming what broke
    which limit."""
    if len(raw) > MAX_BODY:
        raise InvalidArgument(f"The request body is larger than {size(MAX_BODY)}")
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise InvalidArgument(
            f"The request body nests objects or arrays more than {MAX_DEPTH} deep"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"The request body is not valid JSON: {exc}") from None
    except ValueError as exc:
        # Python refuses to convert integers of more than 4300 digits.
        raise InvalidArgument(f"The request body holds a number out of range: {exc}") from None
    check_json(data)
    return data


def check_json(data: Any) -> None:
    """InvalidArgument unless decoded JSON `data` keeps to the limits: nesting, strings
    and keys, integers within 64 bits, finite numbers. Iterative: nothing a client sends
    can exhaust the stack here."""
    stack: list[tuple[Any, int, str]] = [(data, 1, "")]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise InvalidArgument(
                    f"The request body nests objects or arrays more than {MAX_DEPTH} deep"
                )
            if isinstance(value, dict):
                for key, item in value.items():
                    check_text(key, f"The key {quote(key)}{_at(where)}", limit=MAX_KEY)
                    stack.append((item, depth + 1, f"{where}.{key}" if where else key))
            else:
                for index, item in enumerate(value):
                    stack.append((item, depth + 1, f"{where}[{index}]"))
        elif isinstance(value, str):
            check_text(value, f"The string{_at(where)}")
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if not INT64[0] <= value <= INT64[1]:
                raise InvalidArgument(f"The number{_at(where)} does not fit in 64 bits")
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument(f"The number{_at(where)} is out of range")


def check_record(record: dict[str, Any], what: str) -> None:
    """InvalidArgument when `record` would be larger than a record may be."""
    length = len(json.dumps(record, separators=(",", ":")))
    if length > MAX_RECORD:
        raise InvalidArgument(
            f"The {what} would be larger than {size(MAX_RECORD)} ({length} bytes as JSON)"
        )


def _at(where: str) -> str:
    return f" at {quote(where)}" if where else ""


def quote(text: str, keep: int = 64) -> str:
    """Part of a client's string fit to quote in a message: no more than `keep`
    characters, and nothing that cannot be encoded."""
    cut = text if len(text) <= keep else text[:keep] + "..."
    return repr(cut.encode("utf-8", "backslashreplace").decode("utf-8"))
