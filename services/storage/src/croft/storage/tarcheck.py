"""The safety check of an uploaded backup tarball, as it streams to the `tar -x` that
unpacks it: ustar, pax and GNU headers parsed straight from the bytes (no `tarfile`),
each member checked before its header and data are passed on, the data of a big file
spliced from pipe to pipe without being copied through Python.

The check reads member boundaries exactly as GNU tar does (the ustar prefix only under
the POSIX magic, pax `path`/`linkpath`/`size`, GNU long names, base-256 numbers, every
header's checksum), and refuses what the two could read differently (a bad checksum,
data on a member that has none, sparse files, global `path` or `size` records), so that
tar never unpacks a member the check did not see. Absolute names lose their leading `/`
as GNU tar (and LXD) unpack them.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable

from croft.common.errors import InvalidArgument

REFUSED = "Invalid backup tarball"
CHUNK = 1 << 20
BLOCK = 512
# Past the buffer, the rest of a member's data is spliced when at least this long.
SPLICE_AT = 1 << 16

_FILE = frozenset(b"0\x007")
_META = frozenset(b"xgLK")
_KINDS = {ord("5"): "dir", ord("2"): "sym", ord("1"): "lnk", ord("6"): "fifo"}
_DEVICES = frozenset(b"34")
_ZERO = bytes(BLOCK)
_POSIX_MAGIC = b"ustar\x00"
# An extended header (pax records, a GNU long name) is read whole: at most this long.
META_LIMIT = 1 << 20
DISCARD = -2  # a destination whose bytes are dropped


def _refuse(why: str) -> InvalidArgument:
    return InvalidArgument(f"{REFUSED}: {why}")


def _number(field: bytes) -> int:
    """A numeric header field: octal (NUL or space padded) or GNU base-256."""
    if field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        if field[0] & 0x40:  # negative
            raise _refuse("a negative number in a header")
        return ((field[0] & 0x3F) << (8 * (len(field) - 1))) | value
    text = field.split(b"\x00", 1)[0].strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise _refuse("a header holds an invalid number") from None


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _nts(field: bytes) -> bytes:
    end = field.find(b"\x00")
    return field if end < 0 else field[:end]


def _pax(data: bytes) -> dict[str, str]:
    """The records of a pax extended header ("LEN KEY=VALUE\\n" each)."""
    found: dict[str, str] = {}
    at = 0
    while at < len(data) and data[at] != 0:
        space = data.find(b" ", at)
        try:
            length = int(data[at:space])
        except ValueError:
            raise _refuse("an invalid pax header") from None
        record = data[space + 1 : at + length]
        if length <= 0 or space < 0 or not record.endswith(b"\n") or b"=" not in record:
            raise _refuse("an invalid pax header")
        key, value = record[:-1].split(b"=", 1)
        found[_text(key)] = _text(value)
        at += length
    return found


def _root_of(name: str) -> str:
    """The tree a member belongs to: `backup/container/` or `backup/snapshots/<name>/`
    ("" for `backup/index.yaml` and the directories above the trees)."""
    parts = name.split("/")
    if len(parts) >= 2 and parts[1] in ("container", "volume"):
        return f"backup/{parts[1]}/"
    if len(parts) >= 3 and parts[1] in ("snapshots", "volume-snapshots"):
        return f"backup/{parts[1]}/{parts[2]}/"
    return ""


class Member:
    """What the check knows of one member."""

    __slots__ = ("name", "kind", "link", "size", "data", "_header", "_pax")

    def __init__(
        self, name: str, kind: str, link: str, size: int, header: bytes, pax: dict[str, str]
    ) -> None:
        self.name = name
        self.kind = kind  # file, dir, sym, lnk, fifo
        self.link = link
        self.size = size
        self.data = b""  # a file's content, when asked for (index.yaml)
        self._header = header
        self._pax = pax

    def owner(self) -> tuple[int, int]:
        """Its uid and gid (read only when asked: most members are not)."""
        try:
            uid = int(self._pax["uid"]) if "uid" in self._pax else _number(self._header[108:116])
            gid = int(self._pax["gid"]) if "gid" in self._pax else _number(self._header[116:124])
        except ValueError:
            raise _refuse(f"{self.name!r} has an invalid pax record") from None
        return uid, gid


class Checked:
    """A plain tar stream read from `fd`, each member checked as it comes and only then
    passed on, its headers and data, to the `tar -x` that unpacks it: `rest` (the whole
    tarball, into the upload's directory), or `main` once set (the volume's tree,
    straight into its volume)."""

    def __init__(self, fd: int, rest: int) -> None:
        self.fd = fd
        self.rest = rest
        self.main = -1
        self.main_root = ""
        self.main_instance = False
        self.main_owner: tuple[int, int] | None = None
        # Once set: the members `stream_names` (btrfs send streams) go, their data alone,
        # to `stream` (a `btrfs receive`), not to tar.
        self.stream = -1
        self.stream_names: frozenset[str] = frozenset()
        self.buf = b""
        self.pos = 0  # where the next header starts, in buf
        self.eof = False
        # What was checked and not yet written: buf[start:end] for `dest`.
        self.dest = rest
        self.start = 0
        self.end = 0
        self.finished = False
        self.names: set[str] = set()
        self.dirs: set[str] = set()  # every path above a member
        self.links: set[str] = set()

    # ------------------------------------------------------------------ bytes

    def _flush(self) -> None:
        if self.end > self.start and self.dest != DISCARD:
            _write_all(self.dest, memoryview(self.buf)[self.start : self.end])
        self.start = self.end

    def _need(self, size: int) -> bool:
        """At least `size` bytes at pos in buf (False: the stream ended before)."""
        if len(self.buf) - self.pos >= size:
            return True
        self._flush()
        parts = [self.buf[self.pos :]]
        have = len(parts[0])
        while have < size and not self.eof:
            data = os.read(self.fd, max(CHUNK, size - have))
            if not data:
                self.eof = True
                break
            parts.append(data)
            have += len(data)
        self.buf = parts[0] if len(parts) == 1 else b"".join(parts)
        self.pos = self.start = self.end = 0
        return have >= size

    def _emit(self, upto: int, dest: int) -> None:
        """Pass on buf[pos:upto] (checked) to `dest`; upto may lie past buf, whose rest
        then comes straight from the stream."""
        if dest != self.dest or self.pos != self.end:
            self._flush()
            self.dest, self.start = dest, self.pos
        if upto <= len(self.buf):
            self.end = self.pos = upto
            return
        self.end = len(self.buf)
        self._flush()
        left = upto - len(self.buf)
        self.buf, self.pos, self.start, self.end = b"", 0, 0, 0
        while left >= SPLICE_AT and dest != DISCARD:
            moved = os.splice(self.fd, dest, left)
            if not moved:
                raise _refuse("unexpected end of data")
            left -= moved
        if left:
            if not self._need(left):
                raise _refuse("unexpected end of data")
            self.start, self.end = 0, left
            self.pos = left
            self.dest = dest

    # ---------------------------------------------------------------- headers

    def _header(self) -> tuple[Member, int] | None:
        """The next member and where its data ends (from pos), its headers read; None
        at the end of the tarball. Offsets are kept from pos: _need may move buf."""
        rel = 0
        pax: dict[str, str] = {}
        long_name = long_link = None
        while True:
            if not self._need(rel + BLOCK):
                if rel == 0 and len(self.buf) == self.pos and self.names:
                    return None  # the stream ends where a header would start
                raise _refuse("unexpected end of data" if self.names else "empty file")
            at = self.pos + rel
            hdr = self.buf[at : at + BLOCK]
            if hdr == _ZERO:
                if rel:
                    raise _refuse("the tarball ends inside a member's headers")
                return None
            stored = _number(hdr[148:156])
            if stored != sum(hdr) - sum(hdr[148:156]) + 256 and stored != _signed(hdr):
                raise _refuse("bad checksum")
            kind = hdr[156]
            size = _number(hdr[124:136])
            rel += BLOCK
            if kind in _META:
                if size > META_LIMIT:
                    raise _refuse("an extended header is too long")
                padded = (size + BLOCK - 1) & ~(BLOCK - 1)
                if not self._need(rel + padded):
                    raise _refuse("unexpected end of data")
                at = self.pos + rel
                data = self.buf[at : at + size]
                if kind == ord("x"):
                    pax.update(_pax(data))
                elif kind == ord("g"):
                    records = _pax(data)
                    if {"path", "linkpath", "size"} & set(records):
                        raise _refuse("a global pax header sets a name or a size")
                elif kind == ord("L"):
                    long_name = _nts(data)
                else:
                    long_link = _nts(data)
                rel += padded
                continue
            break
        if any(key.startswith("GNU.sparse") for key in pax):
            raise _refuse("sparse files are not supported")
        if "path" in pax:
            name = pax["path"]
        elif long_name is not None:
            name = _text(long_name)
        else:
            name = _text(_nts(hdr[0:100]))
            prefix = _nts(hdr[345:500])
            if prefix and hdr[257:263] == _POSIX_MAGIC:
                name = _text(prefix) + "/" + name
        if "linkpath" in pax:
            link = pax["linkpath"]
        elif long_link is not None:
            link = _text(long_link)
        else:
            link = _text(_nts(hdr[157:257]))
        try:
            size = int(pax["size"]) if "size" in pax else size
        except ValueError:
            raise _refuse(f"{name!r} has an invalid pax record") from None
        if size < 0:
            raise _refuse(f"{name!r} has a negative size")
        if kind in _FILE:
            # tar's convention: a file whose name ends in a slash is a directory
            what = "dir" if name.endswith("/") else "file"
        elif kind in _DEVICES:
            raise _refuse(f"{name!r} is a device node")
        elif kind in _KINDS:
            what = _KINDS[kind]
        else:
            raise _refuse(f"{name!r} is of an unsupported type")
        if what != "file" and size:
            raise _refuse(f"{name!r} has data but is not a file")
        member = Member(name, what, link, size, hdr, pax)
        return member, rel + ((size + BLOCK - 1) & ~(BLOCK - 1))

    def next(self, want_data: Callable[[Member], bool] | None = None) -> Member | None:
        """The next member, checked and passed on; None at the end of the tarball."""
        if self.finished:
            return None
        found = self._header()
        if found is None:
            self.finished = True
            return None
        member, rel = found
        root = self._check(member)
        if want_data is not None and want_data(member):
            if not self._need(rel):
                raise _refuse("unexpected end of data")
            head = self.pos + rel - ((member.size + BLOCK - 1) & ~(BLOCK - 1))
            member.data = self.buf[head : head + member.size]
        if self.stream >= 0 and member.name in self.stream_names and member.kind == "file":
            padded = (member.size + BLOCK - 1) & ~(BLOCK - 1)
            self._emit(self.pos + rel - padded, DISCARD)  # its headers
            self._emit(self.pos + member.size, self.stream)
            self._emit(self.pos + padded - member.size, DISCARD)
            return member
        main = self.main >= 0 and root == self.main_root and not self._own_mark(member.name)
        if main and member.name + "/" == self.main_root:
            self.main_owner = member.owner()
        self._emit(self.pos + rel, self.main if main else self.rest)
        return member

    def _own_mark(self, name: str) -> bool:
        """An instance tree's backup.yaml or dot-entries: not the volume's (restore
        leaves them out), so they stay with the upload."""
        if not self.main_instance:
            return False
        top = name[len(self.main_root) :].split("/", 1)[0]
        return top == "backup.yaml" or top.startswith(".")

    def first_index(self) -> bytes | None:
        """backup/index.yaml, when it is the tarball's first member (as LXD writes it)."""
        member = self.next(lambda m: m.name == "backup/index.yaml" and m.kind == "file")
        if member is None or member.name != "backup/index.yaml" or member.kind != "file":
            return None
        return member.data

    def run(self) -> set[str]:
        """Every other member; then what follows the end of the tarball. The names."""
        while self.next() is not None:
            pass
        self._emit(len(self.buf), self.rest)
        self._flush()
        while data := os.read(self.fd, CHUNK):
            _write_all(self.rest, memoryview(data))
        if self.main >= 0:
            _write_all(self.main, memoryview(bytes(1024)))  # the end of its tarball
        return self.names

    def _check(self, m: Member) -> str:
        """Refuse a member that would leave its tree; the tree it belongs to. Its name
        loses a leading and a trailing `/`, as tar unpacks it."""
        name = m.name.lstrip("/").rstrip("/")
        m.name = name
        if (
            not name
            or posixpath.normpath(name) != name
            or ".." in name.split("/")
            or not (name == "backup" or name.startswith("backup/"))
        ):
            raise _refuse(f"the path {name!r} leaves the backup")
        parent = name.rpartition("/")[0]
        if parent not in self.dirs:
            # (Once a path is among dirs, so are all above it, and none of them can
            # become a symlink: that is refused below.)
            parts = name.split("/")
            for depth in range(1, len(parts)):
                above = "/".join(parts[:depth])
                if above in self.links:
                    raise _refuse(f"{name!r} is reached through a symlink")
                self.dirs.add(above)
        root = _root_of(name)
        if m.kind == "sym":
            if name in self.dirs:
                raise _refuse(f"a member is reached through {name!r}")
            self.links.add(name)
            if not m.link.startswith("/"):
                # A relative link resolves within its tree; an absolute one is the
                # container's own path, resolved inside it.
                resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.link))
                if not root or not (resolved + "/").startswith(root):
                    raise _refuse(f"the symlink {name!r} points out of the instance")
        elif m.kind == "lnk":
            target = posixpath.normpath(m.link.lstrip("/"))
            if not root or not target.startswith(root) or ".." in target.split("/"):
                raise _refuse(f"the hard link {name!r} points out of the instance")
        self.names.add(name)
        return root


def _signed(hdr: bytes) -> int:
    """The header's checksum summed over signed bytes (old tars wrote that one)."""
    total = 256
    for i, byte in enumerate(hdr):
        if not 148 <= i < 156:
            total += byte - 256 if byte > 127 else byte
    return total


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


__all__ = ["REFUSED", "Checked", "Member"]
