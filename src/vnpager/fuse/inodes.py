"""The inode table of the FUSE passthrough: FUSE inode numbers <-> host paths.

The kernel names files by the inode numbers we hand out.  We give each host
file (``st_dev, st_ino``) a number of our own, so that files of several host
filesystems under SRC never collide, and remember the host paths it is
known by (several for hard links).  The kernel's lookup count says how long
to keep an entry: it grows with each entry we reply with and shrinks with
each forget.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pyfuse3


@dataclass
class Inode:
    key: tuple[int, int]  # (st_dev, st_ino) of the host file
    paths: set[str] = field(default_factory=set)
    nlookup: int = 0


class InodeTable:
    """=> used from the event loop thread only: no locking."""

    def __init__(self, root: str) -> None:
        st = os.lstat(root)
        self._inodes: dict[int, Inode] = {pyfuse3.ROOT_INODE: Inode((st.st_dev, st.st_ino), {root}, 1)}
        self._by_key: dict[tuple[int, int], int] = {(st.st_dev, st.st_ino): pyfuse3.ROOT_INODE}
        self._next = pyfuse3.ROOT_INODE + 1

    def path(self, ino: int) -> str:
        """A host path of *ino*; raises FUSEError(ENOENT) if it has none."""
        inode = self._inodes.get(ino)
        if inode is None or not inode.paths:
            raise pyfuse3.FUSEError(2)  # ENOENT
        return next(iter(inode.paths))

    def child(self, parent: int, name: bytes) -> str:
        return os.path.join(self.path(parent), os.fsdecode(name))

    def key(self, ino: int) -> tuple[int, int]:
        return self._inodes[ino].key

    def number(self, path: str, st: os.stat_result) -> int:
        """The inode number of host file *path*, known by that path from now on."""
        key = (st.st_dev, st.st_ino)
        ino = self._by_key.get(key)
        if ino is None:
            ino = self._next
            self._next += 1
            self._inodes[ino] = Inode(key)
            self._by_key[key] = ino
        self._inodes[ino].paths.add(path)
        return ino

    def lookup(self, ino: int) -> None:
        """The kernel got an entry for *ino*: count it."""
        self._inodes[ino].nlookup += 1

    def forget(self, ino: int, n: int) -> None:
        inode = self._inodes.get(ino)
        if inode is None or ino == pyfuse3.ROOT_INODE:
            return
        inode.nlookup -= n
        if inode.nlookup <= 0:
            del self._inodes[ino]
            if self._by_key.get(inode.key) == ino:
                del self._by_key[inode.key]

    def unlinked(self, path: str, key: tuple[int, int]) -> None:
        """*path*, naming host file *key*, is gone (unlink, rmdir, rename over)."""
        ino = self._by_key.get(key)
        if ino is not None:
            self._inodes[ino].paths.discard(path)

    def renamed(self, old: str, new: str, key: tuple[int, int], is_dir: bool) -> None:
        """*old* (host file *key*) is now *new*; so is all below it, for a directory."""
        ino = self._by_key.get(key)
        if ino is not None:
            self._inodes[ino].paths.discard(old)
            self._inodes[ino].paths.add(new)
        if is_dir:
            prefix = old + os.sep
            for inode in self._inodes.values():
                moved = {p for p in inode.paths if p.startswith(prefix)}
                if moved:
                    inode.paths -= moved
                    inode.paths |= {new + p[len(old):] for p in moved}
