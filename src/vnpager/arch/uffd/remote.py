"""A client's address space, from the server: pidfds and process_madvise.

The page daemon's second chance needs referenced bits, which neither
PAGEMAP_SCAN nor /proc gives per page.  So the server clears a range's
references by unmapping the client's PTEs with
``process_madvise(MADV_PAGEOUT)`` -- without swap, shmem pages stay in the
memfd -- and a re-reference comes back as a MINOR fault.  The kernel
skips pages mapped by more than one process, and the call needs
CAP_SYS_NICE over the client.  A pidfd is also how the server watches a
client for death without a race on pid reuse (it polls readable when the
process exits).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

from .fdobject import FdObject
from .libc import syscall

NR_process_madvise = 440  # x86_64
MADV_COLD = 20
MADV_PAGEOUT = 21


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class Process(FdObject):
    """A pidfd for one client process (owns it)."""

    __slots__ = ("pid",)

    def __init__(self, pid: int) -> None:
        super().__init__(os.pidfd_open(pid))
        self.pid = pid

    def madvise(self, ranges: Sequence[tuple[int, int]], advice: int) -> int:
        """process_madvise(2) *advice* over the (start, length) *ranges* of
        the client's space, in one call; bytes advised."""
        iov = (_Iovec * len(ranges))(*[_Iovec(start, length) for start, length in ranges])
        return syscall(NR_process_madvise, self.fd, iov, len(ranges), advice, 0,
                       what=f"process_madvise({advice}) pid {self.pid}")

    def pageout(self, start: int, length: int) -> int:
        """Unmap the client's PTEs of a range, keeping the frames: what the
        server does to clear the range's referenced bits.

        => the range's written pages were harvested first (Pagemap.written):
        a written PTE becomes none, which still reads as written, but the
        MINOR fault that maps it again write-protected makes it clean."""
        return self.madvise([(start, length)], MADV_PAGEOUT)
