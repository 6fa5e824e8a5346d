"""The page daemon (uvm_pdaemon.c): keeps some memory free.

One thread per VM sleeps until memory runs low (uvm_pagealloc and
uvm_wait wake it), then scans the inactive queue oldest first:

* a page referenced since it was deactivated gets a second chance (back to
  the active queue);
* a clean page is unmapped and freed;
* a dirty page is written through its pager (clustered with dirty
  inactive neighbours by uvm_pager_put) and freed once clean.

It then deactivates the oldest active pages, unreferenced ones first, to
refill the inactive queue, and wakes the threads waiting for memory.

Object locks are only tried (RW_NOSLEEP): a thread that holds an object
lock while it waits for memory must not deadlock against the daemon.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby, islice
from operator import attrgetter
from typing import TYPE_CHECKING

from vnpager.kern.lock import RW_NOSLEEP, RW_WRITE, fork_gate
from vnpager.kern.synch import rwsleep, wakeup
from vnpager.uvm.pmap import (
    PG_MOD,
    PG_REF,
    pmap_clear_modify,
    pmap_clear_reference_run,
    pmap_is_modified,
    pmap_is_referenced,
    pmap_page_protect,
    pmap_page_protect_run,
)
from vnpager.uvm.uvm_page import (
    PG_BUSY,
    PG_CLEAN,
    PG_WANTED,
    PQ_ACTIVE,
    PQ_INACTIVE,
    UVM_PAGE_OWN,
    VmPage,
    uvm_pageactivate,
    uvm_pageactivate_run,
    uvm_pagedeactivate_run,
    uvm_pagefree_run,
)
from vnpager.uvm.uvm_pager import (
    PGO_ALLPAGES,
    PGO_PDFREECLUST,
    VM_PAGER_AGAIN,
    VM_PAGER_OK,
    VM_PAGER_PEND,
    uvm_pager_put,
)
from vnpager.uvm.uvm_param import MAXBSIZE, PROT_NONE, PROT_READ

if TYPE_CHECKING:
    from vnpager.uvm.uvm import VM
    from vnpager.uvm.uvm_object import UvmObject

IDLE_TIMEOUT = 1.0  # seconds between checks that the VM still exists
BACKOFF = 0.005  # seconds to wait after a scan that could not free enough
SCAN_SLACK = 64  # inactive pages an inactive scan lists beyond twice its target, at first


def uvmpd_targets(vm: VM) -> tuple[int, int]:
    """(freetarg, inactarg): free pages to reach, inactive pages to keep."""
    freetarg = vm.freemin * 4 // 3 + 1
    inactarg = max((len(vm.page_active) + len(vm.page_inactive)) // 3, freetarg)
    return freetarg, inactarg


def uvmpd_scan_inactive(vm: VM, shortage: int, clean_only: bool = False) -> int:
    """Free up to *shortage* pages from the inactive queue; return how many.

    With *clean_only* (read-ahead making room, uvm_ra_reserve) dirty pages
    are left as they are, unwritten, and those already known dirty are
    passed over before any unmap: a queue of dirty anonymous pages would
    otherwise cost every read-ahead an unmap per page.

    The queue is taken in runs of pages of one object (a sequential read
    leaves its pages in order), each run with one try of the object lock,
    one pmap call and one hold of the page queue lock: per page, the scan
    is only its tests.  Pages whose pageout it started count toward
    *shortage* (see _InactiveScan).

    The oldest pages are listed first, a few more than *shortage*: a copy
    of the whole queue cost each read-ahead's scan (uvmpd_reserve, per
    fault) more than the pages it freed.  Only if they are not enough is
    the whole queue listed (its first pages again: those passed over are
    tested again, the others are gone from it).  => caller holds no lock.
    """
    scan = _InactiveScan(shortage, clean_only)
    limit = 2 * shortage + SCAN_SLACK
    with vm.pageqlock:
        whole = len(vm.page_inactive) <= limit
        candidates = list(islice(vm.page_inactive, limit))
    _reclaim_candidates(vm, candidates, scan)
    if scan.short() > 0 and not whole:
        with vm.pageqlock:
            candidates = list(vm.page_inactive)
        _reclaim_candidates(vm, candidates, scan)
    return scan.freed


def _reclaim_candidates(vm: VM, candidates: list[VmPage], scan: _InactiveScan) -> None:
    """Free what *scan* wants from *candidates*, listed from the inactive
    queue, in runs of one object's pages.  => caller holds no lock."""
    for uobj, pages in groupby(candidates, key=attrgetter("uobject")):
        if scan.short() <= 0:
            break
        _reclaim_run(vm, uobj, pages, scan)


@dataclass
class _InactiveScan:
    """What one inactive scan has done toward its target.

    Pages being written (a pageout started, VM_PAGER_PEND) count toward
    it, as uvmexp.paging does in the BSD daemon: they are free once their
    write is done, and a scan that did not count them would start a
    pageout for every dirty page of the queue, holding each object's lock
    for the whole walk.  Once the pager map is full (VM_PAGER_AGAIN) the
    scan frees clean pages only: every further put would fail the same way.
    """

    target: int
    clean_only: bool  # no pageouts: read-ahead's scan, or the pager map is full
    freed: int = 0
    paging: int = 0  # pages of the pageouts this scan started, still being written

    def short(self) -> int:
        return self.target - self.freed - self.paging


def _reclaim_run(vm: VM, uobj: UvmObject | None, pages: Iterator[VmPage], scan: _InactiveScan) -> None:
    """Try to free what *scan* still wants of *pages*, inactive pages of
    *uobj* as listed without its lock.  They are looked at as many at a
    time as are still wanted, so that the pages visited are those a scan
    page by page would visit.  => caller holds no lock."""
    if uobj is None or not uobj.vmobjlock.rw_enter(RW_WRITE | RW_NOSLEEP):
        return
    try:
        while (want := scan.short()) > 0 and (chunk := list(islice(pages, want))):
            # still an unbusy inactive page of the object (and, clean_only, clean)?
            clean = PG_CLEAN if scan.clean_only else 0
            mask, want_flags = PG_BUSY | PQ_ACTIVE | PQ_INACTIVE | clean, PQ_INACTIVE | clean
            _reclaim_batch(vm, uobj, [pg for pg in chunk if pg.uobject is uobj and
                                      pg.pg_flags & mask == want_flags], scan)
    finally:
        uobj.vmobjlock.rw_exit()


def _reclaimable(pg: VmPage, uobj: UvmObject) -> bool:
    """Still an unbusy inactive page of *uobj*?  (It may have changed hands or
    state since it was listed.)  => caller holds *uobj*'s lock."""
    return pg.uobject is uobj and pg.pg_flags & (PG_BUSY | PQ_ACTIVE | PQ_INACTIVE) == PQ_INACTIVE


def _reclaim_batch(vm: VM, uobj: UvmObject, batch: list[VmPage], scan: _InactiveScan) -> None:
    """Free the pages of *batch* that can be: a referenced one gets its
    second chance (back to the active queue), the others are unmapped (one
    pmap call), the clean ones freed (one page queue lock hold), and the
    dirty ones written one by one while *scan* wants more (or, clean_only,
    left unmapped and dirty: the next access refaults them, with no I/O).
    => caller holds the object lock."""
    again: list[VmPage] = []
    idle: list[VmPage] = []
    for pg in batch:  # pmap_is_referenced, inline (pg.attrs on every machine)
        (again if pg.attrs & PG_REF else idle).append(pg)
    uvm_pageactivate_run(again)
    pmap_page_protect_run(idle, PROT_NONE)
    clean: list[VmPage] = []
    dirty: list[VmPage] = []
    for pg in idle:
        if pg.pg_flags & PG_CLEAN and pg.attrs & PG_MOD:  # pmap_is_modified
            pg.pg_flags &= ~PG_CLEAN
        (clean if pg.pg_flags & PG_CLEAN else dirty).append(pg)
    uvm_pagefree_run(clean)  # before a write below drops the object lock
    scan.freed += len(clean)
    vm.uvmexp.pdfreed += len(clean)
    for pg in dirty:
        if scan.clean_only or scan.short() <= 0:
            break
        _reclaim_page(vm, uobj, pg, scan)


def _reclaim_page(vm: VM, uobj: UvmObject, pg: VmPage, scan: _InactiveScan) -> None:
    """Try to free one dirty inactive page, writing it, and count it in
    *scan*.  It is looked at afresh: an earlier page's write may have
    dropped the object lock, or taken this page into its cluster.
    => caller holds the object lock."""
    if not _reclaimable(pg, uobj):
        return
    if pmap_is_referenced(pg):
        uvm_pageactivate_run([pg])  # second chance
        return
    pmap_page_protect(pg, PROT_NONE)
    if pg.pg_flags & PG_CLEAN and pmap_is_modified(pg):
        pg.pg_flags &= ~PG_CLEAN
    if not pg.pg_flags & PG_CLEAN and not _pageout(vm, uobj, pg, scan):
        return
    uvm_pagefree_run([pg])
    scan.freed += 1
    vm.uvmexp.pdfreed += 1


def _pageout(vm: VM, uobj: UvmObject, pg: VmPage, scan: _InactiveScan) -> bool:
    """Write the dirty, unmapped inactive page *pg* (clustered with its
    dirty inactive neighbours); True if it is clean and untouched after, to
    be freed.  A write started (VM_PAGER_PEND) counts its pages in *scan*;
    a full pager map (VM_PAGER_AGAIN) ends the scan's pageouts.
    => caller holds the object lock (the write may drop it)."""
    pg.pg_flags |= PG_BUSY
    UVM_PAGE_OWN(pg, "pdaemon")
    pmap_page_protect(pg, PROT_READ)
    # ALLPAGES: the cluster may take any dirty inactive neighbour
    result, cluster = uvm_pager_put(uobj, pg, MAXBSIZE // vm.page_size, PGO_ALLPAGES | PGO_PDFREECLUST, 0, 0)
    if result == VM_PAGER_PEND:
        # the daemon never waits for a write: aiodone cleans the pages and
        # wakes us, and a later scan frees them
        vm.uvmexp.pdpageouts += 1
        scan.paging += len(cluster)
        return False
    _unbusy(pg)
    if result == VM_PAGER_AGAIN:  # no pager map just now: next scan
        scan.clean_only = True
        return False
    if result != VM_PAGER_OK:
        with vm.pageqlock:  # keep it dirty; uvn_io recorded the error
            uvm_pageactivate(pg)
        return False
    pg.pg_flags |= PG_CLEAN
    pmap_clear_modify(pg)
    vm.uvmexp.pdpageouts += 1
    return not (pmap_is_referenced(pg) or pg.pv)  # else touched while we wrote it


def _unbusy(pg: VmPage) -> None:
    if pg.pg_flags & PG_WANTED:
        wakeup(pg)
    pg.pg_flags &= ~(PG_BUSY | PG_WANTED)
    UVM_PAGE_OWN(pg, None)


def uvmpd_scan_active(vm: VM, want: int) -> None:
    """Move up to *want* of the oldest active pages to the inactive queue.

    Each page's object lock is only tried, as in _reclaim_run: pg_flags
    holds bits the object lock guards (PG_BUSY, PG_CLEAN) beside the queue
    bits, and a read-modify-write of it under the page queue lock alone
    could lose a concurrent change made under the object lock.  As there,
    the pages go in runs of one object, one pmap call for each step.
    """
    with vm.pageqlock:
        candidates = list(islice(vm.page_active, want * 2))
    moved = 0
    for uobj, pages in groupby(candidates, key=attrgetter("uobject")):
        if moved >= want:
            break
        if uobj is None or not uobj.vmobjlock.rw_enter(RW_WRITE | RW_NOSLEEP):
            continue
        try:
            while moved < want and (chunk := list(islice(pages, want - moved))):
                # still an unbusy active page of the object? (listed without its lock)
                moved += _deactivate_batch(vm, [pg for pg in chunk if pg.uobject is uobj and
                                                pg.pg_flags & (PQ_ACTIVE | PG_BUSY) == PQ_ACTIVE])
        finally:
            uobj.vmobjlock.rw_exit()


def _deactivate_batch(vm: VM, batch: list[VmPage]) -> int:
    """Deactivate the pages of *batch* not referenced since the last scan
    (unmapped first); the others, their reference cleared, go to the tail
    of the active queue.  Returns how many were deactivated.
    => caller holds the pages' object lock."""
    if not batch:
        return 0
    used = pmap_clear_reference_run(batch)
    idle = [pg for pg, ref in zip(batch, used, strict=True) if not ref]
    pmap_page_protect_run(idle, PROT_NONE)
    uvm_pageactivate_run([pg for pg, ref in zip(batch, used, strict=True) if ref])  # used lately: to the tail
    with vm.pageqlock:
        uvm_pagedeactivate_run(idle)
    return len(idle)


def uvmpd_reserve(vm: VM, want: int) -> int:
    """Free *want* pages for read-ahead, in the reader's thread, as a pass
    of the daemon would with its free target raised by them: clean
    inactive pages first, and if they are too few, the oldest active pages
    unreferenced since the last pass are deactivated to refill the
    inactive queue (a referenced page gets its second chance, as always).
    Dirty pages are left to the daemon: a reader does not write.  Returns
    the pages freed.  => caller holds no lock.
    """
    freed = uvmpd_scan_inactive(vm, want, clean_only=True)
    if freed < want:
        uvmpd_scan_active(vm, want - freed)
        freed += uvmpd_scan_inactive(vm, want - freed, clean_only=True)
    return freed


def uvmpd_scan(vm: VM) -> None:
    """One pass: refill the inactive queue, then free from it.

    Then the pages read-ahead asked for (``vm.ra_wanted``) above freemin
    are freed from the inactive queue only: read-ahead never makes the
    daemon deactivate a page in active use.
    """
    freetarg, inactarg = uvmpd_targets(vm)
    shortage = freetarg - len(vm.page_free)
    if shortage > 0:
        uvmpd_scan_active(vm, max(inactarg - len(vm.page_inactive), shortage))
        uvmpd_scan_inactive(vm, shortage)
    ra_shortage = vm.freemin + vm.ra_wanted - len(vm.page_free)
    vm.ra_wanted = 0
    if ra_shortage > 0:
        uvmpd_scan_inactive(vm, ra_shortage)


class PageDaemon:
    """The page daemon thread of one VM.

    It holds the VM only weakly while asleep, so a VM dropped without
    close() is still collected (the thread then exits on its next check).
    Fork parks it between scans (:meth:`park`), and the child starts a
    thread of its own (:meth:`after_fork_child`).

    => ``_cv`` guards ``scanning`` and ``_parked``: the decision to scan
       and the start of the scan are one step, so a park never misses one.
    """

    def __init__(self, vm: VM) -> None:
        self._vm = weakref.ref(vm)
        self._stop = False
        self._cv = threading.Condition()
        self._parked = False  # fork: no scan may start
        self.scanning = False  # between a wakeup and the end of its scan
        self._start()

    def _start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="pagedaemon", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stop = True
        vm = self._vm()
        if vm is not None:
            wakeup(vm.pagedaemon_chan)
        self.thread.join(timeout=10)

    def park(self) -> None:
        """Wait for the scan under way, if any, and start no other until
        :meth:`unpark` (fork quiesces the VM with this)."""
        with self._cv:
            self._parked = True
            self._cv.wait_for(lambda: not self.scanning)

    def unpark(self) -> None:
        with self._cv:
            self._parked = False
            self._cv.notify_all()

    def after_fork_child(self) -> None:
        """In a forked child: the parent's thread is not here; start ours."""
        self._cv = threading.Condition()
        self._parked = self.scanning = False
        if not self._stop:
            self._start()

    def _run(self) -> None:
        with fork_gate.exempt():  # fork waits for threads that may need us
            self._loop()

    def _loop(self) -> None:
        backoff = False
        while not self._stop:
            vm = self._vm()
            if vm is None:
                return
            chan, lock = vm.pagedaemon_chan, vm.pageqlock
            with self._cv:
                if self._parked:
                    del vm
                    self._cv.wait(IDLE_TIMEOUT)
                    continue
                lock.enter()
                self.scanning = (vm.npages_free_low() or bool(vm.ra_wanted)) and not backoff
            if self.scanning:
                lock.exit()
                vm.uvmexp.pdwoke += 1
                uvmpd_scan(vm)
                wakeup(vm.free_chan)
                with self._cv:
                    self.scanning = False
                    self._cv.notify_all()
                # no progress: the pages left are busy or wired; let their
                # owners run before we scan again
                backoff = vm.npages_free_low()
                continue
            del vm
            rwsleep(chan, lock, "pgdaemon", BACKOFF if backoff else IDLE_TIMEOUT, relock=False)
            backoff = False

    def statistics(self) -> PageDaemonStatistics:
        """The daemon's state and its counters (from uvmexp), read without a lock."""
        vm = self._vm()
        if vm is None:  # collected: the thread is gone, or about to go
            return PageDaemonStatistics(self.thread.is_alive(), False, 0, 0, 0, 0)
        exp = vm.uvmexp
        return PageDaemonStatistics(self.thread.is_alive(), self.scanning, vm.ra_wanted,
                                    exp.pdwoke, exp.pdfreed, exp.pdpageouts)


@dataclass(frozen=True)
class PageDaemonStatistics:
    """``PageDaemon.statistics()``: a snapshot (the counters are uvmexp's)."""

    running: bool  # its thread exists (it stops with the VM, or when the VM is collected)
    scanning: bool  # between a wakeup and the end of its pass
    ra_wanted: int  # pages read-ahead asked it to free, not yet served
    wakeups: int  # uvmexp.pdwoke
    freed: int  # uvmexp.pdfreed
    pageouts: int  # uvmexp.pdpageouts
