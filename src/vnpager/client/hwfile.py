"""File I/O through a pager server's pages: the hardware VM's ``pread``,
``pwrite`` and ``open``, with the software VM's semantics (``vnpager.ubc``).

The server holds the file's object for a handle (``fopen``): reads see
the pages as the maps of every client left them, flushed or not; writes
dirty the pages (a map of the file sees them at once), grow the file
past its end, and reach the file at the next flush, sync or pageout, or
at the close of a file opened for writing.  Bytes travel in requests of
``protocol.MAX_DATA`` at most.
"""

from __future__ import annotations

import errno
import io
import os
from typing import TYPE_CHECKING, Any

from vnpager.server import protocol

if TYPE_CHECKING:
    from vnpager.client.vm import HardwareVM

PROT_READ, PROT_WRITE = 0x1, 0x2
_KINDS = {"r": 0, "w": os.O_CREAT | os.O_TRUNC, "a": os.O_CREAT | os.O_APPEND, "x": os.O_CREAT | os.O_EXCL}


class RemoteFile:
    """One handle on a file's object in the server (``fopen``).  Not
    thread-safe against its own close, like a file object."""

    def __init__(self, vm: HardwareVM, target: str | os.PathLike[str] | int, prot: int) -> None:
        self.vm = vm
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


class HwFile(io.RawIOBase):
    """A raw file whose reads and writes go through the server's pages, as
    ``vnpager.ubc.UbcFile`` does through a software VM's: modes r, w, a, x,
    each with an optional + (binary only; a 'b' is accepted and ignored)."""

    def __init__(self, vm: HardwareVM, target: str | os.PathLike[str] | int, mode: str = "r") -> None:
        super().__init__()
        kind = mode.replace("b", "").replace("+", "")
        if kind not in _KINDS or len(kind) != 1 or "t" in mode:
            raise ValueError(f"invalid mode: {mode!r}")
        flags = _KINDS[kind]
        self.name = target if isinstance(target, int) else os.fspath(target)
        self.mode = mode
        self._readable = kind == "r" or "+" in mode
        self._writable = kind != "r" or "+" in mode
        self._append = bool(flags & os.O_APPEND)
        if flags & os.O_CREAT:
            _create(target, flags)
        prot = PROT_READ | (PROT_WRITE if self._writable else 0)
        self._file: RemoteFile | None = RemoteFile(vm, target, prot)
        self._pos = 0
        if flags & os.O_TRUNC:
            self._file.setsize(0)

    def _remote(self) -> RemoteFile:
        if self._file is None:
            raise ValueError("I/O operation on closed file")
        return self._file

    def readable(self) -> bool:
        return self._readable

    def writable(self) -> bool:
        return self._writable

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if not self._readable:
            raise io.UnsupportedOperation("not readable")
        view = memoryview(b).cast("B")
        data = self._remote().pread(len(view), self._pos)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def write(self, b: Any) -> int:
        if not self._writable:
            raise io.UnsupportedOperation("not writable")
        f = self._remote()
        if self._append:
            self._pos = f.size()
        n = f.pwrite(b, self._pos)
        self._pos += n
        return n

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_END:
            base = self._remote().size()
        else:
            base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos}[whence]
        if base + pos < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._pos = base + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        if not self._writable:
            raise io.UnsupportedOperation("not writable")
        size = self._pos if size is None else size
        self._remote().setsize(size)
        return size

    def sync(self) -> None:
        """Write the file's dirty pages to the file and wait (fsync)."""
        self._remote().sync()

    def close(self) -> None:
        """Drop the server's hold (the object persists with its pages); a
        file open for writing writes its dirty pages back first, and raises
        the error."""
        f, self._file = self._file, None
        try:
            if f is not None:
                f.close(sync=self._writable)
        finally:
            super().close()


def _create(target: str | os.PathLike[str] | int, flags: int) -> None:
    """Make the file of an O_CREAT open on the host (truncation is the server's)."""
    if isinstance(target, int):
        if flags & os.O_EXCL:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target)
        return
    os.close(os.open(target, flags & ~os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o666))
