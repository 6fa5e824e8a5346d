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

import os
from typing import TYPE_CHECKING, Any

from vnpager.fileio import PagedFile
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


class UbcFile(PagedFile):
    """A file whose reads and writes go through the VM's pages (UBC).

    Modes as for ``open()`` (see :class:`~vnpager.fileio.PagedFile`).  A
    vnode exists already: w truncates it, x is EEXIST.
    """

    def __init__(self, vm: VM, target: Target, mode: str = "r") -> None:
        super().__init__(target if isinstance(target, Vnode | int) else os.fspath(target), mode)
        create, excl = self._create(target, is_url(target))
        prot = PROT_READ | (PROT_WRITE if self._writable else 0)
        self._file: FileObject = FileObject.open(vm, target, prot, create=create, excl=excl)
        self._opened(self._file)

    def _readinto_at(self, view: memoryview, off: int) -> int:
        return ubc_readinto(self._file.uvn, view, off)

    def _write_at(self, data: Any, off: int) -> int:
        return ubc_write(self._file.uvn, data, off)

    def _size(self) -> int:
        return self._file.uvn.u_size
