"""The cold path works per cluster (issue 10): the run forms of page
allocation, freeing and the pmap do what the per-page calls do, and a
cold scan of a file bigger than memory reads, maps and frees its pages a
cluster at a time."""

from __future__ import annotations

from helpers import PS, RW, machine, mkfile, pattern
from vnpager import VM
from vnpager.uvm.pmap import Pmap, pmap_enter, pmap_enter_run, pmap_extract, pmap_page_protect_run
from vnpager.uvm.uvm_fault import uvm_load
from vnpager.uvm.uvm_map import MAP_SHARED, uvm_map
from vnpager.uvm.uvm_page import (
    PG_BUSY,
    PG_FAKE,
    PG_TABLED,
    UVM_PGA_NORESERVE,
    uvm_page_unbusy,
    uvm_pagealloc_run,
    uvm_pagefree_run,
)
from vnpager.uvm.uvm_param import PROT_READ


def test_uvm_pagealloc_run_inserts_busy_fake_pages_at_consecutive_offsets() -> None:
    vm = machine(64)
    _, uvn = mkfile(vm, pattern(64))
    with uvn.vmobjlock:
        pgs = uvm_pagealloc_run(vm, uvn, 4 * PS, 8)
        assert [pg.offset for pg in pgs] == [(4 + i) * PS for i in range(8)]
        assert all(uvn.memt.get(pg.offset) is pg and pg.pg_flags & (PG_BUSY | PG_FAKE | PG_TABLED)
                   == PG_BUSY | PG_FAKE | PG_TABLED for pg in pgs)
        assert [pg.frame for pg in pgs] == list(range(8))  # in frame order, as uvm_pagealloc takes them
        uvm_page_unbusy(pgs)
        uvm_pagefree_run(pgs)
    vm.check_invariants()
    vm.close()


def test_uvm_pagealloc_run_without_reserve_stops_at_freemin() -> None:
    vm = machine(64)
    _, uvn = mkfile(vm, pattern(64))
    with uvn.vmobjlock:
        pgs = uvm_pagealloc_run(vm, uvn, 0, 64, UVM_PGA_NORESERVE)
        assert len(pgs) == 64 - vm.freemin and len(vm.page_free) == vm.freemin
        assert uvm_pagealloc_run(vm, uvn, 64 * PS, 1, UVM_PGA_NORESERVE) == []
        assert vm.uvmexp.allocfail == 0  # read-ahead cut short is no allocation failure
        uvm_page_unbusy(pgs)
        uvm_pagefree_run(pgs)
    vm.check_invariants()
    vm.close()


def test_uvm_pagefree_run_gives_frames_back_in_the_order_a_run_takes_them() -> None:
    """A run freed in frame order is allocated again in frame order, so
    that the next read's pages lie on consecutive frames (one TLB run)."""
    vm = machine(64)
    _, uvn = mkfile(vm, pattern(64))
    with uvn.vmobjlock:
        first = uvm_pagealloc_run(vm, uvn, 0, 16)
        uvm_page_unbusy(first)
        uvm_pagefree_run(first)
        again = uvm_pagealloc_run(vm, uvn, 0, 16)
        assert [pg.frame for pg in again] == [pg.frame for pg in first]
        uvm_page_unbusy(again)
        uvm_pagefree_run(again)
    vm.close()


def test_pmap_enter_run_keeps_a_translation_it_may_not_replace() -> None:
    vm = machine(64)
    _, uvn = mkfile(vm, pattern(64))
    with uvn.vmobjlock:
        pgs = uvm_pagealloc_run(vm, uvn, 0, 4)
        other = uvm_pagealloc_run(vm, uvn, 4 * PS, 1)
    pmap = Pmap(vm)
    pmap_enter(pmap, 2 * PS, other[0], PROT_READ)
    assert pmap_enter_run(pmap, 0, pgs, PROT_READ, replace=False) == 3
    assert [pmap_extract(pmap, i * PS) for i in range(4)] == [
        (pgs[0], PROT_READ), (pgs[1], PROT_READ), (other[0], PROT_READ), (pgs[3], PROT_READ)]
    assert pmap_enter_run(pmap, 0, pgs, RW) == 4 and pmap_extract(pmap, 2 * PS) == (pgs[2], RW)
    assert not other[0].pv and all(pg.pv for pg in pgs)
    pmap_page_protect_run([*pgs, *other], 0)
    assert not any(pmap_extract(pmap, i * PS) for i in range(4)) and not any(pg.pv for pg in pgs)
    with uvn.vmobjlock:
        uvm_page_unbusy([*pgs, *other])
        uvm_pagefree_run([*pgs, *other])
    vm.check_invariants()
    vm.close()


def test_a_cold_scan_bigger_than_memory_reads_its_windows_onto_consecutive_frames() -> None:
    """Past the first pass through memory, every page is a reused frame:
    the windows read then still lie mostly on consecutive frames, so that a
    64 KiB load of them is a TLB run or two (a copy each), not a run per
    page (before issue 10: 8 runs per load on average, 16 for many)."""
    data = pattern(250) * 5  # 1250 pages
    vm = VM(physmem=256 * PS)  # with its page daemon: the scan frees as it goes
    _, uvn = mkfile(vm, data)
    space = vm.vmspace
    va = uvm_map(space, len(data), uvn, 0, RW, RW, MAP_SHARED)
    chunk = 16 * PS
    tlb = space.pmap.pm_rtlb
    runs = []
    for off in range(0, len(data) - chunk + 1, chunk):
        assert uvm_load(space, va + off, chunk) == data[off:off + chunk]
        runs.append(len({id(tlb[v]) for v in range(va + off, va + off + chunk, PS) if v in tlb}))
    late = runs[len(runs) // 2:]
    assert sum(late) / len(late) <= 4
    vm.close()
