"""File I/O through a pager server's pages: the hardware VM's ``pread``,
``pwrite`` and ``open``, with the software VM's semantics (``vnpager.ubc``),
of host files (by descriptor) and of objects (by URL: the server looks
them up on its objfs mounts; their writes are published at sync and at
the close of a file open for writing).

The server holds the file's object for a handle (``fopen``): reads see
the pages as the maps of every client left them, flushed or not; writes
dirty the pages (a map of the file sees them at once), grow the file
past its end, and reach the file at the next flush, sync or pageout, or
at the close of a file opened for writing.  Bytes travel in requests of
``protocol.MAX_DATA`` at most.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from vnpager.fileio import PagedFile
from vnpager.server import protocol
from vnpager.vfs.objfs import is_url

if TYPE_CHECKING:
    from vnpager.client.vm import HardwareVM

PROT_READ, PROT_WRITE = 0x1, 0x2


class RemoteFile:
    """One handle on a file's object in the server (``fopen``).  Not
    thread-safe against its own close, like a file object."""

    def __init__(self, vm: HardwareVM, target: str | os.PathLike[str] | int, prot: int, create: bool = False,
                 excl: bool = False) -> None:
        """A handle on the file open on descriptor *target*, at path
        *target*, or of the object at URL *target* (*create* and *excl*:
        O_CREAT and O_EXCL, for a URL only)."""
        self.vm = vm
        if is_url(target):
            self.handle = int(vm.request("fopen_url", target, prot, create, excl))
            return
        if isinstance(target, int):
            self.handle = int(vm.request("fopen", prot, fds=[target]))
            return
        fd = os.open(target, (os.O_RDWR if prot & PROT_WRITE else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            self.handle = int(vm.request("fopen", prot, fds=[fd]))
        finally:
            os.close(fd)

    def pread(self, n: int, off: int) -> bytes:
        """Up to *n* bytes at *off*: fewer at the end of the file."""
        if n < 0 or off < 0:
            raise ValueError("negative count or offset")
        out = bytearray()
        while len(out) < n:
            got = protocol.unpack(self.vm.request("fread", self.handle, min(n - len(out), protocol.MAX_DATA),
                                                  off + len(out)))
            if not got:
                break
            out += got
        return bytes(out)

    def pwrite(self, data: bytes | bytearray | memoryview, off: int) -> int:
        view = memoryview(data).cast("B")
        for i in range(0, len(view), protocol.MAX_DATA):
            self.vm.request("fwrite", self.handle, off + i, view[i : i + protocol.MAX_DATA])
        return len(view)

    def size(self) -> int:
        return int(self.vm.request("fsize", self.handle))

    def setsize(self, size: int) -> None:
        self.vm.request("ftruncate", self.handle, size)

    def sync(self) -> None:
        self.vm.request("fsync", self.handle)

    def close(self, sync: bool = False) -> None:
        self.vm.request("fclose", self.handle, sync)

    def __enter__(self) -> RemoteFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HwFile(PagedFile):
    """A raw file whose reads and writes go through the server's pages, as
    ``vnpager.ubc.UbcFile`` does through a software VM's (the same modes)."""

    def __init__(self, vm: HardwareVM, target: str | os.PathLike[str] | int, mode: str = "r") -> None:
        super().__init__(target if isinstance(target, int) else os.fspath(target), mode)
        create, excl = self._create(target, is_url(target))
        self._file: RemoteFile = RemoteFile(vm, target, PROT_READ | (PROT_WRITE if self._writable else 0),
                                            create, excl)
        self._opened(self._file)

    def _readinto_at(self, view: memoryview, off: int) -> int:
        data = self._file.pread(len(view), off)
        view[: len(data)] = data
        return len(data)

    def _write_at(self, data: Any, off: int) -> int:
        return self._file.pwrite(data, off)

    def _size(self) -> int:
        return self._file.size()
