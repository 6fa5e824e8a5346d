"""File I/O through a VM's pages: ``vm.pread``, ``vm.pwrite``, ``vm.open``.

These are the library's front end to UBC (:mod:`vnpager.uvm.uvm_bio`).  A
file is named by a host path (looked up on the VM's hostfs), a descriptor
of an open host file, the URL of an object (:mod:`vnpager.vfs.objfs`: its
writes reach the store at ``sync`` and ``close``), or a vnode the caller
holds a reference to.
``pread``/``pwrite`` attach the file's object for the one call; the object
then persists with its pages, so the next call finds them.  ``vm.open``
returns a :class:`UbcFile`, an ``io.RawIOBase`` that keeps the object
attached from open to close; wrap it in ``io.BufferedReader``/
``io.TextIOWrapper`` as for a raw file.

Attaching is the mapping core's (:class:`~vnpager.vnmap.FileObject`), as
for ``vnpager.mmap``: close-to-open, so each call of ``pread``/``pwrite``
and each ``open`` of a file that another program changed since (a new size
or mtime) reads it again.  Everything goes through the same pages as
``vnpager.mmap`` mappings of the same VM, so each sees the other's writes
at once.  Dirty pages reach the host file at ``UbcFile.sync()``, at the
``close()`` of a file open for writing (so that a reader who opens the
file after it sees them), ``uvm_vnp_sync(vm)``, ``vm.close()`` or when the
page daemon cleans them; ``sync`` and ``close`` raise the write-back's
error, or one that failed elsewhere while the file was open (errseq).
"""

from __future__ import annotations

import errno
import io
import os
from typing import TYPE_CHECKING, Any

from vnpager.uvm.uvm_bio import ubc_read, ubc_readinto, ubc_write
from vnpager.uvm.uvm_param import PROT_READ, PROT_WRITE
from vnpager.vfs.objfs import is_url
from vnpager.vfs.vnode import Vnode
from vnpager.vnmap import FileObject, Target

if TYPE_CHECKING:
    from vnpager.uvm.uvm import VM


def vm_pread(vm: VM, target: Target, n: int, off: int) -> bytes:
    with FileObject.open(vm, target, PROT_READ) as f:
        return ubc_read(f.uvn, n, off)


def vm_pwrite(vm: VM, target: Target, data: bytes | bytearray | memoryview, off: int) -> int:
    with FileObject.open(vm, target, PROT_READ | PROT_WRITE) as f:
        return ubc_write(f.uvn, data, off)


_OPEN_FLAGS = {"r": 0, "w": os.O_CREAT | os.O_TRUNC, "a": os.O_CREAT | os.O_APPEND,
               "x": os.O_CREAT | os.O_EXCL}


class UbcFile(io.RawIOBase):
    """A file whose reads and writes go through the VM's pages.

    Modes as for ``open()``: r, w, a, x, each with an optional + (binary
    only; a 'b' is accepted and ignored).  A vnode exists already: w
    truncates it, x is EEXIST.
    """

    def __init__(self, vm: VM, target: Target, mode: str = "r") -> None:
        super().__init__()
        kind = mode.replace("b", "").replace("+", "")
        if kind not in _OPEN_FLAGS or len(kind) != 1 or "t" in mode:
            raise ValueError(f"invalid mode: {mode!r}")
        flags = _OPEN_FLAGS[kind]
        self.name = target if isinstance(target, Vnode | int) else os.fspath(target)
        self.mode = mode
        self._readable = kind == "r" or "+" in mode
        self._writable = kind != "r" or "+" in mode
        self._append = bool(flags & os.O_APPEND)
        url = is_url(target)  # an object: the store makes it at the first sync
        if flags & os.O_CREAT and not url:
            _create(target, flags)
        self._file: FileObject | None = FileObject.open(
            vm, target, PROT_READ | (PROT_WRITE if self._writable else 0),
            create=url and bool(flags & os.O_CREAT), excl=url and bool(flags & os.O_EXCL))
        self._pos = 0
        if flags & os.O_TRUNC:
            self._file.setsize(0)

    def _object(self) -> FileObject:
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
        n = ubc_readinto(self._object().uvn, memoryview(b).cast("B"), self._pos)
        self._pos += n
        return n

    def write(self, b: Any) -> int:
        if not self._writable:
            raise io.UnsupportedOperation("not writable")
        uvn = self._object().uvn
        if self._append:
            self._pos = uvn.u_size
        n = ubc_write(uvn, b, self._pos)
        self._pos += n
        return n

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._object().uvn.u_size}[whence]
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
        self._object().setsize(size)
        return size

    def sync(self) -> None:
        """Write the file's dirty pages to the host file and wait (fsync)."""
        self._object().sync()

    def close(self) -> None:
        """Detach (the object persists with its pages); a file open for
        writing writes its dirty pages back first, and raises the error."""
        f, self._file = self._file, None
        try:
            if f is not None:
                f.close(sync=self._writable)
        finally:
            super().close()


def _create(target: Target, flags: int) -> None:
    """Make the file of an O_CREAT open on the host (truncation is ours)."""
    if isinstance(target, Vnode | int):
        if flags & os.O_EXCL:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target)
        return
    os.close(os.open(target, flags & ~os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o666))
