"""vnpager: the OpenBSD UVM vnode pager, rebuilt in Python.

``vnpager.mmap`` is a drop-in for Python's ``mmap.mmap`` whose pages live in
a :class:`VM` of bounded size; see :mod:`vnpager.mmap` for the differences.
"""

from vnpager.kern.errors import BusError, SegvError
from vnpager.mmap import (
    ACCESS_COPY,
    ACCESS_DEFAULT,
    ACCESS_READ,
    ACCESS_WRITE,
    ALLOCATIONGRANULARITY,
    MADV_DONTNEED,
    MADV_NORMAL,
    MADV_RANDOM,
    MADV_SEQUENTIAL,
    MADV_WILLNEED,
    MAP_ANON,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGESIZE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    default_vm,
    mmap,
)
from vnpager.vm import VM

__all__ = [
    "ACCESS_COPY", "ACCESS_DEFAULT", "ACCESS_READ", "ACCESS_WRITE", "ALLOCATIONGRANULARITY",
    "MADV_DONTNEED", "MADV_NORMAL", "MADV_RANDOM", "MADV_SEQUENTIAL", "MADV_WILLNEED",
    "MAP_ANON", "MAP_ANONYMOUS", "MAP_PRIVATE", "MAP_SHARED", "PAGESIZE", "PROT_EXEC",
    "PROT_READ", "PROT_WRITE", "VM", "BusError", "SegvError", "default_vm", "mmap",
]
