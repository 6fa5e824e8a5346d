"""The inode table of the FUSE passthrough: FUSE inode numbers <-> host files.

The kernel names files by the inode numbers we hand out.  We give each host
file (``st_dev, st_ino``) a number of our own, so that files of several host
filesystems under SRC never collide, and hold an ``O_PATH`` descriptor of
it for as long as the kernel knows the number.  Every request works from
these descriptors, never from a host path: attributes of a file that lost
its names (unlinked, renamed over, while open) are still there; names are
resolved one component at a time relative to the parent's descriptor (the
``*at()`` calls), so no path the server builds grows past PATH_MAX however
deep the tree; and renames need no bookkeeping.  The kernel's lookup count
says how long to keep an entry: it grows with each entry we reply with and
shrinks with each forget.

Lookups cost one ``fstatat`` for a file the table holds already (the
descriptor we hold pins its ``(st_dev, st_ino)``, so the name's stat names
it), an ``openat`` and an ``fstat`` more for a new one.  Each entry also
remembers the names of its host file's extended attributes once listed
(:meth:`InodeTable.xattr_names`), so that the kernel's many questions for
names a file does not have (``security.capability`` before each write,
``security.selinux`` and ``system.posix_acl_access`` for each ``ls -l``)
are answered without a host call: the mount is SRC's only writer, and
through the mount only ``setxattr``/``removexattr`` add names (they forget
the list); a name the host dropped by itself (the ``security.capability``
that a write or ``chown`` removes) is still asked of the host.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

import pyfuse3

O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Inode:
    fd: int  # O_PATH descriptor of the host file: names may go, this stays
    key: tuple[int, int]  # (st_dev, st_ino) of the host file
    nlookup: int = 0
    xattrs: frozenset[bytes] | None = None  # the host file's xattr names, None: not listed yet


def proc_path(fd: int) -> str:
    """A path that reaches the file open on *fd* itself, named or not (the
    magic link does not follow a symlink further)."""
    return f"/proc/self/fd/{fd}"


class InodeTable:
    """=> used from the event loop thread only: no locking."""

    def __init__(self, root: str) -> None:
        fd = os.open(root, O_PATH_NOFOLLOW | os.O_DIRECTORY)
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        self._inodes: dict[int, Inode] = {pyfuse3.ROOT_INODE: Inode(fd, key, 1)}
        self._by_key: dict[tuple[int, int], int] = {key: pyfuse3.ROOT_INODE}
        self._next = pyfuse3.ROOT_INODE + 1

    def fd(self, ino: int) -> int:
        """The O_PATH descriptor of *ino*; FUSEError(ESTALE) if it is unknown."""
        inode = self._inodes.get(ino)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return inode.fd

    def proc(self, ino: int) -> str:
        return proc_path(self.fd(ino))

    def key(self, ino: int) -> tuple[int, int]:
        return self._inodes[ino].key

    def lookup(self, parent: int, name: bytes) -> tuple[int, os.stat_result]:
        """The inode number and attributes of *name* in directory *parent*,
        counted as one lookup.  Raises OSError."""
        dir_fd = self.fd(parent)
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        ino = self._by_key.get((st.st_dev, st.st_ino))
        if ino is not None:  # held: the name names our file, no descriptor to open
            self._inodes[ino].nlookup += 1
            return ino, st
        return self.adopt(os.open(name, O_PATH_NOFOLLOW, dir_fd=dir_fd))

    def adopt(self, fd: int) -> tuple[int, os.stat_result]:
        """Like :meth:`lookup`, for the file open on the O_PATH descriptor
        *fd*, which the table takes over (and closes if it has one already)."""
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        key = (st.st_dev, st.st_ino)
        ino = self._by_key.get(key)
        if ino is None:
            ino = self._next
            self._next += 1
            self._inodes[ino] = Inode(fd, key)
            self._by_key[key] = ino
        else:
            os.close(fd)  # the inode we hold pins (st_dev, st_ino): it is the same file
        self._inodes[ino].nlookup += 1
        return ino, st

    def xattr_names(self, ino: int) -> frozenset[bytes] | None:
        """The names of the extended attributes of *ino*'s host file, listed
        once and remembered until :meth:`xattrs_changed`; None if the host
        cannot list them (then ask the host each time)."""
        inode = self._inodes.get(ino)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        if inode.xattrs is None:
            try:
                inode.xattrs = frozenset(os.fsencode(n) for n in os.listxattr(proc_path(inode.fd)))
            except OSError:
                return None
        return inode.xattrs

    def xattrs_changed(self, ino: int) -> None:
        """The mount set or removed an extended attribute of *ino*: list them anew."""
        inode = self._inodes.get(ino)
        if inode is not None:
            inode.xattrs = None

    def forget(self, ino: int, n: int) -> None:
        inode = self._inodes.get(ino)
        if inode is None or ino == pyfuse3.ROOT_INODE:
            return
        inode.nlookup -= n
        if inode.nlookup <= 0:
            del self._inodes[ino]
            del self._by_key[inode.key]
            os.close(inode.fd)

    def close(self) -> None:
        """Close every descriptor (unmount time)."""
        for inode in self._inodes.values():
            os.close(inode.fd)
        self._inodes.clear()
        self._by_key.clear()
