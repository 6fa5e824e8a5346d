"""Memory objects (uvm_object.c, uvm_object.h).

A :class:`UvmObject` is what a mapping maps: a lock, a pager (``pgops``),
a reference count, and its resident pages by offset (:class:`PageTree`),
so that flush and sync visit only the pages that exist, in offset order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from sortedcontainers import SortedList

from vnpager.kern.debug import panic
from vnpager.kern.lock import RWLock

if TYPE_CHECKING:
    from vnpager.uvm.uvm import VM
    from vnpager.uvm.uvm_page import VmPage
    from vnpager.uvm.uvm_pager import UvmPagerOps

CHUNK_SHIFT = 6  # a PageTree chunk is 64 pages: one bit of an int each


class PageTree:
    """An object's resident pages by offset (the seed's ``memt``, a tree).

    A dict answers lookups; the order is kept per chunk of 64 pages, as a
    bit mask per chunk and a sorted list of the chunks that hold a page.
    So inserting or removing a page costs a dict store and a bit, and a
    sorted insert only for the first page of a chunk: a cold sequential
    read inserts (and the page daemon removes) a cluster's pages without a
    tree operation per page (a SortedDict spent about 2 us on each insert
    and each removal, alone the MI budget of a page).  Walks in offset
    order (:meth:`irange`, :meth:`values`) cost the chunks they visit and
    the pages in them.

    => guarded by the owning object's lock (see UvmObject).
    """

    __slots__ = ("_chunks", "_masks", "_pages", "_shift", "get")

    def __init__(self, page_size: int) -> None:
        self._shift = page_size.bit_length() - 1  # offset >> _shift: the page's number
        self._pages: dict[int, VmPage] = {}
        self._masks: dict[int, int] = {}  # chunk -> bit i set: its page i is here
        self._chunks: SortedList = SortedList()  # the chunks whose mask is not 0
        # get(off): the page at off, or None; the dict's own method, so that
        # a lookup (per page of a fault's window) costs no Python call
        self.get: Callable[[int], VmPage | None] = self._pages.get

    def __getitem__(self, off: int) -> VmPage:
        return self._pages[off]

    def __contains__(self, off: object) -> bool:
        return off in self._pages

    def __len__(self) -> int:
        return len(self._pages)

    def __setitem__(self, off: int, pg: VmPage) -> None:
        pages = self._pages
        if off not in pages:
            pn = off >> self._shift
            c = pn >> CHUNK_SHIFT
            mask = self._masks.get(c, 0)
            if not mask:
                self._chunks.add(c)
            self._masks[c] = mask | 1 << (pn & 63)
        pages[off] = pg

    def __delitem__(self, off: int) -> None:
        self.remove_run([off])

    def absent_run(self, off: int, limit: int) -> int:
        """How many pages from *off* on, up to *limit*, are not resident:
        the length of the gap a read there may fill."""
        pages = self._pages
        step = 1 << self._shift
        n = 0
        while n < limit and off not in pages:
            n += 1
            off += step
        return n

    def insert_run(self, off: int, pgs: list[VmPage]) -> None:
        """Insert ``pgs[i]`` at ``off + i`` pages for each i: a chunk's mask
        is stored once for the pages in it.  An offset that holds a page
        already is a bug (panic)."""
        pages, masks, shift = self._pages, self._masks, self._shift
        pn = off >> shift
        step = 1 << shift
        c, mask = -1, 0
        for pg in pgs:
            if pn >> CHUNK_SHIFT != c:
                if c >= 0:
                    masks[c] = mask
                c = pn >> CHUNK_SHIFT
                mask = masks.get(c, 0)
                if not mask:
                    self._chunks.add(c)
            mask |= 1 << (pn & 63)
            if off in pages:
                panic(f"uvm_pageinsert: page already at offset {off:#x}")
            pages[off] = pg
            off += step
            pn += 1
        if c >= 0:
            masks[c] = mask

    def remove_run(self, offs: list[int]) -> None:
        """Remove the pages at *offs* (each resident): a chunk's mask is
        stored once for a stretch of offsets in it."""
        pages, masks, shift = self._pages, self._masks, self._shift
        c, mask = -1, 0
        for off in offs:
            del pages[off]
            pn = off >> shift
            if pn >> CHUNK_SHIFT != c:
                if c >= 0:
                    self._store_mask(c, mask)
                c = pn >> CHUNK_SHIFT
                mask = masks[c]
            mask &= ~(1 << (pn & 63))
        if c >= 0:
            self._store_mask(c, mask)

    def _store_mask(self, c: int, mask: int) -> None:
        if mask:
            self._masks[c] = mask
        else:
            del self._masks[c]
            self._chunks.remove(c)

    def pages_in(self, lo: int, hi: int) -> list[VmPage]:
        """The pages with lo <= offset < hi, in order.  A range of a few
        chunks is looked up page by page (one dict lookup each, no
        generator: deactivate-behind and flushes of a window), a longer one
        walked through the chunks."""
        step = 1 << self._shift
        if hi - lo <= (2 * step) << CHUNK_SHIFT or len(self._pages) * step >= hi - lo:
            lo = max(0, -(-lo // step) * step)  # the first page at or after lo
            return [pg for pg in map(self._pages.get, range(lo, hi, step)) if pg is not None]
        pages = self._pages
        return [pages[off] for off in self.irange(lo, hi)]

    def irange(self, lo: int, hi: int) -> Iterator[int]:
        """The offsets of the pages with lo <= offset < hi, in order."""
        shift = self._shift
        first = max(0, (lo + (1 << shift) - 1) >> shift)  # the page numbers in range
        end = (hi + (1 << shift) - 1) >> shift
        if end <= first:
            return
        masks = self._masks
        # lazily: _next_page takes the first only (the caller changes nothing meanwhile)
        for c in self._chunks.irange(first >> CHUNK_SHIFT, (end - 1) >> CHUNK_SHIFT):
            base = c << CHUNK_SHIFT
            mask = masks[c]
            if base < first:
                mask &= ~((1 << (first - base)) - 1)
            if base + 64 > end:
                mask &= (1 << (end - base)) - 1
            while mask:
                low = mask & -mask
                yield (base + low.bit_length() - 1) << shift
                mask ^= low

    def __iter__(self) -> Iterator[int]:
        """The offsets of all the pages, in order."""
        if not self._chunks:
            return iter(())
        return self.irange(0, (self._chunks[-1] + 1) << (CHUNK_SHIFT + self._shift))

    def values(self) -> list[VmPage]:
        """All the pages, in offset order (a snapshot)."""
        return [self._pages[off] for off in self]


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
        self.memt = PageTree(vm.page_size)
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
        return self.memt.pages_in(start, stop)
