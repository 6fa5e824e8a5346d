"""Physical pages and the page queues (uvm_page.c, uvm_page.h).

Physical memory is the machine's page frames (``Frames`` of the pmap
interface), allocated when the VM is made; each :class:`VmPage` owns one
frame and exposes it as ``pg.data``, a memoryview that I/O reads and
writes in place.  A VM can never hold more page data than its frames.

Queue membership is kept in ``pg_flags`` as OpenBSD does (PQ_ACTIVE,
PQ_INACTIVE, PQ_FREE); the queues themselves are insertion-ordered dicts so
that the oldest page is the first key and requeueing is O(1).

The cold path works per cluster, not per page: beside the per-page calls
are their run forms (:func:`uvm_pagealloc_run`, :func:`uvm_pageactivate_run`,
:func:`uvm_pagedeactivate_run`, :func:`uvm_pagefree_run`), each the same as
the per-page call on every page of a list, in order, under one hold of the
page queue lock.  The KASSERTs of the per-page calls that the cold path
makes for every page are tested only under VNPAGER_DEBUG (``if DEBUG``), so
that without it they cost no call.

=> page queue changes require ``vm.pageqlock``; page identity changes
   (insert into or remove from an object) also require the object's lock.
"""

from __future__ import annotations

from itertools import groupby
from operator import attrgetter
from typing import TYPE_CHECKING

from vnpager.kern.debug import DEBUG, KASSERT, panic
from vnpager.kern.synch import rwsleep, wakeup
from vnpager.uvm.pmap import (
    PG_MOD,
    pmap_clear_reference,
    pmap_clear_reference_run,
    pmap_is_modified,
    pmap_page_protect,
    pmap_page_protect_run,
)
from vnpager.uvm.uvm_param import PROT_NONE

if TYPE_CHECKING:
    from vnpager.kern.synch import Interlock
    from vnpager.uvm.pmap import Pmap
    from vnpager.uvm.uvm import VM
    from vnpager.uvm.uvm_object import UvmObject

# pg_flags: page state (uvm_page.h)
PG_BUSY = 0x00000001  # someone owns the page and is doing I/O on or with it
PG_WANTED = 0x00000002  # someone sleeps until it stops being busy
PG_TABLED = 0x00000004  # the page is in an object
PG_CLEAN = 0x00000008  # the page matches its backing store
PG_CLEANCHK = 0x00000010  # PG_CLEAN is known to be in sync with the pmap
PG_RELEASED = 0x00000020  # free the page once it is no longer busy
PG_FAKE = 0x00000040  # the page holds no valid data yet
PG_RDONLY = 0x00000080  # the page may only be mapped read-only
# pg_flags: queue membership
PQ_FREE = 0x00010000
PQ_INACTIVE = 0x00020000
PQ_ACTIVE = 0x00040000
PQ_ANON = 0x00100000  # the page belongs to an anon, not an object
PQ_QUEUES = PQ_FREE | PQ_INACTIVE | PQ_ACTIVE

UVM_PGA_ZERO = 0x1  # uvm_pagealloc: zero the frame
UVM_PGA_NORESERVE = 0x2  # uvm_pagealloc: fail rather than go below vm.freemin (read-ahead)


class VmPage:
    """One physical page (``struct vm_page``).

    Which lock guards each field (the order of the locks is in uvm/uvm.py):

    * ``vm``, ``frame``, ``data`` (the memoryview itself): fixed when the VM
      is made.  The bytes of ``data``: whoever has the page busy (PG_BUSY)
      for I/O or a copy, and ``vm.pmap_lock`` for loads and stores through
      a mapping.
    * ``pg_flags``: the PG_* bits under the object lock of the page's
      object (PG_BUSY makes the holder its owner until it unbusies it); the
      PQ_* bits under ``vm.pageqlock``.  One word for both, as in OpenBSD,
      which changes it with atomic operations.  Here ``|=`` and ``&=`` are
      a read-modify-write that the GIL does not make atomic, so all writers
      must share a lock: every writer holds the object lock (the page
      daemon tries it before it moves a page), or the page is free and
      owned by the allocator, under the page queue lock.
    * ``offset``, ``uobject``, ``uanon``, ``wire_count``: the object lock
      (insert and remove also need the page, busy or free, to be the
      caller's).  The page daemon reads ``uobject`` unlocked and checks it
      again under that object's lock.
    * ``owner``: the UVM_PAGE_OWN tag, written by the page's owner; debug only.
    * ``pv``, ``attrs``: ``vm.pmap_lock``; pmap_is_modified and
      pmap_is_referenced read ``attrs`` unlocked (one load: atomic).
    """

    __slots__ = (
        "attrs",
        "data",
        "frame",
        "offset",
        "owner",
        "pg_flags",
        "pv",
        "uanon",
        "uobject",
        "vm",
        "wire_count",
    )

    def __init__(self, vm: VM, frame: int, data: memoryview) -> None:
        self.vm = vm
        self.frame = frame
        self.data = data
        self.pg_flags = PQ_FREE
        self.offset = 0
        self.uobject: UvmObject | None = None
        self.uanon: object | None = None
        self.wire_count = 0
        self.owner: str | None = None  # UVM_PAGE_OWN tag, for debugging
        # pmap state: the mappings of this page and the ref/mod attributes
        self.pv: dict[tuple[Pmap, int], None] = {}
        self.attrs = 0

    def trace_name(self) -> str:
        return f"pg@{self.offset:#x}"

    def __repr__(self) -> str:
        return f"<VmPage frame={self.frame} off={self.offset:#x} flags={self.pg_flags:#x}>"


def UVM_PAGE_OWN(pg: VmPage, tag: str | None) -> None:
    pg.owner = tag


def uvm_pagelookup(uobj: UvmObject, off: int) -> VmPage | None:
    """=> caller holds the object lock."""
    return uobj.memt.get(off)


def uvm_pageinsert(pg: VmPage, uobj: UvmObject, off: int) -> None:
    if DEBUG:
        KASSERT((pg.pg_flags & PG_TABLED) == 0, "uvm_pageinsert: already tabled")
        KASSERT(not pg.pg_flags & PQ_ACTIVE, "uvm_pageinsert: active page")  # uo_active would miss it
    if off in uobj.memt:
        panic(f"uvm_pageinsert: page already at offset {off:#x}")
    pg.uobject = uobj
    pg.offset = off
    uobj.memt[off] = pg
    pg.pg_flags |= PG_TABLED
    pg.vm.frames.bind(pg)  # the uffd machine's frames are the object's memfd pages


def uvm_pageremove(pg: VmPage) -> None:
    uobj = pg.uobject
    if DEBUG:
        KASSERT(pg.pg_flags & PG_TABLED and uobj is not None, "uvm_pageremove: not tabled")
        KASSERT(not pg.pg_flags & PQ_ACTIVE, "uvm_pageremove: active page")  # dequeue it first
    assert uobj is not None
    pg.vm.frames.unbind(pg)  # the uffd machine punches the page out of the object's memfd
    del uobj.memt[pg.offset]
    pg.pg_flags &= ~PG_TABLED
    pg.uobject = None


def uvm_pagealloc(vm: VM, uobj: UvmObject | None, off: int, flags: int = 0) -> VmPage | None:
    """Take a free frame and, with *uobj*, insert it at *off*.

    The page comes back PG_BUSY|PG_CLEAN|PG_FAKE, owned by the caller and on
    no queue.  Returns None when no frame is free: the caller decides
    whether to uvm_wait() and retry.  With UVM_PGA_NORESERVE (pages that may
    never be used: read-ahead) it also returns None rather than take the
    free count below vm.freemin, the mark at which the page daemon starts
    reclaiming: such pages never make it push other pages out (see
    uvm_pagewant_ra to get more).

    => caller holds the object lock (when *uobj* is given).
    """
    pgs = uvm_pagealloc_run(vm, uobj, off, 1, flags)
    return pgs[0] if pgs else None


def uvm_pagealloc_run(vm: VM, uobj: UvmObject | None, off: int, npages: int, flags: int = 0,
                      owner: str = "new") -> list[VmPage]:
    """Take up to *npages* free frames under one hold of the page queue
    lock and, with *uobj*, insert them at *off*, *off* + page_size, ...

    Each page comes back as from uvm_pagealloc (PG_BUSY|PG_CLEAN|PG_FAKE,
    on no queue, owned by the caller, tagged *owner*).  Fewer pages, or
    none, come back when fewer are free, and with UVM_PGA_NORESERVE when
    fewer are free above vm.freemin; without it, an allocation that finds
    no frame at all counts (allocfail) and wakes the page daemon.

    => caller holds the object lock (when *uobj* is given); no page of the
       run is resident.
    """
    with vm.pageqlock:
        free = vm.page_free
        avail = len(free) - vm.freemin if flags & UVM_PGA_NORESERVE else len(free)
        n = max(0, min(npages, avail))
        if n == 0:
            if not free and not flags & UVM_PGA_NORESERVE:
                vm.uvmexp.allocfail += 1
                wakeup(vm.pagedaemon_chan)
            return []
        pgs = free[:-n - 1:-1]  # pop() order: the lowest frame first
        del free[-n:]
        for pg in pgs:
            pg.pg_flags = PG_BUSY | PG_CLEAN | PG_FAKE
        if vm.npages_free_low():
            wakeup(vm.pagedaemon_chan)
    # the pages are the caller's: out of the page queue lock
    if uobj is not None:
        _pageinsert_run(pgs, uobj, off, owner)
    else:
        for pg in pgs:
            pg.owner = owner
            pg.attrs = 0
    if flags & UVM_PGA_ZERO:  # after the insert, which may have moved pg.data (frames.bind)
        for pg in pgs:
            pg.data[:] = vm.zero_page
    return pgs


def _pageinsert_run(pgs: list[VmPage], uobj: UvmObject, off: int, owner: str) -> None:
    """uvm_pageinsert of ``pgs[i]`` at ``off + i`` pages, new pages of
    uvm_pagealloc_run, tagged *owner*: the object's tree takes the run in
    one call.  => caller holds the object lock and owns the pages."""
    if DEBUG:
        for pg in pgs:
            KASSERT((pg.pg_flags & PG_TABLED) == 0, "uvm_pageinsert: already tabled")
    uobj.memt.insert_run(off, pgs)
    ps = uobj.vm.page_size
    bind = uobj.vm.frames.bind
    for pg in pgs:
        pg.owner = owner
        pg.attrs = 0
        pg.uobject = uobj
        pg.offset = off
        pg.pg_flags |= PG_TABLED
        bind(pg)  # the uffd machine's frames are the object's memfd pages
        off += ps


def uvm_pagewant_ra(vm: VM, npages: int) -> None:
    """Read-ahead was cut short for want of *npages* free pages: ask the
    page daemon to free that many above freemin, from inactive pages only,
    for the next read-ahead.  The request is capped at freemin, so that
    read-ahead never has the daemon empty the inactive queue of a small
    machine.  => caller holds no page queue lock."""
    with vm.pageqlock:
        vm.ra_wanted = max(vm.ra_wanted, min(npages, vm.freemin))
    wakeup(vm.pagedaemon_chan)


def _active_remove(vm: VM, pg: VmPage) -> None:
    """Take *pg* off the active queue, and its object's ``uo_active``."""
    del vm.page_active[pg]
    if pg.uobject is not None:
        del pg.uobject.uo_active[pg]
    pg.pg_flags &= ~PQ_ACTIVE


def _pagedequeue(vm: VM, pg: VmPage) -> None:
    if pg.pg_flags & PQ_ACTIVE:
        _active_remove(vm, pg)
    elif pg.pg_flags & PQ_INACTIVE:
        del vm.page_inactive[pg]
    pg.pg_flags &= ~(PQ_ACTIVE | PQ_INACTIVE)


def uvm_pageclean(pg: VmPage) -> None:
    """Take *pg* out of its object and off its queue, ready to be freed.

    => caller holds the object lock and the page queue lock.
    """
    if DEBUG:
        KASSERT(pg.vm.pageqlock.held(), "uvm_pageclean: pageq not locked")
        KASSERT(not pg.pv, "uvm_pageclean: page still mapped")
    _pagedequeue(pg.vm, pg)  # while pg.uobject still names the object (uo_active)
    if pg.pg_flags & PG_TABLED:
        uvm_pageremove(pg)
    pg.wire_count = 0
    pg.uanon = None


def _pagefree_locked(pg: VmPage) -> None:
    vm = pg.vm
    if pg.pg_flags & PG_WANTED:
        wakeup(pg)
    pg.pg_flags = PQ_FREE
    pg.owner = None
    pg.attrs = 0
    vm.page_free.append(pg)
    vm.uvmexp.frees += 1


def uvm_pagefree(pg: VmPage) -> None:
    """Return *pg* to the free list, waking threads that wait for memory.

    => caller holds the object lock and the page queue lock.
    """
    if pg.pv:
        pmap_page_protect(pg, PROT_NONE)
    uvm_pageclean(pg)
    _pagefree_locked(pg)
    wakeup(pg.vm.free_chan)


def uvm_pagefree_run(pgs: list[VmPage]) -> None:
    """uvm_pagefree of each page of *pgs*: unmapped in one pmap call, then
    freed under one hold of the page queue lock, with one wakeup.

    => caller holds the pages' object lock, not the page queue lock.
    """
    if not pgs:
        return
    pmap_page_protect_run([pg for pg in pgs if pg.pv], PROT_NONE)
    vm = pgs[0].vm
    # highest frame first: the free list pops them lowest first, so that
    # the next run allocated lies on consecutive frames wherever these
    # were, and the TLB joins the pages of the next read into one run
    pgs = sorted(pgs, key=_FRAME, reverse=True)
    with vm.pageqlock:
        if DEBUG:
            KASSERT(not any(pg.pv for pg in pgs), "uvm_pagefree_run: page still mapped")
        _pagedequeue_run(vm, pgs)
        _pageremove_run([pg for pg in pgs if pg.pg_flags & PG_TABLED])
        free = vm.page_free
        for pg in pgs:
            if pg.pg_flags & PG_WANTED:
                wakeup(pg)
            pg.pg_flags = PQ_FREE
            pg.wire_count = 0
            pg.uanon = None
            pg.owner = None
            pg.attrs = 0
        free.extend(pgs)
        vm.uvmexp.frees += len(pgs)
    wakeup(vm.free_chan)


_FRAME = attrgetter("frame")


def _pagedequeue_run(vm: VM, pgs: list[VmPage]) -> None:
    """_pagedequeue of each page of *pgs*.  => caller holds the page queue lock."""
    active, inactive = vm.page_active, vm.page_inactive
    for pg in pgs:
        flags = pg.pg_flags
        if flags & PQ_ACTIVE:
            del active[pg]
            if pg.uobject is not None:
                del pg.uobject.uo_active[pg]
        elif flags & PQ_INACTIVE:
            del inactive[pg]
        pg.pg_flags = flags & ~(PQ_ACTIVE | PQ_INACTIVE)


def _pageremove_run(pgs: list[VmPage]) -> None:
    """uvm_pageremove of each page of *pgs*, each object's tree told once
    per stretch of its pages.  => caller holds the pages' object locks."""
    if not pgs:
        return
    unbind = pgs[0].vm.frames.unbind
    for uobj, stretch in groupby(pgs, key=_UOBJECT):
        run = list(stretch)
        if DEBUG:
            KASSERT(uobj is not None and not any(pg.pg_flags & PQ_ACTIVE for pg in run),
                    "uvm_pageremove: active page")
        for pg in run:
            unbind(pg)  # the uffd machine punches the page out of the object's memfd
            pg.pg_flags &= ~PG_TABLED
            pg.uobject = None
        uobj.memt.remove_run([pg.offset for pg in run])


_UOBJECT = attrgetter("uobject")


def uvm_pglistfree(pgs: list[VmPage]) -> None:
    """Free pages already taken apart by uvm_pageclean().

    => page queue lock not held (we take it).
    """
    if not pgs:
        return
    vm = pgs[0].vm
    with vm.pageqlock:
        for pg in pgs:
            _pagefree_locked(pg)
    wakeup(vm.free_chan)


def uvm_pagewait(pg: VmPage, lock: Interlock, wmesg: str) -> None:
    """Sleep until *pg* is no longer busy.

    => caller holds *lock* (the page's object lock); it is dropped and NOT
       taken again (PNORELOCK), since the page may be gone on wakeup.
    """
    KASSERT(pg.pg_flags & PG_BUSY, "uvm_pagewait: page not busy")
    pg.pg_flags |= PG_WANTED
    rwsleep(pg, lock, wmesg, relock=False)


def uvm_pagedeactivate(pg: VmPage) -> None:
    """Move *pg* to the tail of the inactive queue.

    PG_CLEAN is synced from the pmap on the way: the pager trusts the
    PG_CLEAN of inactive pages (uvm_mk_pcluster clusters on it).

    => caller holds the page queue lock.
    """
    vm = pg.vm
    KASSERT(vm.pageqlock.held(), "uvm_pagedeactivate: pageq not locked")
    if pg.pg_flags & PQ_INACTIVE or pg.wire_count:
        return
    _pagedeactivate_dequeue(vm, pg)
    pmap_clear_reference(pg)
    vm.page_inactive[pg] = None
    pg.pg_flags |= PQ_INACTIVE


def _pagedeactivate_dequeue(vm: VM, pg: VmPage) -> None:
    """uvm_pagedeactivate's first step: off the active queue, PG_CLEAN synced."""
    if pg.pg_flags & PQ_ACTIVE:
        _active_remove(vm, pg)
    if pg.pg_flags & PG_CLEAN and pmap_is_modified(pg):
        pg.pg_flags &= ~PG_CLEAN


def uvm_pagedeactivate_run(pgs: list[VmPage]) -> None:
    """uvm_pagedeactivate of each page of *pgs*, the references cleared in
    one pmap call.

    => caller holds the page queue lock.
    """
    if not pgs:
        return
    vm = pgs[0].vm
    if DEBUG:
        KASSERT(vm.pageqlock.held(), "uvm_pagedeactivate_run: pageq not locked")
    pgs = [pg for pg in pgs if not (pg.pg_flags & PQ_INACTIVE or pg.wire_count)]
    active = vm.page_active
    for pg in pgs:  # _pagedeactivate_dequeue, inline
        flags = pg.pg_flags
        if flags & PQ_ACTIVE:
            del active[pg]
            if pg.uobject is not None:
                del pg.uobject.uo_active[pg]
            flags &= ~PQ_ACTIVE
        if flags & PG_CLEAN and pg.attrs & PG_MOD:
            flags &= ~PG_CLEAN
        pg.pg_flags = flags
    pmap_clear_reference_run(pgs)
    inactive = vm.page_inactive
    for pg in pgs:
        inactive[pg] = None
        pg.pg_flags |= PQ_INACTIVE


def uvm_pageactivate(pg: VmPage) -> None:
    """Move *pg* to the tail of the active queue.

    => caller holds the page queue lock.
    """
    _pageactivate_locked([pg])


def uvm_pageactivate_run(pgs: list[VmPage]) -> None:
    """uvm_pageactivate of each page of *pgs*, under one hold of the page
    queue lock.  => caller holds the pages' object lock, not the page
    queue lock."""
    if pgs:
        with pgs[0].vm.pageqlock:
            _pageactivate_locked(pgs)


def _pageactivate_locked(pgs: list[VmPage]) -> None:
    """=> caller holds the page queue lock."""
    vm = pgs[0].vm
    if DEBUG:
        KASSERT(vm.pageqlock.held(), "uvm_pageactivate: pageq not locked")
    active, inactive = vm.page_active, vm.page_inactive
    for pg in pgs:  # _pagedequeue, inline
        if pg.wire_count:
            continue
        flags = pg.pg_flags
        uobj = pg.uobject
        if flags & PQ_ACTIVE:
            del active[pg]
            if uobj is not None:
                del uobj.uo_active[pg]
        elif flags & PQ_INACTIVE:
            del inactive[pg]
        active[pg] = None
        if uobj is not None:
            uobj.uo_active[pg] = None
        pg.pg_flags = (flags & ~PQ_INACTIVE) | PQ_ACTIVE


def uvm_page_unbusy(pgs: list[VmPage]) -> None:
    """Unbusy pages the caller owns: wake waiters, free released ones.

    => caller holds the pages' object lock; page queue lock not held.
    """
    for pg in pgs:
        if pg.pg_flags & PG_WANTED:
            wakeup(pg)
        if pg.pg_flags & PG_RELEASED:
            pg.pg_flags &= ~PG_RELEASED
            with pg.vm.pageqlock:
                uvm_pagefree(pg)
            continue
        pg.pg_flags &= ~(PG_WANTED | PG_BUSY)
        pg.owner = None


def uvm_wait(vm: VM, wmesg: str) -> None:
    """Wake the page daemon and sleep until some memory is freed.

    => caller holds no object lock: the daemon may need it to free pages.
    """
    with vm.pageqlock:
        if vm.page_free:
            return
        vm.uvmexp.waits += 1
        wakeup(vm.pagedaemon_chan)
        # sleep with the queue lock as interlock: a free that follows our
        # check must find us already queued
        rwsleep(vm.free_chan, vm.pageqlock, wmesg)

