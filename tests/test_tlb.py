"""The pmap's TLB (issue 6 point 4): warm loads and stores go through runs
of cached translations, and everything that changes a mapping or clears a
ref/mod bit drops them, so that no access is served by a stale one and the
bits stay true."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import vnpager
from helpers import PS, RW, WAIT, contents, machine, mkfile, pattern
from vnpager import VM
from vnpager.kern.errors import SegvError
from vnpager.uvm.pmap import (
    Run,
    pmap_clear_modify,
    pmap_clear_reference,
    pmap_extract,
    pmap_is_modified,
    pmap_is_referenced,
    pmap_page_protect,
)
from vnpager.uvm.uvm_fault import uvm_fault, uvm_load, uvm_store
from vnpager.uvm.uvm_map import (
    MAP_PRIVATE,
    MAP_SHARED,
    MS_SYNC,
    Vmspace,
    uvm_map,
    uvm_map_protect,
    uvm_msync,
    uvm_unmap,
)
from vnpager.uvm.uvm_page import PG_CLEAN, VmPage
from vnpager.uvm.uvm_param import PROT_NONE, PROT_READ
from vnpager.vfs.vnode import Vnode

NPAGES = 8


def mapped(vm: VM) -> tuple[Vmspace, int, Vnode]:
    """A shared read-write mapping of a memfs file of NPAGES pattern pages."""
    vp, uvn = mkfile(vm, pattern(NPAGES))
    space = vm.vmspace
    return space, uvm_map(space, NPAGES * PS, uvn, 0, RW, RW, MAP_SHARED), vp


def page_at(space: Vmspace, va: int) -> VmPage:
    pte = pmap_extract(space.pmap, va)
    assert pte is not None
    return pte[0]


def test_a_load_after_the_reference_bit_is_cleared_sets_it_again() -> None:
    vm = machine()
    space, va, _ = mapped(vm)
    assert uvm_load(space, va + PS, 4) == b"\x02" * 4
    pg = page_at(space, va + PS)
    assert pmap_is_referenced(pg)
    faults = vm.uvmexp.faults
    for _ in range(3):  # the page daemon's second chance sees each reference
        pmap_clear_reference(pg)
        assert not pmap_is_referenced(pg)
        assert uvm_load(space, va + PS, 4) == b"\x02" * 4
        assert pmap_is_referenced(pg)
    assert vm.uvmexp.faults == faults  # still mapped: the MMU set it, no fault
    vm.close()


def test_a_store_after_a_flush_marks_the_page_modified_again() -> None:
    vm = machine()
    space, va, vp = mapped(vm)
    uvm_store(space, va, memoryview(b"one"))
    pg = page_at(space, va)
    assert pmap_is_modified(pg)
    assert uvm_msync(space, va, va + NPAGES * PS, MS_SYNC) == 0
    assert not pmap_is_modified(pg) and pg.pg_flags & PG_CLEAN
    faults = vm.uvmexp.faults
    uvm_store(space, va, memoryview(b"two"))  # the flush write-protected it: a fault
    assert vm.uvmexp.faults == faults + 1
    assert pmap_is_modified(pg)
    uvm_store(space, va + 3, memoryview(b"!"))  # writable again: through the TLB
    assert vm.uvmexp.faults == faults + 1
    assert uvm_msync(space, va, va + NPAGES * PS, MS_SYNC) == 0
    assert contents(vp)[:4] == b"two!"
    vm.close()


def test_each_way_of_lowering_a_page_drops_its_store_runs() -> None:
    """Write-protecting a page makes the next store fault; clearing its
    modified bit makes the next store set it again, fault or not."""
    vm = machine()
    space, va, _ = mapped(vm)
    uvm_store(space, va, memoryview(b"a"))
    pg = page_at(space, va)
    pmap_page_protect(pg, PROT_READ)
    faults = vm.uvmexp.faults
    uvm_store(space, va, memoryview(b"b"))
    assert vm.uvmexp.faults == faults + 1
    pmap_clear_modify(pg)
    uvm_store(space, va, memoryview(b"c"))
    assert pmap_is_modified(pg)
    assert uvm_load(space, va, 1) == b"c"
    vm.close()


def test_a_copy_on_write_replaces_the_page_loads_see() -> None:
    vm = machine()
    vp, uvn = mkfile(vm, pattern(NPAGES))
    space = vm.vmspace
    va = uvm_map(space, NPAGES * PS, uvn, 0, RW, RW, MAP_PRIVATE)
    assert uvm_load(space, va, 2) == b"\x01\x01"  # the file's page, read-only
    uvm_store(space, va, memoryview(b"p"))  # a page of the amap's now
    assert uvm_load(space, va, 2) == b"p\x01"
    assert contents(vp)[:2] == b"\x01\x01"
    vm.close()


def test_protect_makes_a_store_fault_and_unmap_a_load() -> None:
    vm = machine()
    space, va, _ = mapped(vm)
    uvm_store(space, va, memoryview(b"x"))
    assert uvm_load(space, va, 1) == b"x"
    uvm_map_protect(space, va, va + NPAGES * PS, PROT_READ)
    with pytest.raises(SegvError):
        uvm_store(space, va, memoryview(b"y"))
    assert uvm_load(space, va, 1) == b"x"
    uvm_map_protect(space, va, va + NPAGES * PS, PROT_NONE)
    with pytest.raises(SegvError):
        uvm_load(space, va, 1)
    uvm_unmap(space, va, va + NPAGES * PS)
    with pytest.raises(SegvError):
        uvm_load(space, va, 1)
    vm.close()


def test_page_protect_none_makes_the_next_access_fault() -> None:
    vm = machine()
    space, va, _ = mapped(vm)
    assert uvm_load(space, va, NPAGES * PS) == pattern(NPAGES)
    pg = page_at(space, va + 2 * PS)
    pmap_page_protect(pg, PROT_NONE)
    faults = vm.uvmexp.faults
    assert uvm_load(space, va, NPAGES * PS) == pattern(NPAGES)
    assert vm.uvmexp.faults == faults + 1
    vm.close()


def test_a_long_load_over_consecutive_frames_becomes_one_run() -> None:
    vm = machine()
    space, va, _ = mapped(vm)
    for i in range(NPAGES):  # one run per page at first
        assert uvm_load(space, va + i * PS, PS) == pattern(NPAGES)[i * PS:(i + 1) * PS]
    frames = [page_at(space, va + i * PS).frame for i in range(NPAGES)]
    assert frames == list(range(frames[0], frames[0] + NPAGES))
    assert uvm_load(space, va, NPAGES * PS) == pattern(NPAGES)
    assert len({id(space.pmap.pm_rtlb[va + i * PS]) for i in range(NPAGES)}) == 1
    assert uvm_load(space, va + 100, NPAGES * PS - 200) == pattern(NPAGES)[100:-100]
    vm.close()


def test_pages_the_page_daemon_evicts_are_never_read_through_stale_runs(tmp_path: Path) -> None:
    """Two threads scan two files each four times the VM, so the page
    daemon keeps freeing the pages of one and giving their frames to the
    other; every byte read must be the file's."""
    vm = VM(physmem=64 * PS)
    files = {tmp_path / "a": 0, tmp_path / "b": 128}  # page i holds fill + i
    for path, fill in files.items():
        path.write_bytes(b"".join(bytes([(fill + i) % 256]) * PS for i in range(256)))
    errors: list[BaseException] = []

    def scan(path: Path, fill: int) -> None:
        try:
            with open(path, "r+b") as f, vnpager.mmap(f.fileno(), 0, vm=vm) as m:
                for _ in range(3):
                    for i in range(0, 256, 3):
                        assert m[i * PS:i * PS + 64] == bytes([(fill + i) % 256]) * 64
                        assert m[i * PS + PS - 1] == (fill + i) % 256  # a second load: a TLB hit
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=scan, args=(p, fill)) for p, fill in files.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert vm.uvmexp.pdfreed > 0
    vm.check_invariants()
    vm.close()


def test_a_map_without_its_own_descriptor_still_notices_truncation(tmp_path: Path) -> None:
    """trackfd=False keeps no descriptor to lseek: the size check falls
    back to an fstat of the vnode's."""
    path = tmp_path / "f"
    path.write_bytes(pattern(4))
    vm = VM(physmem=64 * PS)
    with open(path, "r+b") as f:
        m = vnpager.mmap(f.fileno(), 0, vm=vm, trackfd=False)
        assert m[3 * PS] == 4
        os.truncate(path, PS)
        with pytest.raises(vnpager.BusError):
            m[3 * PS]
        m.close()
    vm.close()


class CountingTlb(dict[int, Run]):
    """A TLB that counts the keys written and deleted: the work the TLB does."""

    def __init__(self) -> None:
        super().__init__()
        self.work = 0

    def __setitem__(self, va: int, run: Run) -> None:
        self.work += 1
        super().__setitem__(va, run)

    def __delitem__(self, va: int) -> None:
        self.work += 1
        super().__delitem__(va)


@pytest.mark.parametrize("access", ["load", "store"])
def test_a_cold_scan_in_small_steps_costs_the_tlb_work_linear_in_its_pages(access: str) -> None:
    """A readline loop's accesses, 256 bytes every 200 (one in twenty
    crosses into the next page), over pages mapped ahead of it as
    read-ahead maps them.  Each crossing used to merge the run behind it,
    grown by a page each time, rewriting all its pages: about npages**2 / 2
    keys over the scan; now it is a few per page."""
    npages = 255  # as many as pattern() numbers
    data = pattern(npages)
    vm = machine(npages + 64)
    _, uvn = mkfile(vm, data)
    space = vm.vmspace
    va = uvm_map(space, npages * PS, uvn, 0, RW, RW, MAP_SHARED)
    load = access == "load"
    for i in range(npages):
        uvm_fault(space, va + i * PS, PROT_READ if load else RW)
    tlb = CountingTlb()
    if load:
        space.pmap.pm_rtlb = tlb
    else:
        space.pmap.pm_wtlb = tlb

    def touch(off: int, n: int) -> None:
        if load:
            assert uvm_load(space, va + off, n) == data[off:off + n]
        else:
            uvm_store(space, va + off, memoryview(data)[off:off + n])

    for off in range(0, npages * PS - 256, 200):
        touch(off, 256)
    frames = [page_at(space, va + i * PS).frame for i in range(npages)]
    assert frames == list(range(frames[0], frames[0] + npages))  # runs could span it all
    work = tlb.work
    assert work <= 4 * npages
    touch(0, npages * PS)  # an access over them all still joins them in one run
    assert len({id(tlb[va + i * PS]) for i in range(npages)}) == 1
    vm.close()
