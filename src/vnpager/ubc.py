"""File I/O through a VM's pages: ``vm.pread``, ``vm.pwrite``, ``vm.open``.

These are the library's front end to UBC (:mod:`vnpager.uvm.uvm_bio`).  A
file is named by a host path (looked up on the VM's hostfs) or given as a
vnode the caller holds a reference to.  ``pread``/``pwrite`` attach the
file's object for the one call; the object then persists with its pages,
so the next call finds them.  ``vm.open`` returns a :class:`UbcFile`, an
``io.RawIOBase`` that keeps the object attached from open to close; wrap
it in ``io.BufferedReader``/``io.TextIOWrapper`` as for a raw file.

Everything goes through the same pages as ``vnpager.mmap`` mappings of the
same VM, so each sees the other's writes at once.  Dirty pages reach the
host file at ``UbcFile.sync()``, ``uvm_vnp_sync(vm)``, ``vm.close()`` or
when the page daemon cleans them.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from vnpager.uvm.uvm_bio import ubc_read, ubc_readinto, ubc_setsize, ubc_write
from vnpager.uvm.uvm_pager import PGO_ALLPAGES, PGO_CLEANIT, PGO_SYNCIO
from vnpager.uvm.uvm_param import PROT_READ, PROT_WRITE
from vnpager.uvm.uvm_vnode import UvmVnode, uvn_attach, uvn_detach, uvn_flush
from vnpager.vfs.hostfs import hostfs_vget_path
from vnpager.vfs.mount import vrele
from vnpager.vfs.vnode import Vnode

if TYPE_CHECKING:
    from vnpager.uvm.uvm import VM

Target = str | os.PathLike[str] | Vnode


def ubc_attach(vm: VM, target: Target, prot: int) -> UvmVnode:
    """Attach the object of *target* with *prot*; raise OSError if we cannot.

    => the caller detaches it (uvn_detach) when done.
    """
    if isinstance(target, Vnode):
        vp = target
        vm.vfs.vref(vp)
    else:
        vp = hostfs_vget_path(vm.vfs, vm.hostfs, os.fspath(target))
    try:
        uvn = uvn_attach(vp, prot)
    finally:
        vrele(vp)  # the object holds its own reference
    if uvn is None:
        raise OSError(errno.ENODEV, f"{target!r} cannot be attached")
    return uvn


@contextmanager
def _attached(vm: VM, target: Target, prot: int) -> Iterator[UvmVnode]:
    uvn = ubc_attach(vm, target, prot)
    try:
        yield uvn
    finally:
        uvn_detach(uvn)


def ubc_sync(uvn: UvmVnode) -> None:
    """Write every dirty page of *uvn* and wait (fsync); raise the error of
    a write-back that failed."""
    with uvn.vmobjlock:
        ok = uvn_flush(uvn, 0, 0, PGO_CLEANIT | PGO_SYNCIO | PGO_ALLPAGES)
        error = uvn.u_error
    if not ok:
        raise OSError(error or errno.EIO, "write-back failed")


def vm_pread(vm: VM, target: Target, n: int, off: int) -> bytes:
    with _attached(vm, target, PROT_READ) as uvn:
        return ubc_read(uvn, n, off)


def vm_pwrite(vm: VM, target: Target, data: bytes | bytearray | memoryview, off: int) -> int:
    with _attached(vm, target, PROT_READ | PROT_WRITE) as uvn:
        return ubc_write(uvn, data, off)


_OPEN_FLAGS = {"r": 0, "w": os.O_CREAT | os.O_TRUNC, "a": os.O_CREAT | os.O_APPEND,
               "x": os.O_CREAT | os.O_EXCL}


class UbcFile(io.RawIOBase):
    """A file whose reads and writes go through the VM's pages.

    Modes as for ``open()``: r, w, a, x, each with an optional + (binary
    only; a 'b' is accepted and ignored).
    """

    def __init__(self, vm: VM, path: str | os.PathLike[str], mode: str = "r") -> None:
        super().__init__()
        kind = mode.replace("b", "").replace("+", "")
        if kind not in _OPEN_FLAGS or len(kind) != 1 or "t" in mode:
            raise ValueError(f"invalid mode: {mode!r}")
        flags = _OPEN_FLAGS[kind]
        self.name = os.fspath(path)
        self.mode = mode
        self._readable = kind == "r" or "+" in mode
        self._writable = kind != "r" or "+" in mode
        self._append = bool(flags & os.O_APPEND)
        if flags & os.O_CREAT:  # create it on the host; truncation is ours
            os.close(os.open(self.name, flags & ~os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o666))
        self._uvn: UvmVnode | None = ubc_attach(
            vm, self.name, PROT_READ | (PROT_WRITE if self._writable else 0))
        self._pos = 0
        if flags & os.O_TRUNC:
            ubc_setsize(self._uvn, 0)

    def _object(self) -> UvmVnode:
        if self._uvn is None:
            raise ValueError("I/O operation on closed file")
        return self._uvn

    def readable(self) -> bool:
        return self._readable

    def writable(self) -> bool:
        return self._writable

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if not self._readable:
            raise io.UnsupportedOperation("not readable")
        n = ubc_readinto(self._object(), memoryview(b).cast("B"), self._pos)
        self._pos += n
        return n

    def write(self, b: Any) -> int:
        if not self._writable:
            raise io.UnsupportedOperation("not writable")
        uvn = self._object()
        if self._append:
            self._pos = uvn.u_size
        n = ubc_write(uvn, b, self._pos)
        self._pos += n
        return n

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._object().u_size}[whence]
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
        ubc_setsize(self._object(), size)
        return size

    def sync(self) -> None:
        """Write the file's dirty pages to the host file and wait (fsync)."""
        ubc_sync(self._object())

    def close(self) -> None:
        if self._uvn is not None:
            uvn, self._uvn = self._uvn, None
            uvn_detach(uvn)  # the object persists with its pages
        super().close()

