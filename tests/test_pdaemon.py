"""The page daemon's scans change a page's flags only under its object's
lock (tried, never waited for), as every other writer of pg_flags does."""

from __future__ import annotations

import threading

from helpers import getpages, machine, mkfile, pattern
from vnpager.uvm.uvm_page import PQ_ACTIVE, PQ_INACTIVE
from vnpager.uvm.uvm_pdaemon import uvmpd_scan_active


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
