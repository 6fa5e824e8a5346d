"""The machine as Python programs meet it: :class:`VM`.

The kernel's state lives in :class:`vnpager.uvm.uvm.VM`; this subclass adds
the front ends that a user of the library calls on a machine, so that the
UVM layer never imports what sits above it.
"""

from __future__ import annotations

import os

from vnpager import ubc
from vnpager.uvm import uvm


class VM(uvm.VM):
    """A machine with *physmem* bytes of page frames (see uvm.VM), and file
    I/O through its pages: ``pread``, ``pwrite`` and ``open`` see the same
    pages as the ``vnpager.mmap`` mappings of this VM."""

    def pread(self, target: ubc.Target, n: int, off: int) -> bytes:
        """Up to *n* bytes at *off* of a host path or vnode, through the pages."""
        return ubc.vm_pread(self, target, n, off)

    def pwrite(self, target: ubc.Target, data: bytes | bytearray | memoryview, off: int) -> int:
        """Write *data* at *off* of a host path or vnode into its pages (dirty)."""
        return ubc.vm_pwrite(self, target, data, off)

    def open(self, path: str | os.PathLike[str], mode: str = "r") -> ubc.UbcFile:
        """A raw file object whose I/O goes through the pages (see UbcFile)."""
        return ubc.UbcFile(self, path, mode)
