"""Memory objects (uvm_object.c, uvm_object.h).

A :class:`UvmObject` is what a mapping maps: a lock, a pager (``pgops``),
a reference count, and its resident pages ordered by offset, so that flush
and sync visit only the pages that exist.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sortedcontainers import SortedDict

from vnpager.kern.lock import RWLock

if TYPE_CHECKING:
    from vnpager.uvm.uvm import VM
    from vnpager.uvm.uvm_page import VmPage
    from vnpager.uvm.uvm_pager import UvmPagerOps


class UvmObject:
    """``struct uvm_object``.

    * ``vm``, ``pgops``, ``vmobjlock``: fixed when the object is made.
    * ``memt`` (the resident pages by offset) and ``uo_refs``: change only
      under ``vmobjlock`` (write); read under it (read or write).
    * ``uo_active``: the object's pages on the active queue, oldest first,
      kept by the page queue functions under ``vm.pageqlock`` (a page is in
      it exactly when it is tabled here and PQ_ACTIVE), so that the last
      detach visits the pages used since the previous one, not every page.
    """

    def __init__(self, vm: VM, pgops: UvmPagerOps, refs: int = 0) -> None:
        self.vm = vm
        self.pgops = pgops
        self.vmobjlock = RWLock("vmobjlock")
        self.memt: SortedDict[int, VmPage] = SortedDict()
        self.uo_active: dict[VmPage, None] = {}
        self.uo_refs = refs

    @property
    def uo_npages(self) -> int:
        return len(self.memt)

    def pages_in(self, start: int, stop: int) -> list[VmPage]:
        """The resident pages with start <= offset < stop, in offset order.

        A snapshot: the caller may drop the lock while it works through it,
        and must then check that each page is still in the object.
        """
        return [self.memt[off] for off in self.memt.irange(start, stop, inclusive=(True, False))]
