"""The page daemon's scans change a page's flags only under its object's
lock (tried, never waited for), as every other writer of pg_flags does,
and an inactive scan does the pageouts its target needs, no more."""

from __future__ import annotations

import dataclasses
import threading

from helpers import Gate, ProgFS, dirty_progfs, flush, getpages, machine, mkfile, pattern
from vnpager import VM
from vnpager.uvm.uvm_object import UvmObject
from vnpager.uvm.uvm_page import PG_BUSY, PG_CLEAN, PQ_ACTIVE, PQ_INACTIVE, VmPage
from vnpager.uvm.uvm_pager import PGO_ALLPAGES, PGO_DEACTIVATE, VM_PAGER_AGAIN, VM_PAGER_PEND
from vnpager.uvm.uvm_param import MAXBSIZE
from vnpager.uvm.uvm_pdaemon import uvmpd_scan_active, uvmpd_scan_inactive
from vnpager.uvm.uvm_vnode import UvmVnode

CLUSTER = MAXBSIZE // 4096  # pages of one pageout


def test_uvmpd_scan_active_leaves_the_pages_of_an_object_locked_by_another_thread() -> None:
    vm = machine(64)
    _, uvn = mkfile(vm, pattern(8))
    pgs = getpages(uvn, 0, 8)
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with uvn.vmobjlock:
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder, name="holder", daemon=True)
    t.start()
    try:
        assert held.wait(30)
        uvmpd_scan_active(vm, len(pgs))
        assert all(pg.pg_flags & PQ_ACTIVE for pg in pgs)
    finally:
        release.set()
        t.join(30)
    assert not t.is_alive()
    uvmpd_scan_active(vm, len(pgs))  # unlocked now: the scan takes them
    assert all(pg.pg_flags & PQ_INACTIVE for pg in pgs)
    vm.check_invariants()
    vm.close()


def _dirty_inactive(vm: VM, npages: int) -> tuple[ProgFS, UvmVnode, list[VmPage]]:
    """A progfs file of *npages* pages, all dirty and inactive."""
    fs, _, uvn, pgs = dirty_progfs(vm, npages, tuple(range(npages)))
    flush(uvn, 0, 0, PGO_DEACTIVATE | PGO_ALLPAGES)
    assert all(pg.pg_flags & PQ_INACTIVE and not pg.pg_flags & PG_CLEAN for pg in pgs)
    return fs, uvn, pgs


def _count_puts(uvn: UvmVnode) -> list[int]:
    """Spy on the object's pgo_put: the list grows by its result at each call."""
    results: list[int] = []
    put = uvn.pgops.pgo_put

    def spy(uobj: UvmObject, pps: list[VmPage], npages: int, flags: int) -> int:
        results.append(put(uobj, pps, npages, flags))
        return results[-1]

    uvn.pgops = dataclasses.replace(uvn.pgops, pgo_put=spy)
    return results


def test_an_inactive_scan_counts_the_pages_it_writes_toward_its_target() -> None:
    """A scan for one cluster's worth of pages starts one pageout and
    stops, not a pageout for every dirty page of the queue (each object's
    lock held for the whole walk: a writer to the file waited for it)."""
    vm = machine(256)
    fs, uvn, pgs = _dirty_inactive(vm, 64)
    gate = Gate("write")
    fs.hooks.append(gate)
    puts = _count_puts(uvn)
    try:
        assert uvmpd_scan_inactive(vm, CLUSTER) == 0  # nothing freed yet: it is being written
        gate.wait_entered()
        assert puts == [VM_PAGER_PEND]
        assert sum(1 for pg in pgs if pg.pg_flags & PG_BUSY) == CLUSTER
    finally:
        gate.open()
    vm.aiodaemon.drain()
    assert uvmpd_scan_inactive(vm, CLUSTER) == CLUSTER  # the next scan frees them
    vm.check_invariants()
    vm.close()


def test_an_inactive_scan_tries_no_more_pageouts_once_the_pager_map_is_full() -> None:
    vm = machine(256, pager_map_slots=1)
    fs, uvn, pgs = _dirty_inactive(vm, 64)
    gate = Gate("write")
    fs.hooks.append(gate)
    puts = _count_puts(uvn)
    try:
        uvmpd_scan_inactive(vm, CLUSTER)
        gate.wait_entered()  # the one slot is taken until the write is done
        assert uvmpd_scan_inactive(vm, 3 * CLUSTER) == 0
        assert puts == [VM_PAGER_PEND, VM_PAGER_AGAIN]  # not one failed put per dirty page
        assert sum(1 for pg in pgs if pg.pg_flags & PG_BUSY) == CLUSTER
    finally:
        gate.open()
    vm.aiodaemon.drain()
    vm.check_invariants()
    vm.close()
