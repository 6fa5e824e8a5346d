"""Memory pressure (issue 4, point 4): a VM of 8 pages, several vnpager.mmap
maps and a working set of ten thousand pages; several threads make progress,
with no deadlock among the page daemon, uvm_wait and busy pages."""

from __future__ import annotations

import random
import struct
import threading

from helpers import WAIT, start
from vnpager import MAP_PRIVATE, MAP_SHARED, VM
from vnpager.vfs.memfs import memfs_create

PS = 8192  # 8 pages of 8 KiB hold one 64 KiB cluster: the smallest VM there is
NFILES, FILE_PAGES = 4, 2500  # 10,000 pages in all
NTHREADS = 4
# a bound on the threads' run, not a measure: 10,000 faults with invariant
# checks took 38 to 46 s at a load of 9 to 11 on 2 cores (past the 30 s of WAIT)
RUN_WAIT = 4 * WAIT
STAMP = struct.Struct("<QQ")  # (file, page) at the start of each page


def _file_data(f: int) -> bytes:
    return b"".join(STAMP.pack(f, p).ljust(PS, b"\0") for p in range(FILE_PAGES))


def _my_pages(t: int) -> list[tuple[int, int]]:
    """(file, page) of thread *t*'s quarter of every file, in its random order."""
    pages = [(f, p) for f in range(NFILES) for p in range(t, FILE_PAGES, NTHREADS)]
    random.Random(t).shuffle(pages)
    return pages


def test_ten_thousand_pages_through_eight() -> None:
    with VM(physmem=8 * PS, page_size=PS) as vm:
        vps = [memfs_create(vm.vfs, vm.memfs, _file_data(f)) for f in range(NFILES)]
        size = FILE_PAGES * PS
        maps = [vm.map(vp, size, flags=MAP_PRIVATE if f == NFILES - 1 else MAP_SHARED)
                for f, vp in enumerate(vps)]

        def work(t: int) -> int:
            """Touch my quarter of every page once, in random order: check its
            stamp, and write my own slot in every third one."""
            pages = _my_pages(t)
            for n, (f, p) in enumerate(pages):
                off = p * PS
                assert STAMP.unpack(maps[f][off:off + STAMP.size]) == (f, p)
                if n % 3 == 0:
                    maps[f][off + 64 + 8 * t:off + 72 + 8 * t] = struct.pack("<Q", n)
            return len(pages)

        done = threading.Event()

        def flusher() -> int:
            """msync the shared maps meanwhile: its busy pages get in the way too."""
            rounds = 0
            while not done.is_set():
                for m in maps[:-1]:
                    m.flush()
                rounds += 1
            return rounds

        runners = [start(lambda t=t: work(t), f"pressure-{t}") for t in range(NTHREADS)]
        flushing = start(flusher, "flusher")
        try:
            assert sum(r.join_ok(RUN_WAIT) for r in runners) == NFILES * FILE_PAGES
        finally:
            done.set()
        assert flushing.join_ok() > 0
        assert vm.uvmexp.pageins >= NFILES * FILE_PAGES and vm.uvmexp.pdfreed > 0
        # what the threads wrote went through the daemon's write-backs and back
        for t in range(NTHREADS):
            for n, (f, p) in enumerate(_my_pages(t)[:300]):
                if n % 3 == 0:
                    got = maps[f][p * PS + 64 + 8 * t:p * PS + 72 + 8 * t]
                    assert struct.unpack("<Q", got)[0] == n
        for m in maps:
            m.close()
        for vp in vps:
            vm.vfs.vrele(vp)
        vm.check_invariants()
