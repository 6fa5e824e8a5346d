"""The software machine's page frames (its uvm_page_physload).

Physical memory is one arena of anonymous memory, which the host commits
only when a frame is touched; private, so that a forked child gets frames
of its own (copy on write).  Frame *i* is bytes ``[i * page_size, (i + 1) *
page_size)`` of it, so frames with consecutive numbers are consecutive
bytes: the pmap's TLB joins them into one run (one memoryview).  A
frame is the page's for its whole life, so binding it to an object and
following an object's size are nothing to do here.
"""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vnpager.uvm.uvm_object import UvmObject
    from vnpager.uvm.uvm_page import VmPage


class Frames:
    """*npages* frames of *page_size* bytes, made when the VM is made and
    never freed before it (the VM's pages hold views of them)."""

    __slots__ = ("arena", "page_size", "view")

    def __init__(self, npages: int, page_size: int) -> None:
        self.page_size = page_size
        self.arena = mmap.mmap(-1, npages * page_size, flags=mmap.MAP_PRIVATE)
        self.view = memoryview(self.arena)  # the TLB's runs are slices of it

    def frame(self, i: int) -> memoryview:
        """The bytes of frame *i*: a VmPage's ``data``, read and written in place."""
        return self.view[i * self.page_size:(i + 1) * self.page_size]

    def bind(self, pg: VmPage) -> None:
        """*pg* entered its object: its frame stays where it is."""

    def unbind(self, pg: VmPage) -> None:
        """*pg* left its object: its frame stays where it is."""

    def setsize(self, uobj: UvmObject, size: int) -> None:
        """*uobj*'s size changed: the frames do not follow objects."""

    def check(self, pages: list[VmPage]) -> str | None:
        """What is wrong with the frames of *pages* (None: nothing): each
        page keeps its own frame."""
        for pg in pages:
            if pg.data.obj is not self.arena or len(pg.data) != self.page_size:
                return f"page {pg!r} lost its frame"
        return None

    def resident(self, npages_free: int) -> int:
        """The frames holding data: those not free."""
        return len(self.arena) // self.page_size - npages_free
