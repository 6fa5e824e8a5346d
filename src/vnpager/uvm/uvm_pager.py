"""The generic pager layer (uvm_pager.c, uvm_pager.h).

Pagers plug into UVM through a :class:`UvmPagerOps` table.  This module
holds what all pagers share: the pager map (``uvm_pagermapin``: the kernel
window through which a pager does I/O on pages, here an iovec of the page
frames, of which only a few may be in use at once), clustering around a
dirty page (``uvm_mk_pcluster``), the put path (``uvm_pager_put``), and
asynchronous I/O: a pager may start a write on the :class:`AioDaemon`
and return VM_PAGER_PEND; the daemon runs the transfer and then the
pager's aiodone hook, which finishes the pages as the synchronous path
would have.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from vnpager.kern.debug import KASSERT
from vnpager.kern.lock import Mutex, fork_gate
from vnpager.kern.synch import nsleepers, rwsleep, wakeup
from vnpager.uvm.pmap import (
    pmap_clear_modify,
    pmap_clear_reference,
    pmap_is_modified,
    pmap_page_protect,
)
from vnpager.uvm.uvm_page import (
    PG_BUSY,
    PG_CLEAN,
    PG_CLEANCHK,
    PG_RELEASED,
    PG_WANTED,
    PQ_INACTIVE,
    UVM_PAGE_OWN,
    VmPage,
    uvm_pagefree,
)
from vnpager.uvm.uvm_param import PROT_READ

if TYPE_CHECKING:
    from vnpager.uvm.uvm_object import UvmObject

log = logging.getLogger("vnpager.uvm_pager")

# pager return codes
VM_PAGER_OK: Final = 0
VM_PAGER_BAD: Final = 1
VM_PAGER_FAIL: Final = 2
VM_PAGER_PEND: Final = 3
VM_PAGER_ERROR: Final = 4
VM_PAGER_AGAIN: Final = 5
VM_PAGER_UNLOCK: Final = 6
VM_PAGER_REFAULT: Final = 7

# flags for pgo_get, pgo_put, pgo_flush and uvm_pager_put
PGO_CLEANIT: Final = 0x001  # write dirty pages to backing store
PGO_SYNCIO: Final = 0x002  # wait for the I/O to finish
PGO_DEACTIVATE: Final = 0x004  # deactivate the pages flushed
PGO_FREE: Final = 0x008  # free the pages flushed
PGO_ALLPAGES: Final = 0x010  # the whole object (flush) / every page (get)
PGO_DOACTCLUST: Final = 0x020  # clustering may take active pages
PGO_LOCKED: Final = 0x040  # get: the caller's fault structures are locked
PGO_PDFREECLUST: Final = 0x080  # the page daemon's put: unbusy the cluster
PGO_REALLOCSWAP: Final = 0x100  # dropcluster: swap slots (unused here)
PGO_NOWAIT: Final = 0x200  # do not sleep for the vnode lock
PGO_NOSLEEPALLOC: Final = 0x400  # get: never sleep for memory, take no reserve (read-ahead)


class _DontCare:
    def __repr__(self) -> str:
        return "PGO_DONTCARE"


PGO_DONTCARE: Final = _DontCare()  # a pgo_get slot the caller does not want

UVMPAGER_MAPIN_WAITOK: Final = 0x01
UVMPAGER_MAPIN_READ: Final = 0x02
UVMPAGER_MAPIN_WRITE: Final = 0x00

PageSlot = VmPage | _DontCare | None


@dataclass(frozen=True)
class UvmPagerOps:
    """``struct uvm_pagerops``: a pager's entry points."""

    pgo_init: Callable[..., None]
    pgo_reference: Callable[[UvmObject], None]
    pgo_detach: Callable[[UvmObject], None]
    pgo_get: Callable[[UvmObject, int, list[PageSlot], int, int, int, int, int], tuple[int, int]]
    pgo_put: Callable[[UvmObject, list[VmPage], int, int], int]
    pgo_flush: Callable[[UvmObject, int, int, int], bool]
    pgo_cluster: Callable[[UvmObject, int], tuple[int, int]]
    pgo_mk_pcluster: Callable[..., list[VmPage]]


@dataclass(eq=False)
class UvmAioDesc:
    """One asynchronous pager I/O (``struct uvm_aiodesc``).

    ``io`` does the transfer and returns an errno; ``aiodone`` then runs
    on the daemon's thread with the descriptor, ``error`` filled in.
    """

    uobj: UvmObject
    pps: list[VmPage]
    io: Callable[[], int]
    aiodone: Callable[[UvmAioDesc], None]
    error: int = 0


class AioDaemon:
    """Threads that run asynchronous pager I/O and its completion.

    Up to *nworkers* threads, started on demand and gone after *idle*
    seconds without work, so an idle VM costs no threads.  An exception in
    an aiodone hook is a bug: it is kept and raised again by :meth:`drain`.
    """

    def __init__(self, nworkers: int = 2, idle: float = 2.0) -> None:
        self.nworkers = nworkers
        self.idle = idle
        self._q: queue.SimpleQueue[UvmAioDesc] = queue.SimpleQueue()
        self._cv = threading.Condition()
        self._threads = 0
        self.pending = 0  # started and not yet done
        self.failures: list[BaseException] = []

    def start(self, desc: UvmAioDesc) -> None:
        with self._cv:
            self.pending += 1
            self._q.put(desc)
            if self._threads < min(self.nworkers, self.pending):
                self._threads += 1
                threading.Thread(target=self._run, name="aiodoned", daemon=True).start()

    def drain(self) -> None:
        """Wait until every I/O started so far is done."""
        self.wait_idle()
        if self.failures:
            raise self.failures[0]

    def wait_idle(self) -> None:
        """Wait until every I/O started so far is done (fork quiesces with
        this: nothing else starts I/O then)."""
        with self._cv:
            self._cv.wait_for(lambda: self.pending == 0)

    def after_fork_child(self) -> None:
        """In a forked child: the parent's workers are not here (and were
        idle at the fork); start ours on demand, as at first."""
        self._q = queue.SimpleQueue()
        self._cv = threading.Condition()
        self._threads = self.pending = 0

    def _run(self) -> None:
        with fork_gate.exempt():  # fork waits for threads that may wait for us
            self._work()

    def _work(self) -> None:
        while True:
            try:
                desc = self._q.get(timeout=self.idle)
            except queue.Empty:
                with self._cv:
                    if self._q.empty():
                        self._threads -= 1
                        return
                continue
            try:
                desc.error = desc.io()
            except Exception:  # a backend bug must not leave the pages busy forever
                log.exception("asynchronous pager I/O failed")
                desc.error = errno.EIO
            try:
                desc.aiodone(desc)
            except BaseException as e:
                log.exception("aiodone failed")
                self.failures.append(e)
            # an idle worker must not keep the last object, and so its VM,
            # alive: a VM dropped without close() is garbage at once
            del desc
            with self._cv:
                self.pending -= 1
                self._cv.notify_all()

    def statistics(self) -> AioStatistics:
        """The daemon's threads and work, read without its lock."""
        return AioStatistics(self._threads, self.nworkers, self.pending, self._q.qsize(), len(self.failures))


class PagerMap:
    """The pager map: at most *nslots* I/Os may have pages mapped in."""

    def __init__(self, nslots: int) -> None:
        self.nslots = nslots
        self.inuse = 0
        self.lock = Mutex("pager_map")

    def trace_name(self) -> str:
        return "pager_map"

    def statistics(self) -> PagerMapStatistics:
        """Slots in use, and the threads asleep until one is free."""
        return PagerMapStatistics(self.nslots, self.inuse, nsleepers(self))


def uvm_pagermapin(pager_map: PagerMap, pps: list[VmPage], flags: int) -> list[memoryview] | None:
    """Map *pps* in for I/O: return their frames as an iovec.

    Returns None when the map is full and UVMPAGER_MAPIN_WAITOK is not set.
    """
    with pager_map.lock:
        while pager_map.inuse >= pager_map.nslots:
            if not flags & UVMPAGER_MAPIN_WAITOK:
                return None
            rwsleep(pager_map, pager_map.lock, "pager_map")
        pager_map.inuse += 1
    return [pg.data for pg in pps]


def uvm_pagermapout(pager_map: PagerMap) -> None:
    with pager_map.lock:
        pager_map.inuse -= 1
    wakeup(pager_map)


def uvm_mk_pcluster(uobj: UvmObject, center: VmPage, maxpages: int, flags: int,
                    mlo: int, mhi: int) -> list[VmPage]:
    """Gather the dirty, unbusy pages contiguous with *center* for one write.

    The window comes from the pager's pgo_cluster, clipped to [mlo, mhi)
    unless PGO_ALLPAGES.  Active (possibly mapped) neighbours are taken only
    with PGO_DOACTCLUST, and their PG_CLEAN is synced from the pmap first.
    Every page taken is made busy and write-protected.

    => caller holds the object lock; *center* is busy and owned by the caller.
    """
    lo, hi = uobj.pgops.pgo_cluster(uobj, center.offset)
    if not flags & PGO_ALLPAGES:
        lo, hi = max(lo, mlo), min(hi, mhi)
    page_size = uobj.vm.page_size
    if (hi - lo) // page_size > maxpages:
        return [center]
    before: list[VmPage] = []
    after: list[VmPage] = []
    for side, step in ((before, -page_size), (after, page_size)):
        off = center.offset + step
        while lo <= off < hi:
            pg = uobj.memt.get(off)
            if pg is None:
                break
            if not pg.pg_flags & PQ_INACTIVE:
                if not flags & PGO_DOACTCLUST:
                    break
                if not pg.pg_flags & PG_CLEANCHK:
                    if pg.pg_flags & (PG_CLEAN | PG_BUSY) == PG_CLEAN and pmap_is_modified(pg):
                        pg.pg_flags &= ~PG_CLEAN
                    pg.pg_flags |= PG_CLEANCHK
            if pg.pg_flags & (PG_CLEAN | PG_BUSY):
                break
            pg.pg_flags |= PG_BUSY
            UVM_PAGE_OWN(pg, "uvm_mk_pcluster")
            pmap_page_protect(pg, PROT_READ)
            side.append(pg)
            off += step
    before.reverse()
    return [*before, center, *after]


def pager_unbusy(pg: VmPage) -> None:
    """Unbusy a page the caller owns after its I/O, waking its waiters.  A
    PG_RELEASED page stays released: the caller frees it.

    => caller holds the page's object lock.
    """
    if pg.pg_flags & PG_WANTED:
        wakeup(pg)
    pg.pg_flags &= ~(PG_BUSY | PG_WANTED)
    UVM_PAGE_OWN(pg, None)


def uvm_pager_dropcluster(uobj: UvmObject, pg: VmPage | None, ppsp: list[VmPage], flags: int) -> None:
    """Give back the pages of a cluster other than *pg*.

    After a failed put they are unbusied and stay dirty, to be retried with
    the next flush.  With PGO_PDFREECLUST (a successful put for the page
    daemon) they are marked clean.  Released pages are freed.

    => caller holds the object lock.
    """
    vm = uobj.vm
    for p in ppsp:
        if p is pg:
            continue
        pager_unbusy(p)
        if p.pg_flags & PG_RELEASED:
            p.pg_flags &= ~PG_RELEASED
            with vm.pageqlock:
                uvm_pagefree(p)
            continue
        if flags & PGO_PDFREECLUST:
            pmap_clear_reference(p)
            pmap_clear_modify(p)
            p.pg_flags |= PG_CLEAN


def uvm_pager_put(uobj: UvmObject, pg: VmPage, maxpages: int, flags: int,
                  start: int, stop: int) -> tuple[int, list[VmPage]]:
    """Write *pg* out, clustered with its dirty neighbours.

    Returns ``(result, cluster)``.  On VM_PAGER_OK or VM_PAGER_PEND the
    cluster comes back busy to the caller (with PGO_PDFREECLUST, the pages
    other than *pg* are already unbusied and clean).  On any other result
    the pages other than *pg* have been dropped (unbusied and still dirty;
    released ones freed) and *pg* is still busy; the cluster comes back all
    the same, so that the caller knows which pages the failed write
    covered.  (The seed returns *pg* alone, and its flush then wrote each
    later page of the cluster again, as the centre of a new one.)

    => caller holds the object lock; *pg* is busy and owned by the caller.
    => the lock is held again on return (the pager may drop it for I/O).
    """
    KASSERT(pg.pg_flags & PG_BUSY, "uvm_pager_put: page not busy")
    ppsp = uobj.pgops.pgo_mk_pcluster(uobj, pg, maxpages, flags, start, stop)
    result = uobj.pgops.pgo_put(uobj, ppsp, len(ppsp), flags)
    if result in (VM_PAGER_OK, VM_PAGER_PEND):
        if result == VM_PAGER_OK and flags & PGO_PDFREECLUST and len(ppsp) > 1:
            uvm_pager_dropcluster(uobj, pg, ppsp, PGO_PDFREECLUST)
            return result, [pg]
        return result, ppsp
    if len(ppsp) > 1:
        uvm_pager_dropcluster(uobj, pg, ppsp, 0)
    return result, ppsp


@dataclass(frozen=True)
class AioStatistics:
    """``AioDaemon.statistics()``: a snapshot."""

    workers: int  # threads running now (started on demand, gone when idle)
    max_workers: int
    pending: int  # asynchronous I/Os started and not yet done (aiodone not yet run)
    queued: int  # of those, not yet taken by a worker
    failures: int  # aiodone hooks that raised (a bug: drain() raises the first)


@dataclass(frozen=True)
class PagerMapStatistics:
    """``PagerMap.statistics()``: a snapshot."""

    slots: int
    inuse: int  # I/Os with their pages mapped in now
    waiters: int  # threads asleep in uvm_pagermapin until a slot is free
