"""Copying an unpacked image into a new instance root without running `cp`.

An unpacked image never changes, so it is read once: `ImageTree.scan()` records every
entry (type, mode, owner, times, link target, hard-link group) and `copy_to()` then
replays that list into a new directory. Each copy saves `cp`'s fork and exec and its
`lstat`/`readlink` of every source entry.

Measured on this host with the busybox image (295 entries), CPU per copy: `cp` 3.5 ms on
tmpfs and ~5 ms on the ext4 pool; this copy 1.9 ms on tmpfs and ~3.2 ms on ext4.

Only trees whose every entry this code copies exactly get a manifest: directories,
regular files that are not sparse, symlinks, device nodes and FIFOs, without extended
attributes (ACLs and file capabilities are xattrs). For any other tree `scan()` returns
None and the caller uses `cp -a`, which keeps everything.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

_DIR, _FILE, _LINK, _HARDLINK, _NODE = range(5)


@dataclass(frozen=True, slots=True)
class _Entry:
    kind: int
    path: str  # relative to the tree's root; "" is the root itself
    mode: int  # the full st_mode for nodes, permission bits otherwise
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    extra: str | int = 0  # link target, first path of a hard-link group, size or rdev


@dataclass(frozen=True)
class ImageTree:
    """What copying one unpacked image takes: its entries, parents before children."""

    entries: tuple[_Entry, ...]
    all_root: bool  # every entry is owned by root:root, so no chown is needed

    @classmethod
    def scan(cls, root: Path) -> ImageTree | None:
        """Read the tree at `root` (symlinks not followed); None when it holds something
        this module does not copy exactly."""
        entries: list[_Entry] = []
        first_link: dict[tuple[int, int], str] = {}
        all_root = True
        pending = [""]
        try:
            while pending:
                rel = pending.pop()
                path = os.path.join(root, rel) if rel else str(root)
                st = os.lstat(path)
                if _has_xattrs(path):
                    return None
                all_root = all_root and st.st_uid == 0 and st.st_gid == 0
                kind, extra = _classify(path, st, first_link, rel)
                if kind is None:
                    return None
                mode = st.st_mode if kind == _NODE else stat.S_IMODE(st.st_mode)
                entries.append(
                    _Entry(
                        kind, rel, mode, st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns, extra
                    )
                )
                if kind == _DIR:
                    names = sorted(os.listdir(path), reverse=True)
                    pending.extend(os.path.join(rel, name) if rel else name for name in names)
        except OSError:
            return None
        return cls(tuple(entries), all_root)

    def copy_to(self, target: Path, source: Path) -> None:
        """Create `target` (which must not exist) as a copy of the tree scanned at
        `source`. On failure a partial `target` is left for the caller to remove."""
        root = self.entries[0]
        os.mkdir(target, 0o700)
        dst = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        src = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        chown = not self.all_root
        directories = [root]
        try:
            for entry in self.entries[1:]:
                kind, rel = entry.kind, entry.path
                if kind == _DIR:
                    os.mkdir(rel, 0o700, dir_fd=dst)
                    directories.append(entry)
                elif kind == _LINK:
                    os.symlink(str(entry.extra), rel, dir_fd=dst)
                    if chown:
                        os.chown(rel, entry.uid, entry.gid, dir_fd=dst, follow_symlinks=False)
                    os.utime(
                        rel,
                        ns=(entry.atime_ns, entry.mtime_ns),
                        dir_fd=dst,
                        follow_symlinks=False,
                    )
                elif kind == _FILE:
                    _copy_file(src, dst, entry, chown)
                elif kind == _HARDLINK:
                    os.link(
                        str(entry.extra), rel, src_dir_fd=dst, dst_dir_fd=dst, follow_symlinks=False
                    )
                else:
                    os.mknod(rel, entry.mode, int(entry.extra), dir_fd=dst)
                    if chown:
                        os.chown(rel, entry.uid, entry.gid, dir_fd=dst, follow_symlinks=False)
                    os.utime(rel, ns=(entry.atime_ns, entry.mtime_ns), dir_fd=dst)
            # Directories last, deepest first: creating their entries changed their times.
            for entry in reversed(directories):
                rel = entry.path or "."
                if chown:
                    os.chown(rel, entry.uid, entry.gid, dir_fd=dst)
                os.chmod(rel, entry.mode, dir_fd=dst)
                os.utime(rel, ns=(entry.atime_ns, entry.mtime_ns), dir_fd=dst)
        finally:
            os.close(src)
            os.close(dst)


def _has_xattrs(path: str) -> bool:
    try:
        return bool(os.listxattr(path, follow_symlinks=False))
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise


def _classify(
    path: str, st: os.stat_result, first_link: dict[tuple[int, int], str], rel: str
) -> tuple[int | None, str | int]:
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return _DIR, 0
    if stat.S_ISLNK(mode):
        return _LINK, os.readlink(path)
    if stat.S_ISREG(mode):
        if st.st_nlink > 1:
            first = first_link.setdefault((st.st_dev, st.st_ino), rel)
            if first != rel:
                return _HARDLINK, first
        # A sparse file would come out whole: leave it to cp, which keeps holes.
        if st.st_size > 0 and st.st_blocks * 512 < st.st_size:
            return None, 0
        return _FILE, st.st_size
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
        return _NODE, st.st_rdev
    return None, 0  # sockets


def _copy_file(src: int, dst: int, entry: _Entry, chown: bool) -> None:
    rel = entry.path
    fin = os.open(rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src)
    try:
        fout = os.open(
            rel,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dst,
        )
        try:
            _copy_data(fin, fout, int(entry.extra))
            if chown:
                os.fchown(fout, entry.uid, entry.gid)  # clears set-id bits: chmod after
            os.fchmod(fout, entry.mode)
            os.utime(fout, ns=(entry.atime_ns, entry.mtime_ns))
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def _copy_data(fin: int, fout: int, size: int) -> None:
    # copy_file_range shares blocks where the filesystem can (btrfs, xfs), like
    # cp --reflink=auto; sendfile covers filesystems and kernels that refuse it.
    left = size
    try:
        while left > 0:
            done = os.copy_file_range(fin, fout, left)
            if done == 0:
                break
            left -= done
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        while left > 0:
            done = os.sendfile(fout, fin, size - left, left)
            if done == 0:
                break
            left -= done
    if left:
        raise OSError(errno.EIO, f"file changed size while being copied ({left} bytes short)")
