"""The file object of ``vm.open``, for both machines: ``open()``'s modes, a
position, and the calls of ``io.RawIOBase``, over positional I/O on the
file's pages that each machine provides (:class:`vnpager.ubc.UbcFile`
through a software VM's UBC, :class:`vnpager.client.hwfile.HwFile` through
a pager server's).  Nothing here knows a VM: the hardware client imports
it without the kernel.
"""

from __future__ import annotations

import errno
import io
import os
from typing import Any, Protocol

_OPEN_FLAGS = {"r": 0, "w": os.O_CREAT | os.O_TRUNC, "a": os.O_CREAT | os.O_APPEND,
               "x": os.O_CREAT | os.O_EXCL}


class Handle(Protocol):
    """A machine's hold on a file's object (``FileObject``, ``RemoteFile``)."""

    def setsize(self, size: int) -> None: ...
    def sync(self) -> None: ...
    def close(self, sync: bool = False) -> None: ...


class PagedFile(io.RawIOBase):
    """A raw file whose reads and writes go through a VM's pages.

    Modes as for ``open()``: r, w, a, x, each with an optional + (binary
    only; a 'b' is accepted and ignored).  A subclass opens its handle
    once ``__init__`` has parsed the mode (``self.flags`` says what the
    open asks: O_CREAT, O_EXCL, O_TRUNC, O_APPEND), calls :meth:`_opened`
    with it, and does the I/O in the ``_*_at`` methods.
    """

    _file: Handle

    def __init__(self, name: Any, mode: str) -> None:
        super().__init__()
        kind = mode.replace("b", "").replace("+", "")
        if kind not in _OPEN_FLAGS or len(kind) != 1 or "t" in mode:
            raise ValueError(f"invalid mode: {mode!r}")
        self.flags = _OPEN_FLAGS[kind]
        self.name = name
        self.mode = mode
        self._readable = kind == "r" or "+" in mode
        self._writable = kind != "r" or "+" in mode
        self._open = False
        self._pos = 0

    def _create(self, target: Any, url: bool) -> tuple[bool, bool]:
        """Make the host file an O_CREAT open of *target* asks for; for the
        object of a URL (*url*), what the handle's open is told instead:
        (create, excl) (the store makes the object at its first sync)."""
        creat = bool(self.flags & os.O_CREAT)
        if creat and not url:
            create_host_file(target, self.flags)
        return url and creat, url and bool(self.flags & os.O_EXCL)

    def _opened(self, handle: Handle) -> None:
        """The subclass's *handle* is open: truncate if the mode asks."""
        self._file, self._open = handle, True
        if self.flags & os.O_TRUNC:
            self._setsize(0)

    # the machine's positional I/O on the open handle
    def _readinto_at(self, view: memoryview, off: int) -> int:
        raise NotImplementedError

    def _write_at(self, data: Any, off: int) -> int:
        raise NotImplementedError

    def _size(self) -> int:
        raise NotImplementedError

    def _setsize(self, size: int) -> None:
        self._file.setsize(size)

    def _check(self) -> None:
        if not self._open:
            raise ValueError("I/O operation on closed file")

    def readable(self) -> bool:
        return self._readable

    def writable(self) -> bool:
        return self._writable

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if not self._readable:
            raise io.UnsupportedOperation("not readable")
        self._check()
        n = self._readinto_at(memoryview(b).cast("B"), self._pos)
        self._pos += n
        return n

    def write(self, b: Any) -> int:
        if not self._writable:
            raise io.UnsupportedOperation("not writable")
        self._check()
        if self.flags & os.O_APPEND:
            self._pos = self._size()
        n = self._write_at(b, self._pos)
        self._pos += n
        return n

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        self._check()
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END):
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos}.get(whence)
        base = self._size() if base is None else base
        if base + pos < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._pos = base + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        if not self._writable:
            raise io.UnsupportedOperation("not writable")
        self._check()
        size = self._pos if size is None else size
        self._setsize(size)
        return size

    def sync(self) -> None:
        """Write the file's dirty pages to the file and wait (fsync)."""
        self._check()
        self._file.sync()

    def close(self) -> None:
        """Drop the hold (the object persists with its pages); a file open
        for writing writes its dirty pages back first, and raises the error."""
        was_open, self._open = self._open, False
        try:
            if was_open:
                self._file.close(sync=self._writable)
        finally:
            super().close()


def create_host_file(target: Any, flags: int) -> None:
    """Make the host file of an O_CREAT open of *target* (truncation is the
    pager's).  A target that is no path (a descriptor, a vnode) exists."""
    if not isinstance(target, str | os.PathLike):
        if flags & os.O_EXCL:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target)
        return
    os.close(os.open(target, flags & ~os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o666))
