"""A stand-in for ClientSpace, for the tests of the process boundary.

:class:`CopySpace` speaks ClientSpace's API (vnpager.server.space, see
hw-design.md) without a VM or faults: a file's memfd holds a full copy of
the file from its first map on, so every page is present and a client can
touch its map in its own process, with no fault that would need the
server (the server here runs as a thread of the test).  ``flush`` copies
the memfd back to the file.  Its counters say what the boundary asked.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import threading
from dataclasses import dataclass, field
from typing import Any

from vnpager.arch.uffd import PAGE_SIZE, Uffd, uapi


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
    # set: madvise sets ``entered`` and waits for ``gate`` (a request the client waits for)
    gate: threading.Event | None = None
    entered: threading.Event = field(default_factory=threading.Event)


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
        if self.calls.gate is not None:
            self.calls.entered.set()
            self.calls.gate.wait(30)

    def resize(self, addr: int, newsize: int) -> None:
        self._log("resize", newsize)
        fd, memfd, base = self.maps[addr]
        os.ftruncate(fd, base + newsize)
        os.ftruncate(memfd, base + newsize)

    def moved(self, addr: int, newaddr: int, length: int) -> None:
        self._log("moved", length)
        self.maps[newaddr] = self.maps.pop(addr)

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


class FaultSpace(CopySpace):
    """A CopySpace whose maps are registered with the client's uffd, each
    fault resolved by a thread of its own with UFFDIO_CONTINUE (every page
    is in the memfd: the faults are MINOR).  It runs in a server process
    of its own (tests/hw_fake_server.py), because the client's faults would
    block a client that is the test."""

    def __init__(self, uffd: Uffd, pid: int, calls: Calls, files: dict[tuple[int, int], int]) -> None:
        super().__init__(uffd, pid, calls, files)
        self.faults = 0
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name=f"faults-{pid}", daemon=True)
        self._thread.start()

    def mapped(self, grant_id: int, addr: int, length: int) -> None:
        super().mapped(grant_id, addr, length)
        self.uffd.register(addr, (length + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE,
                           uapi.UFFDIO_REGISTER_MODE_MISSING | uapi.UFFDIO_REGISTER_MODE_MINOR)

    def unmap(self, addr: int) -> None:
        super().unmap(addr)  # the client unmapped it: its registration went with it

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self.uffd.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while all(fd != self._stop_r for fd, _ in poller.poll()):
            for msg in self.uffd.read_events():
                if msg.is_pagefault:
                    self.faults += 1
                    with contextlib.suppress(OSError):  # the client died meanwhile
                        self.uffd.resolve(msg.address & ~(PAGE_SIZE - 1), PAGE_SIZE)
                elif msg.event == uapi.UFFD_EVENT_FORK:
                    os.close(msg.ufd)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(30)
        os.close(self._stop_r)
        os.close(self._stop_w)
        super().close()

    def statistics(self) -> dict[str, int]:
        return {"maps": len(self.maps), "faults": self.faults}
