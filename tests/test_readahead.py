"""Multi-page reads (uvn_get's runs) and read-ahead from advice: the count
of read calls for scans under each advice, WILLNEED, DONTNEED, and
read-ahead under memory pressure.  Every VM here has no page daemon, so
what is free is what the test left free."""

from __future__ import annotations

import errno
from pathlib import Path

from helpers import PS, RW, getpages, machine, mkfile, pattern, progfs, store, unbusy
from vnpager import VM
from vnpager.kern.lock import RW_WRITE
from vnpager.uvm.pmap import Pmap
from vnpager.uvm.uvm_fault import uvm_copyin, uvm_copyout
from vnpager.uvm.uvm_map import (
    MADV_DONTNEED,
    MADV_NORMAL,
    MADV_RANDOM,
    MADV_SEQUENTIAL,
    MADV_WILLNEED,
    MAP_SHARED,
    uvm_map,
    uvm_map_advice,
)
from vnpager.uvm.uvm_page import PG_BUSY, PG_CLEAN, PQ_ACTIVE, PQ_INACTIVE, VmPage
from vnpager.uvm.uvm_pager import (
    PGO_ALLPAGES,
    PGO_DONTCARE,
    PGO_NOSLEEPALLOC,
    VM_PAGER_AGAIN,
    VM_PAGER_ERROR,
    VM_PAGER_OK,
    PageSlot,
)
from vnpager.uvm.uvm_param import PROT_READ
from vnpager.uvm.uvm_readahead import RA_WINSIZE_INIT, RA_WINSIZE_MAX
from vnpager.uvm.uvm_vnode import UvmVnode, uvn_get

MAXWIN = RA_WINSIZE_MAX // PS


def get(uvn: UvmVnode, offset: int, pps: list[PageSlot], centeridx: int = 0,
        flags: int = 0) -> int:
    """uvn_get's unlocked pass; the pages it gives are unbusied after."""
    uvn.vmobjlock.rw_enter(RW_WRITE)
    result, _ = uvn_get(uvn, offset, pps, len(pps), centeridx, PROT_READ, 0, flags)
    unbusy(uvn, [pg for pg in pps if isinstance(pg, VmPage)])
    return result


def pages(npages: int) -> bytes:
    """A file of *npages* where page i is full of i % 251 + 1."""
    return b"".join(bytes([i % 251 + 1]) * PS for i in range(npages))


def read_sizes(calls: list[tuple[str, int, int]]) -> list[int]:
    """The pages of each read call a ProgFS saw."""
    return [n // PS for op, _, n in calls if op == "read"]


# ---------------------------------------------------------------- uvn_get's runs

def test_run_reads_window_in_one_call_and_stops_at_resident_page(vm: VM) -> None:
    fs, mp = progfs(vm)
    _, uvn = mkfile(vm, pattern(8), mp=mp)
    getpages(uvn, 5 * PS, 1)
    fs.calls.clear()
    pps: list[PageSlot] = [None] * 8
    assert get(uvn, 0, pps) == VM_PAGER_OK
    assert [isinstance(pg, VmPage) for pg in pps] == [True] * 5 + [False] * 3
    assert read_sizes(fs.calls) == [5]
    assert all(bytes(pg.data[:1]) == bytes([i + 1]) for i, pg in enumerate(pps[:5]))  # type: ignore[union-attr]


def test_run_stops_at_dontcare_slot(vm: VM) -> None:
    _, uvn = mkfile(vm, pattern(4))
    pps: list[PageSlot] = [None, None, PGO_DONTCARE, None]
    assert get(uvn, 0, pps) == VM_PAGER_OK
    assert pps[1] is not None and pps[2] is PGO_DONTCARE and pps[3] is None
    assert uvn.uo_npages == 2 and vm.uvmexp.read_ios == 1


def test_run_never_reads_past_the_last_page_of_the_file(vm: VM) -> None:
    _, uvn = mkfile(vm, pattern(2, tail=100))  # 2 pages and a bit
    pps: list[PageSlot] = [None] * 8
    assert get(uvn, 0, pps) == VM_PAGER_OK
    assert uvn.uo_npages == 3 and pps[3:] == [None] * 5
    assert bytes(pps[2].data[:101]) == b"\xee" * 100 + b"\0"  # type: ignore[union-attr]


def test_run_is_maxbsize_unless_the_window_is_larger(vm: VM) -> None:
    fs, mp = progfs(vm)
    _, uvn = mkfile(vm, pattern(40), mp=mp)
    # every page wanted, center last: no window, so runs of MAXBSIZE (16 pages)
    assert get(uvn, 0, [None] * 40, centeridx=39, flags=PGO_ALLPAGES) == VM_PAGER_OK
    assert read_sizes(fs.calls) == [16, 16, 8]
    _, other = mkfile(vm, pattern(20), mp=mp)
    fs.calls.clear()
    assert get(other, 0, [None] * 20) == VM_PAGER_OK  # a window of 20 pages from the center
    assert read_sizes(fs.calls) == [20]


def test_run_shortens_instead_of_sleeping_for_memory() -> None:
    small = machine(64)  # freemin 2
    _, hog = mkfile(small, pattern(60))
    getpages(hog, 0, 60)  # 4 pages free
    _, uvn = mkfile(small, pattern(8))
    pps: list[PageSlot] = [None] * 8
    assert get(uvn, 0, pps) == VM_PAGER_OK  # the center, and one page above freemin
    assert uvn.uo_npages == 2 and len(small.page_free) == small.freemin
    small.check_invariants()


def test_nosleepalloc_takes_no_reserve_and_gives_again() -> None:
    small = machine(64)
    _, hog = mkfile(small, pattern(62))
    getpages(hog, 0, 62)  # 2 pages free: the reserve
    _, uvn = mkfile(small, pattern(4))
    assert get(uvn, 0, [None] * 4, flags=PGO_NOSLEEPALLOC) == VM_PAGER_AGAIN
    assert uvn.uo_npages == 0 and not uvn.vmobjlock.rw_lock_held()
    small.check_invariants()


def test_failed_read_frees_the_whole_run(vm: VM) -> None:
    fs, mp = progfs(vm)
    _, uvn = mkfile(vm, pattern(8), mp=mp)
    fs.fail["read"] = errno.EIO
    free = len(vm.page_free)
    pps: list[PageSlot] = [None] * 8
    assert get(uvn, 0, pps) == VM_PAGER_ERROR
    assert pps == [None] * 8 and uvn.uo_npages == 0 and len(vm.page_free) == free


# ---------------------------------------------------------------- faults, by advice

def mapped(vm: VM, npages: int, advice: int = MADV_NORMAL, **kw: object) -> tuple[int, UvmVnode, list]:
    """A file of *npages* on a ProgFS, mapped shared with *advice*."""
    fs, mp = progfs(vm)
    _, uvn = mkfile(vm, pages(npages), mp=mp, **kw)  # type: ignore[arg-type]
    va = uvm_map(vm.vmspace, npages * PS, uvn, 0, RW, RW, MAP_SHARED)
    uvm_map_advice(vm.vmspace, va, va + npages * PS, advice)
    return va, uvn, fs.calls


def scan(vm: VM, va: int, npages: int, first: int = 0) -> None:
    """Read pages [first, first + npages) of the mapping at *va*, checking each."""
    buf = memoryview(bytearray(PS))
    for i in range(first, first + npages):
        uvm_copyin(vm.vmspace, va + i * PS, buf)
        assert buf[0] == i % 251 + 1


def test_normal_sequential_scan_ramps_up_the_window() -> None:
    vm = machine(1024)
    va, _, calls = mapped(vm, 512)
    scan(vm, va, 512)
    sizes = read_sizes(calls)
    init = RA_WINSIZE_INIT // PS
    # the first fault is not yet a stream; then init, doubling up to the largest
    assert sizes[:3] == [1, init, 2 * init] and max(sizes) == MAXWIN
    assert sum(sizes) == 512 and vm.uvmexp.pageins == 512
    assert len(sizes) <= 512 // 16 + 4
    assert vm.uvmexp.faults == len(sizes)  # the pages read ahead were mapped on the way
    vm.check_invariants()


def test_normal_random_faults_read_only_what_faults() -> None:
    vm = machine(256)
    va, _, calls = mapped(vm, 128)
    buf = memoryview(bytearray(1))
    for page in (100, 3, 50, 20, 77, 9):
        uvm_copyin(vm.vmspace, va + page * PS, buf)
    assert read_sizes(calls) == [1] * 6


def test_random_advice_reads_one_page_per_fault() -> None:
    vm = machine(256)
    va, _, calls = mapped(vm, 64, MADV_RANDOM)
    scan(vm, va, 64)
    assert read_sizes(calls) == [1] * 64 and vm.uvmexp.faults == 64


def test_sequential_advice_reads_largest_window_and_deactivates_behind() -> None:
    vm = machine(1024)
    va, uvn, calls = mapped(vm, 512, MADV_SEQUENTIAL)
    scan(vm, va, 512)
    assert read_sizes(calls) == [MAXWIN] * (512 // MAXWIN)
    pages = uvn.pages_in(0, 512 * PS)
    active = [pg for pg in pages if pg.pg_flags & PQ_ACTIVE]
    # only the window the scan is in stays active; all behind it is inactive
    assert len(active) <= MAXWIN and all(pg.offset >= (512 - MAXWIN) * PS for pg in active)
    assert sum(1 for pg in pages if pg.pg_flags & PQ_INACTIVE) >= 512 - MAXWIN
    vm.check_invariants()


def test_sequential_scan_bigger_than_memory_leaves_active_pages_resident(tmp_path: Path) -> None:
    """A file 4 times the VM scanned with MADV_SEQUENTIAL: the page daemon
    reclaims the pages behind the scan, never the hot set in active use."""
    vm = VM(physmem=256 * PS)
    try:
        _, hot = mkfile(vm, pattern(32))
        hot_pgs = getpages(hot, 0, 32)
        pm = Pmap(vm)
        va, _, calls = mapped(vm, 1024, MADV_SEQUENTIAL)
        buf = memoryview(bytearray(PS))
        for i in range(1024):
            uvm_copyin(vm.vmspace, va + i * PS, buf)
            if i % 16 == 0:  # the hot set is used all along
                for pg in hot_pgs:
                    store(pm, pg, b"x")
        assert all(pg.uobject is hot for pg in hot_pgs), "a page in active use was pushed out"
        # how much the daemon frees ahead of the scan depends on the threads'
        # timing (see the bench): the read calls are still fewer than the pages
        assert len(read_sizes(calls)) <= 1024 // 2
    finally:
        vm.close()
    vm.check_invariants()


def test_read_ahead_uses_free_pages_only_when_memory_is_short() -> None:
    vm = machine(256)  # freemin 8
    _, hot = mkfile(vm, pattern(240))
    hot_pgs = getpages(hot, 0, 240)
    assert len(vm.page_free) == 16
    va, _, calls = mapped(vm, 64, size=64 * PS)
    scan(vm, va, 16)
    sizes = read_sizes(calls)
    # read-ahead took the pages above freemin, then the faults read one page each
    assert sum(sizes) == 16 and sizes[-1] == 1 and len(vm.page_free) == 0
    assert all(pg.uobject is hot and pg.pg_flags & PQ_ACTIVE for pg in hot_pgs)
    assert vm.uvmexp.allocfail == 0 and vm.uvmexp.waits == 0
    vm.check_invariants()


# ---------------------------------------------------------------- WILLNEED, DONTNEED

def test_willneed_reads_the_range_in_the_background_without_faults() -> None:
    vm = machine(256)
    va, uvn, calls = mapped(vm, 128)
    uvm_map_advice(vm.vmspace, va + 16 * PS, va + 112 * PS, MADV_WILLNEED)
    assert vm.readahead.drain()
    assert sorted(pg.offset // PS for pg in uvn.pages_in(0, 128 * PS)) == list(range(16, 112))
    assert vm.uvmexp.faults == 0 and len(read_sizes(calls)) <= 96 // 16
    assert all(pg.pg_flags & PQ_INACTIVE for pg in uvn.pages_in(0, 128 * PS))
    reads = vm.uvmexp.read_ios
    scan(vm, va, 96, first=16)  # faults map them, and read nothing
    assert vm.uvmexp.read_ios == reads
    assert uvn.uo_refs == 1  # the daemon dropped its reference
    vm.check_invariants()


def test_willneed_takes_no_reserved_memory() -> None:
    vm = machine(64)  # freemin 2
    _, hog = mkfile(vm, pattern(56))
    getpages(hog, 0, 56)
    va, uvn, _ = mapped(vm, 32)
    uvm_map_advice(vm.vmspace, va, va + 32 * PS, MADV_WILLNEED)
    assert vm.readahead.drain()
    assert uvn.uo_npages == 6 and len(vm.page_free) == vm.freemin
    vm.check_invariants()


def test_dontneed_frees_clean_pages_and_deactivates_dirty_ones() -> None:
    vm = machine(256)
    va, uvn, _ = mapped(vm, 32)
    scan(vm, va, 32)
    uvm_copyout(vm.vmspace, memoryview(b"dirty"), va + 5 * PS)
    free = len(vm.page_free)
    uvm_map_advice(vm.vmspace, va, va + 32 * PS, MADV_DONTNEED)
    [pg] = uvn.pages_in(0, 32 * PS)
    assert pg.offset == 5 * PS and pg.pg_flags & PQ_INACTIVE and not pg.pg_flags & (PG_CLEAN | PG_BUSY)
    assert len(vm.page_free) == free + 31
    buf = memoryview(bytearray(5))
    uvm_copyin(vm.vmspace, va + 5 * PS, buf)
    assert bytes(buf) == b"dirty"
    vm.check_invariants()


# ---------------------------------------------------------------- UBC

def test_ubc_sequential_reads_take_one_call_per_window(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(pages(256))
    vm = machine(512)
    try:
        for off in range(0, 256 * PS, PS):  # page by page: read-ahead must do the grouping
            assert vm.pread(path, PS, off)[:1] == bytes([off // PS % 251 + 1])
        assert vm.uvmexp.pageins == 256 and vm.uvmexp.read_ios <= 256 // 16 + 4
    finally:
        vm.close()
