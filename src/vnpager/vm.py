"""The machine as Python programs meet it: :class:`VM`.

The kernel's state lives in :class:`vnpager.uvm.uvm.VM`; this subclass adds
the front ends that a user of the library calls on a machine, so that the
UVM layer never imports what sits above it.  Each takes a *target*: a host
path, a descriptor of an open host file, the URL of an object
(``s3://bucket/key``, ``https://...``: see :meth:`VM.mount_objects`), or a
vnode of this VM (see :mod:`vnpager.vnmap`).

``VM(mmu="hardware")`` is the other machine: a
:class:`~vnpager.client.HardwareVM`, whose kernel state lives in a pager
server process and whose maps are real memory (issue 10);
``VM.connect(PATH)`` attaches to a shared server.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from vnpager import ubc
from vnpager.uvm import uvm
from vnpager.uvm.uvm_map import MAP_SHARED
from vnpager.uvm.uvm_param import PROT_READ, PROT_WRITE
from vnpager.vfs.objfs import ObjMount, is_url, objfs_mounts
from vnpager.vfs.objstore import PartPolicy
from vnpager.vfs.vnode import Vnode
from vnpager.vnmap import Target, vnode_of

if TYPE_CHECKING:
    from vnpager.client import HardwareVM
    from vnpager.mmap import mmap

MMUS = ("software", "hardware")


class VM(uvm.VM):
    """A machine with *physmem* bytes of page frames (see uvm.VM), and file
    I/O through its pages: ``map``, ``pread``, ``pwrite`` and ``open`` see
    the same pages.

    *mmu* picks the machine: ``"software"`` (this class, the default) or
    ``"hardware"``, which makes a HardwareVM with a private server of
    *physmem* bytes instead (it takes no other argument).  UffdUnavailable,
    naming the fix, where userfaultfd is not permitted."""

    mmu = "software"

    def __new__(cls, *args: Any, mmu: str = "software", **kwargs: Any) -> Any:
        if mmu == "hardware":
            from vnpager.client import HardwareVM

            return HardwareVM(*args, **kwargs)
        if mmu != "software":
            raise ValueError(f"mmu must be one of {', '.join(MMUS)}, not {mmu!r}")
        return super().__new__(cls)

    def __init__(self, *args: Any, mmu: str = "software", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)

    @staticmethod
    def connect(path: str) -> HardwareVM:
        """A client of the shared pager server at *path* (``vnpager serve
        --socket PATH``; ``@name`` is an abstract socket)."""
        from vnpager.client import HardwareVM

        return HardwareVM.connect(path)

    def map(self, target: Target, length: int = 0, flags: int = MAP_SHARED,
            prot: int = PROT_READ | PROT_WRITE, access: int = 0, offset: int = 0) -> mmap:
        """A ``vnpager.mmap`` of *target* in this VM, with the arguments of
        ``mmap.mmap`` after the descriptor.  A path is opened read-write
        where the host allows, else read-only, for the map only; a URL is
        looked up in its store (close-to-open), and a read-only store
        (HTTP) needs ``prot=PROT_READ``."""
        from vnpager.mmap import mmap  # vnpager.mmap imports this module

        if isinstance(target, Vnode | int):
            return mmap(target, length, flags, prot, access, offset, vm=self)
        if is_url(target):
            vp = vnode_of(self, target)
            try:
                return mmap(vp, length, flags, prot, access, offset, vm=self)
            finally:
                self.vfs.vrele(vp)
        try:
            fd = os.open(target, os.O_RDWR | os.O_CLOEXEC)
        except PermissionError:
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return mmap(fd, length, flags, prot, access, offset, vm=self)
        finally:
            os.close(fd)

    def mount_objects(self, fs: Any, policy: PartPolicy | None = None, staging_dir: str | None = None,
                      **storage_options: Any) -> ObjMount:
        """The objects of an object store as this VM's files: *fs* is an
        fsspec filesystem, or a protocol or URL (``"s3"``, ``"s3://bucket"``)
        to make one with *storage_options* (``fsspec.filesystem``'s:
        ``endpoint_url``, ``key``, ``secret``, ``anon``, ...).  From then on
        URLs of its protocol (``vm.open("s3://bucket/key")``, ``vm.map``,
        ``vm.pread``) are its objects; a protocol never mounted gets one
        with fsspec's defaults (the environment, AWS config) at its first
        URL.  *policy* is the server's multipart limits (PartPolicy: AWS's
        by default); *staging_dir* where written pages wait for their
        publish (the system's temporary directory by default).  The mount's
        ``statistics()`` counts its requests."""
        if isinstance(fs, str):
            import fsspec

            fs = fsspec.filesystem(fs.split("://", 1)[0], **storage_options)
        elif storage_options:
            raise TypeError("storage_options make a filesystem: pass a protocol, not one")
        return objfs_mounts(self.vfs).mount(fs, policy, staging_dir)

    def pread(self, target: Target, n: int, off: int) -> bytes:
        """Up to *n* bytes at *off* of *target*, through the pages."""
        return ubc.vm_pread(self, target, n, off)

    def pwrite(self, target: Target, data: bytes | bytearray | memoryview, off: int) -> int:
        """Write *data* at *off* of *target* into its pages (dirty)."""
        return ubc.vm_pwrite(self, target, data, off)

    def open(self, target: Target, mode: str = "r") -> ubc.UbcFile:
        """A raw file object whose I/O goes through the pages (see UbcFile)."""
        return ubc.UbcFile(self, target, mode)
