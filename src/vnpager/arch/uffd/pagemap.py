"""PAGEMAP_SCAN (Linux 6.7): which pages of a client's range were written.

With UFFD_FEATURE_WP_ASYNC, a write to a write-protected page of a range
registered MODE_WP is resolved by the kernel itself (no event, no server
round trip): it clears the page's protection, and PAGE_IS_WRITTEN then
reports it.  The server scans ``/proc/<client>/pagemap`` for written pages
and write-protects them again in the same walk (PM_SCAN_WP_MATCHING), so
each scan returns exactly the pages written since the last one: that is
``pmap_is_modified`` and ``pmap_clear_modify`` for a whole range in one
ioctl.  Reading another process's pagemap needs ptrace access to it
(root, or the same user with ptrace_scope 0).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

from . import uapi
from .fdobject import FdObject

_REGION_SIZE = struct.calcsize(uapi.PAGE_REGION_FMT)


class Pagemap(FdObject):
    """An open ``/proc/<pid>/pagemap`` (owns the fd) and a region buffer.

    Not thread-safe: one scan at a time uses the buffer.
    """

    __slots__ = ("_vec", "nregions", "pid")

    def __init__(self, pid: int | str = "self", nregions: int = 256) -> None:
        self.pid = pid
        super().__init__(os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC))
        self.nregions = nregions
        self._vec = (ctypes.c_char * (_REGION_SIZE * nregions))()

    def scan(
        self, start: int, end: int, *, category_mask: int, return_mask: int, flags: int = 0,
        category_inverted: int = 0,
    ) -> list[tuple[int, int, int]]:
        """The regions (start, end, categories) of [start, end) whose pages
        have every category of *category_mask* (after *category_inverted*),
        reporting *return_mask*.  Walks again from where the kernel stopped
        when the region buffer fills."""
        out: list[tuple[int, int, int]] = []
        vec = ctypes.addressof(self._vec)
        while start < end:
            arg = bytearray(struct.pack(
                uapi.PM_SCAN_ARG_FMT, struct.calcsize(uapi.PM_SCAN_ARG_FMT), flags, start, end, 0, vec,
                self.nregions, 0, category_inverted, category_mask, 0, return_mask))
            try:
                n = fcntl.ioctl(self.fd, uapi.PAGEMAP_SCAN, arg)
            except OSError as e:
                err = e.errno or 0
                hint = " (PAGEMAP_SCAN needs Linux 6.7)" if err in (errno.ENOTTY, errno.EINVAL) else ""
                raise OSError(err, f"PAGEMAP_SCAN {self.pid} [{start:#x}, {end:#x}): "
                                   f"{os.strerror(err)}{hint}") from None
            raw = ctypes.string_at(vec, n * _REGION_SIZE)
            out.extend(struct.iter_unpack(uapi.PAGE_REGION_FMT, raw))
            walk_end = struct.unpack_from(uapi.PM_SCAN_ARG_FMT, arg)[4]
            if walk_end <= start:
                break
            start = walk_end
        return out

    def written(self, start: int, end: int, *, reprotect: bool = True) -> list[tuple[int, int]]:
        """The runs [s, e) of pages of [start, end) written since they were
        last write-protected; with *reprotect*, protected again in the same
        walk so that the next call reports only later writes.

        A page with neither a PTE nor a write-protect marker counts as
        written: the kernel cannot tell whether a PTE zapped there held a
        write, so it errs towards dirty.  Write-protect a range once after
        registering it (UFFDIO_WRITEPROTECT installs markers in the holes)
        so that untouched pages read clean.

        => [start, end) is registered MODE_WP on a uffd with WP_ASYNC.
        """
        flags = uapi.PM_SCAN_WP_MATCHING | uapi.PM_SCAN_CHECK_WPASYNC if reprotect else 0
        regions = self.scan(start, end, category_mask=uapi.PAGE_IS_WRITTEN,
                            return_mask=uapi.PAGE_IS_WRITTEN, flags=flags)
        return [(s, e) for s, e, _ in regions]
