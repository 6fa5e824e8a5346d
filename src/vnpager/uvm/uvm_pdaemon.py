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
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vnpager.kern.lock import RW_NOSLEEP, RW_WRITE, fork_gate
from vnpager.kern.synch import rwsleep, wakeup
from vnpager.uvm.pmap import (
    pmap_clear_modify,
    pmap_clear_reference,
    pmap_is_modified,
    pmap_is_referenced,
    pmap_page_protect,
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
    uvm_pagedeactivate,
    uvm_pagefree,
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

IDLE_TIMEOUT = 1.0  # seconds between checks that the VM still exists
BACKOFF = 0.005  # seconds to wait after a scan that could not free enough


def uvmpd_targets(vm: VM) -> tuple[int, int]:
    """(freetarg, inactarg): free pages to reach, inactive pages to keep."""
    freetarg = vm.freemin * 4 // 3 + 1
    inactarg = max((len(vm.page_active) + len(vm.page_inactive)) // 3, freetarg)
    return freetarg, inactarg


def uvmpd_scan_inactive(vm: VM, shortage: int, clean_only: bool = False) -> int:
    """Free up to *shortage* pages from the inactive queue; return how many.

    With *clean_only* (read-ahead making room, uvm_ra_reserve) dirty pages
    are left as they are, unwritten, and those already known dirty are not
    even looked at: a queue of dirty anonymous pages would otherwise cost
    every read-ahead a lock and an unmap per page.  => caller holds no lock.
    """
    with vm.pageqlock:
        candidates = list(vm.page_inactive)
    freed = 0
    for pg in candidates:
        if freed >= shortage:
            break
        if clean_only and not pg.pg_flags & PG_CLEAN:  # read without the lock: a hint
            continue
        freed += _reclaim(vm, pg, clean_only)
    return freed


def _reclaim(vm: VM, pg: VmPage, clean_only: bool) -> int:
    """Try to free one inactive page; return the pages freed (0 or 1)."""
    uobj = pg.uobject
    if uobj is None or not uobj.vmobjlock.rw_enter(RW_WRITE | RW_NOSLEEP):
        return 0
    try:
        if pg.uobject is not uobj or pg.pg_flags & (PG_BUSY | PQ_ACTIVE) or not pg.pg_flags & PQ_INACTIVE:
            return 0  # changed hands or state since we listed it
        if pmap_is_referenced(pg):
            with vm.pageqlock:  # second chance
                uvm_pageactivate(pg)
            return 0
        pmap_page_protect(pg, PROT_NONE)
        if pg.pg_flags & PG_CLEAN and pmap_is_modified(pg):
            pg.pg_flags &= ~PG_CLEAN
        if not pg.pg_flags & PG_CLEAN:
            if clean_only:
                return 0  # unmapped, still dirty: the next access refaults it, no I/O
            pg.pg_flags |= PG_BUSY
            UVM_PAGE_OWN(pg, "pdaemon")
            pmap_page_protect(pg, PROT_READ)
            # ALLPAGES: the cluster may take any dirty inactive neighbour
            result, _ = uvm_pager_put(uobj, pg, MAXBSIZE // vm.page_size,
                                      PGO_ALLPAGES | PGO_PDFREECLUST, 0, 0)
            if result == VM_PAGER_PEND:
                # the daemon never waits for a write: aiodone cleans the
                # pages and wakes us, and a later scan frees them
                vm.uvmexp.pdpageouts += 1
                return 0
            _unbusy(pg)
            if result == VM_PAGER_AGAIN:  # no pager map just now: next scan
                return 0
            if result != VM_PAGER_OK:
                with vm.pageqlock:  # keep it dirty; uvn_io recorded the error
                    uvm_pageactivate(pg)
                return 0
            pg.pg_flags |= PG_CLEAN
            pmap_clear_modify(pg)
            vm.uvmexp.pdpageouts += 1
            if pmap_is_referenced(pg) or pg.pv:
                return 0  # touched while we wrote it
        with vm.pageqlock:
            uvm_pagefree(pg)
        vm.uvmexp.pdfreed += 1
        return 1
    finally:
        uobj.vmobjlock.rw_exit()


def _unbusy(pg: VmPage) -> None:
    if pg.pg_flags & PG_WANTED:
        wakeup(pg)
    pg.pg_flags &= ~(PG_BUSY | PG_WANTED)
    UVM_PAGE_OWN(pg, None)


def uvmpd_scan_active(vm: VM, want: int) -> None:
    """Move up to *want* of the oldest active pages to the inactive queue."""
    with vm.pageqlock:
        candidates = list(vm.page_active)[: want * 2]
    moved = 0
    for pg in candidates:
        if moved >= want:
            break
        with vm.pageqlock:
            if not pg.pg_flags & PQ_ACTIVE or pg.pg_flags & PG_BUSY:
                continue
            if pmap_clear_reference(pg):
                uvm_pageactivate(pg)  # used lately: to the tail
                continue
        pmap_page_protect(pg, PROT_NONE)
        with vm.pageqlock:
            if pg.pg_flags & PQ_ACTIVE:
                uvm_pagedeactivate(pg)
                moved += 1


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
