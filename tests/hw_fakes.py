"""A stand-in for ClientSpace, for the tests of the process boundary.

:class:`CopySpace` speaks ClientSpace's API (vnpager.server.space, see
hw-design.md) without a VM or faults: a file's memfd holds a full copy of
the file from its first map on, so every page is present and a client can
touch its map in its own process, with no fault that would need the
server (the server here runs as a thread of the test).  ``flush`` copies
the memfd back to the file.  Its counters say what the boundary asked.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Any

from vnpager.arch.uffd import Uffd


@dataclass
class Grant:
    id: int
    memfd: int
    size: int


@dataclass
class Calls:
    """What the sessions asked of CopySpaces, across all of them."""

    ops: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)  # the pids whose spaces were closed
    fail_flush: int = 0  # errno the next flush raises (then 0)


class CopySpace:
    """One client's maps.  ``memfds`` (file identity -> memfd) is shared by
    every space of a test through *files*, so two maps of one file share
    pages as they do in a real server."""

    def __init__(self, uffd: Uffd, pid: int, calls: Calls, files: dict[tuple[int, int], int]) -> None:
        self.uffd = uffd
        self.pid = pid
        self.calls = calls
        self.files = files
        self.grants: dict[int, tuple[int, int, int]] = {}  # id -> (file fd, memfd, offset)
        self.maps: dict[int, tuple[int, int, int]] = {}  # addr -> grant's (file fd, memfd, offset)
        self.next_id = 1

    def _log(self, op: str, *args: Any) -> None:
        self.calls.ops.append((op, args))

    def map(self, fd: int, length: int, offset: int, prot: int, flags: int) -> Grant:
        self._log("map", length, offset, prot, flags)
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        memfd = self.files.get(key)
        if memfd is None:
            memfd = os.memfd_create("copy", os.MFD_CLOEXEC)
            os.ftruncate(memfd, st.st_size)
            os.pwrite(memfd, os.pread(fd, st.st_size, 0), 0)
            self.files[key] = memfd
        grant = Grant(self.next_id, memfd, st.st_size)
        self.grants[grant.id] = (os.dup(fd), memfd, offset)
        self.next_id += 1
        return grant

    def release(self, grant_id: int) -> None:
        self._log("release", grant_id)
        os.close(self.grants.pop(grant_id)[0])

    def mapped(self, grant_id: int, addr: int, length: int) -> None:
        self._log("mapped", grant_id, length)
        self.maps[addr] = self.grants.pop(grant_id)

    def unmap(self, addr: int) -> None:
        self._log("unmap")
        os.close(self.maps.pop(addr)[0])

    def flush(self, addr: int, offset: int, size: int) -> None:
        self._log("flush", offset, size)
        if self.calls.fail_flush:
            err, self.calls.fail_flush = self.calls.fail_flush, 0
            raise OSError(err, os.strerror(err))
        fd, memfd, base = self.maps[addr]
        os.pwrite(fd, os.pread(memfd, size, base + offset), base + offset)

    def madvise(self, addr: int, start: int, length: int, advice: int) -> None:
        self._log("madvise", start, length, advice)

    def resize(self, addr: int, newsize: int) -> None:
        self._log("resize", newsize)
        fd, memfd, base = self.maps[addr]
        os.ftruncate(fd, base + newsize)
        os.ftruncate(memfd, base + newsize)

    def size(self, addr: int) -> int:
        return os.fstat(self.maps[addr][0]).st_size

    def adopt_fork(self, pid: int) -> CopySpace:
        raise OSError(errno.ENOSYS, "CopySpace has no fork")

    def close(self) -> None:
        for fd, _, _ in [*self.maps.values(), *self.grants.values()]:
            os.close(fd)
        self.maps.clear()
        self.uffd.close()
        self.calls.closed.append(self.pid)

    def statistics(self) -> dict[str, int]:
        return {"maps": len(self.maps)}
