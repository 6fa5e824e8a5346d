"""Page frames of the hardware machine: a memfd per file, mapped shared.

A file's resident pages live in a memfd of their own, at the file's
offsets (memfd offset = file offset), so one page of the file is one page
of shmem whoever maps it: every client's ``MAP_SHARED`` mapping of the
memfd sees the same frame, a write by one is seen by all at once, and
punching the page out of the memfd (:meth:`MemFile.punch`) removes it
from every process's page tables -- the next touch faults again.  The
server fills pages with pwrite (filling through its own mapping would
take a fault per page) and the client's fault is then resolved with
UFFDIO_CONTINUE.
"""

from __future__ import annotations

import ctypes
import mmap
import os

from . import uapi
from .fdobject import FdObject
from .libc import checked, libc

PAGE_SIZE = mmap.PAGESIZE


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its *mode* flags (os.posix_fallocate has none)."""
    checked(libc.fallocate(fd, mode, offset, length), f"fallocate mode {mode:#x} [{offset:#x}, +{length:#x})")


def buffer_address(buf: mmap.mmap) -> int:
    """The address of a writable mapping's first byte.  The ctypes view is
    dropped at once so that the mapping can still be closed or resized."""
    view = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(view)
    finally:
        del view


class SharedMapping:
    """A ``MAP_SHARED`` read-write mapping of [offset, offset+length) of a
    memfd, and its address, for registering with a userfaultfd.

    ``mmap`` is a real :class:`mmap.mmap`: the buffer protocol, numpy,
    re and the rest work on it directly.  The address stays valid until
    :meth:`close`.
    """

    __slots__ = ("address", "length", "mmap", "offset")

    def __init__(self, fd: int, length: int, offset: int = 0) -> None:
        self.mmap = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                              offset=offset)
        self.length = length
        self.offset = offset
        self.address = buffer_address(self.mmap)

    def close(self) -> None:
        self.mmap.close()

    def __enter__(self) -> SharedMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemFile(FdObject):
    """The frames of one file: a memfd, offset for offset.

    Owns ``fd``.  The size is the memfd's (ftruncate); pages are allocated
    by :meth:`fill` and freed by :meth:`punch`.  No locking: callers
    serialise changes to one range (the pager holds the pages busy).
    """

    __slots__ = ()

    @classmethod
    def create(cls, name: str, size: int) -> MemFile:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd)

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def resize(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def fill(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write *data* at *offset*, all of it (pwrite may be short)."""
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def punch(self, offset: int, length: int) -> None:
        """Free the pages of [offset, offset+length) (the size stays): they
        leave every mapping, and the next touch is a MISSING fault."""
        fallocate(self.fd, uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, offset, length)

    def map(self, length: int | None = None, offset: int = 0) -> SharedMapping:
        return SharedMapping(self.fd, self.size - offset if length is None else length, offset)

