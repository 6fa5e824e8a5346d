"""Read-ahead makes room for its window (uvm_ra_reserve): a sequential
scan of a file bigger than memory reads whole windows, not what the page
daemon happened to free before the reader came back for more."""

from __future__ import annotations

from helpers import PS, RW, getpages, mkfile, pattern, progfs, store
from vnpager import VM
from vnpager.uvm.pmap import Pmap
from vnpager.uvm.uvm_fault import uvm_load
from vnpager.uvm.uvm_map import MAP_SHARED, uvm_map

NPAGES = 1024  # four times the VM


def test_a_scan_of_a_file_four_times_memory_reads_a_call_per_16_pages_or_fewer() -> None:
    vm = VM(physmem=NPAGES // 4 * PS)
    try:
        _, hot = mkfile(vm, pattern(16))
        hot_pgs = getpages(hot, 0, 16)
        pm = Pmap(vm)
        fs, mp = progfs(vm)
        data = bytes(range(256)) * (NPAGES * PS // 256)
        _, uvn = mkfile(vm, data, mp=mp)
        va = uvm_map(vm.vmspace, NPAGES * PS, uvn, 0, RW, RW, MAP_SHARED)
        for off in range(0, NPAGES * PS, 16 * PS):
            assert uvm_load(vm.vmspace, va + off, 16 * PS) == data[off:off + 16 * PS]
            for pg in hot_pgs:  # a hot set in use all along
                store(pm, pg, b"x")
        reads = [n for op, _, n in fs.calls if op == "read"]
        assert sum(reads) == NPAGES * PS
        assert len(reads) <= NPAGES // 16
        # making room never pushed out a page in active use
        assert all(pg.uobject is hot for pg in hot_pgs)
    finally:
        vm.close()
    vm.check_invariants()
