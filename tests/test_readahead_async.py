"""Asynchronous read-ahead (uvm_readahead): a sequential reader of a
filesystem whose reads take no vnode lock (as objfs's) hands the next
window to the read-ahead daemon before it gets there, and reads no window
itself once the stream is under way; random access and MADV_RANDOM read
nothing ahead; the daemon's windows take free memory only, wait on the
inactive queue marked PG_READAHEAD until used, and are counted.

The filesystem's reads sleep (a round trip, without the GIL), so that the
daemon's reads are in flight while the reader works or waits: what is
asserted is who read what, and in which order, never how long it took."""

from __future__ import annotations

import random
import threading
import time

from helpers import PS, RW, getpages, machine, mkfile, pattern
from vnpager import VM
from vnpager.kern.lock import RW_WRITE
from vnpager.uvm.uvm_bio import ubc_read
from vnpager.uvm.uvm_fault import uvm_copyin
from vnpager.uvm.uvm_map import MADV_NORMAL, MADV_RANDOM, MADV_SEQUENTIAL, MAP_SHARED, uvm_map, uvm_map_advice
from vnpager.uvm.uvm_page import PG_READAHEAD, PQ_ACTIVE, PQ_INACTIVE, uvm_pagedeactivate_run
from vnpager.uvm.uvm_pdaemon import uvmpd_scan_inactive
from vnpager.uvm.uvm_readahead import RA_WINSIZE_MAX, uvm_ra_async, uvm_ra_next
from vnpager.uvm.uvm_vnode import UvmVnode
from vnpager.vfs.memfs import MemFS
from vnpager.vfs.vnode import Uio, Vnode

MAXWIN = RA_WINSIZE_MAX // PS
DELAY = 0.02  # seconds a read of SlowFS sleeps


class SlowFS(MemFS):
    """memfs whose reads take no vnode lock, as objfs's do, and sleep DELAY
    each; every read is recorded: (first page, pages, whether the reader's
    own thread made it, the page the reader was at when it began)."""

    name = "slowfs"
    unlocked_read = True

    def __init__(self) -> None:
        self.reads: list[tuple[int, int, bool, int]] = []
        self.reader = threading.current_thread()
        self.at = 0  # the page the test's reader reads next
        self._lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0

    def read(self, vp: Vnode, uio: Uio, ioflag: int) -> int:
        with self._lock:
            own = threading.current_thread() is self.reader
            self.reads.append((uio.offset // PS, -(-uio.resid // PS), own, self.at))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        time.sleep(DELAY)
        try:
            return super().read(vp, uio, ioflag)
        finally:
            with self._lock:
                self.in_flight -= 1

    def ahead(self) -> list[tuple[int, int, bool, int]]:
        return [r for r in self.reads if not r[2]]

    def own(self) -> list[tuple[int, int, bool, int]]:
        return [r for r in self.reads if r[2]]


def pages(npages: int, tail: int = 0) -> bytes:
    """A file of *npages* where page i is full of i % 251 + 1, and *tail* bytes."""
    return b"".join(bytes([i % 251 + 1]) * PS for i in range(npages)) + b"\xee" * tail


def slowfile(vm: VM, npages: int, tail: int = 0) -> tuple[SlowFS, UvmVnode, bytes]:
    fs = SlowFS()
    data = pages(npages, tail)
    _, uvn = mkfile(vm, data, mp=vm.vfs.mount(fs, f"slowfs{id(fs)}"))
    return fs, uvn, data


def check_stream(fs: SlowFS, npages: int) -> None:
    """Every page read once, none past the end; the reader read the first
    page and the first window itself, the daemon every later window, each
    begun before the reader reached it; two reads were in flight at once."""
    pages = sorted(p for first, n, _, _ in fs.reads for p in range(first, first + n))
    assert pages == list(range(npages))
    assert len(fs.own()) <= 2, fs.reads
    assert len(fs.ahead()) >= 4 and all(at < first for first, _, _, at in fs.ahead()), fs.reads
    assert fs.max_in_flight >= 2


def test_ubc_sequential_reader_keeps_the_next_window_in_flight() -> None:
    vm = machine(1024)
    fs, uvn, data = slowfile(vm, 512)
    got = []
    for off in range(0, len(data), 16 * PS):
        fs.at = off // PS
        got.append(ubc_read(uvn, 16 * PS, off))
    assert b"".join(got) == data
    check_stream(fs, 512)
    exp = vm.uvmexp
    assert exp.ra_async >= len(fs.ahead()) and exp.ra_async_dropped == 0
    assert exp.ra_async_pages == exp.ra_async_used == sum(n for _, n, _, _ in fs.ahead())
    vm.check_invariants()


def mapped(vm: VM, uvn: UvmVnode, npages: int, advice: int) -> int:
    va = uvm_map(vm.vmspace, npages * PS, uvn, 0, RW, RW, MAP_SHARED)
    uvm_map_advice(vm.vmspace, va, va + npages * PS, advice)
    return va


def scan(vm: VM, fs: SlowFS, va: int, npages: int) -> None:
    buf = memoryview(bytearray(PS))
    for i in range(npages):
        fs.at = i
        uvm_copyin(vm.vmspace, va + i * PS, buf)
        assert buf[0] == i % 251 + 1


def test_fault_sequential_scan_keeps_the_next_window_in_flight() -> None:
    vm = machine(1024)
    fs, uvn, _ = slowfile(vm, 200)
    scan(vm, fs, mapped(vm, uvn, 200, MADV_NORMAL), 200)
    check_stream(fs, 200)
    # one fault a window: a window read ahead is mapped whole, up to the next mark
    assert vm.uvmexp.faults == len(fs.reads)
    assert vm.uvmexp.ra_async_used == sum(n for _, n, _, _ in fs.ahead())
    vm.check_invariants()


def test_sequential_advice_reads_the_largest_windows_ahead() -> None:
    vm = machine(1024)
    fs, uvn, _ = slowfile(vm, 4 * MAXWIN)
    scan(vm, fs, mapped(vm, uvn, 4 * MAXWIN, MADV_SEQUENTIAL), 4 * MAXWIN)
    assert sorted((first, n) for first, n, _, _ in fs.reads) == [(i * MAXWIN, MAXWIN) for i in range(4)]
    assert len(fs.own()) == 1
    vm.check_invariants()


def test_random_access_and_random_advice_read_nothing_ahead() -> None:
    vm = machine(1024)
    fs, uvn, data = slowfile(vm, 256)
    for page in random.Random(1).sample(range(256), 24):
        assert ubc_read(uvn, 100, page * PS) == data[page * PS:page * PS + 100]
    va = mapped(vm, uvn, 256, MADV_RANDOM)
    scan(vm, fs, va, 64)
    assert vm.uvmexp.ra_async == 0 and not fs.ahead()
    assert all(n == 1 for first, n, _, _ in fs.reads if first < 64)  # MADV_RANDOM: the page alone
    vm.check_invariants()


def test_a_filesystem_with_locked_reads_reads_ahead_synchronously() -> None:
    vm = machine(1024)
    _, uvn = mkfile(vm, pages(256))
    for off in range(0, 256 * PS, 16 * PS):
        ubc_read(uvn, 16 * PS, off)
    assert vm.uvmexp.ra_async == 0 and vm.uvmexp.read_ios <= 256 // 16 + 4


def test_window_without_free_memory_is_dropped_and_read_by_the_reader() -> None:
    vm = machine(256)  # freemin 8, no page daemon: only what is free is free
    _, hog = mkfile(vm, pattern(244))
    getpages(hog, 0, 244)  # 12 free, 4 of them above freemin
    fs, uvn, data = slowfile(vm, 10)
    got = [ubc_read(uvn, 2 * PS, off) for off in range(0, 10 * PS, 2 * PS)]
    assert b"".join(got) == data
    exp = vm.uvmexp
    assert exp.ra_async > 0 and exp.ra_async_dropped > 0
    assert sorted(p for first, n, _, _ in fs.reads for p in range(first, first + n)) == list(range(10))
    assert exp.allocfail == 0 and all(pg.uobject is hog for pg in getpages(hog, 0, 244))
    vm.check_invariants()


def test_window_ahead_waits_inactive_and_marked_until_used() -> None:
    vm = machine(1024)
    fs, uvn, data = slowfile(vm, 64, tail=10)
    ra = uvn.u_ubc_ra
    ra.ra_winsize = 16
    uvn.vmobjlock.rw_enter(RW_WRITE)
    uvm_ra_next(ra, uvn, 40 * PS, MADV_NORMAL, 1 << 40)  # twice the window, cut at the object's end
    uvn.vmobjlock.rw_exit()
    assert ra.ra_async == (40 * PS, 65 * PS) and ra.ra_mark == 40 * PS
    uvm_ra_async(uvn, ra)
    assert vm.readahead.drain()
    pgs = uvn.pages_in(0, 65 * PS)
    assert [pg.offset // PS for pg in pgs] == list(range(40, 65)) and fs.reads[0][:2] == (40, 25)
    assert all(pg.pg_flags & PQ_INACTIVE and pg.pg_flags & PG_READAHEAD and not pg.pv for pg in pgs)
    assert ubc_read(uvn, 8 * PS, 40 * PS) == data[40 * PS:48 * PS]
    assert vm.uvmexp.ra_async_pages == 25 and vm.uvmexp.ra_async_used == 8
    assert sum(1 for pg in pgs if pg.pg_flags & PG_READAHEAD) == 17
    vm.check_invariants()


def test_page_daemon_gives_an_unused_page_read_ahead_one_more_pass() -> None:
    vm = machine(256)
    _, uvn = mkfile(vm, pattern(8))
    pgs = getpages(uvn, 0, 8)
    with uvn.vmobjlock, vm.pageqlock:
        for pg in pgs[:4]:
            pg.pg_flags |= PG_READAHEAD
        uvm_pagedeactivate_run(pgs)  # unreferenced, inactive
    assert uvmpd_scan_inactive(vm, 8) == 4  # the pages not read ahead
    kept = uvn.pages_in(0, 8 * PS)
    assert kept == pgs[:4] and all(pg.pg_flags & PQ_ACTIVE and not pg.pg_flags & PG_READAHEAD for pg in kept)
    with uvn.vmobjlock, vm.pageqlock:
        uvm_pagedeactivate_run(kept)
    assert uvmpd_scan_inactive(vm, 8) == 4  # the next pass frees them
    vm.check_invariants()
