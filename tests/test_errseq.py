"""The write-error promise at the pager level (issue 4, point 2).

A failed write-back keeps the page dirty and is recorded on the object,
whoever wrote (a flush, sync, the page daemon); each mapping open when it
happened is told once, through its errseq cursor; once the fault clears a
flush writes the data.  A read error surfaces as OSError on the access
that needed the page, and the mapping stays usable.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import vnpager
from rel_helpers import PS, Mapping, faulty_mount, map_host
from vnpager import VM
from vnpager.kern.errors import BusError
from vnpager.uvm.uvm_map import uvm_unmap
from vnpager.uvm.uvm_vnode import uvm_vnp_sync
from vnpager.vfs.faultfs import FaultPlan
from vnpager.vfs.memfs import memfs_create


@pytest.fixture
def plan() -> FaultPlan:
    return FaultPlan(seed=4)


def _file(tmp_path: Path, npages: int, fill: bytes = b".") -> Path:
    path = tmp_path / "f"
    path.write_bytes(fill * (npages * PS))
    return path


def test_each_mapping_open_is_told_once(vm: VM, plan: FaultPlan, tmp_path: Path) -> None:
    path = _file(tmp_path, 4)
    mp = faulty_mount(vm, plan)
    a, b = map_host(vm, mp, path), map_host(vm, mp, path)
    a.write(PS, b"hello")
    plan.fail("write", errno.ENOSPC, times=1)

    assert a.sync() == errno.ENOSPC
    assert path.read_bytes()[PS:PS + 5] == b"....."  # kept dirty, not lost
    assert a.read(PS, 5) == b"hello"
    assert a.sync() == 0  # the fault is gone: written, and a was told already
    assert path.read_bytes()[PS:PS + 5] == b"hello"

    c = map_host(vm, mp, path)  # mapped after a saw the error: not told
    assert b.sync() == errno.ENOSPC  # open when it happened: told once
    assert b.sync() == 0
    assert c.sync() == 0
    assert a.uobj.u_errseq == 1  # one failed write, recorded once (by uvn_io, not again by flush)
    for m in (a, b, c):
        assert m.close() == 0


def test_page_daemon_write_error_is_recorded(plan: FaultPlan, tmp_path: Path) -> None:
    with VM(physmem=16 * PS) as vm:
        path = _file(tmp_path, 8)
        m = map_host(vm, faulty_mount(vm, plan), path)
        data = os.urandom(8 * PS)
        m.write(0, data)
        plan.fail("write", errno.EIO)
        # another mapping's reads push the dirty pages out: the daemon tries
        other = Mapping(vm, memfs_create(vm.vfs, vm.memfs, size=64 * PS), 64 * PS)
        for i in range(64 * 8):
            if vm.uvmexp.write_errors:
                break
            other.read(i % 64 * PS, 1)
        # the daemon's pageouts failed (asynchronously): nothing reached the
        # file, and the pages are still dirty in memory
        vm.aiodaemon.drain()
        assert vm.uvmexp.write_errors and vm.uvmexp.pdpageouts
        assert path.read_bytes() != data
        assert m.read(0, len(data)) == data

        assert m.sync() == errno.EIO
        plan.clear()
        assert m.sync() == 0
        assert path.read_bytes() == data
        assert m.close() == 0 and other.close() == 0
        vm.check_invariants()


def test_an_error_nobody_saw_goes_to_the_next_mapping(vm: VM, plan: FaultPlan, tmp_path: Path) -> None:
    path = _file(tmp_path, 2)
    mp = faulty_mount(vm, plan)
    a = map_host(vm, mp, path)
    a.write(0, b"unseen")
    uvm_unmap(a.space, a.va, a.va + 2 * PS)  # no flush: the page stays dirty in the object
    plan.fail("write", errno.EIO, times=1)
    uvm_vnp_sync(vm)  # fails, and no mapping is open to be told

    b = map_host(vm, mp, path)
    assert b.sync() == errno.EIO  # so the next one is
    assert b.sync() == 0
    assert map_host(vm, mp, path).close() == 0  # told once: not to the one after
    assert path.read_bytes()[:6] == b"unseen"
    assert b.close() == 0


def test_read_error_surfaces_and_the_mapping_stays_usable(vm: VM, plan: FaultPlan,
                                                          tmp_path: Path) -> None:
    path = _file(tmp_path, 4, b"r")
    m = map_host(vm, faulty_mount(vm, plan), path)
    plan.fail("read", errno.EIO, offsets=range(2 * PS, 3 * PS))
    assert m.read(0, PS) == b"r" * PS
    with pytest.raises(OSError) as exc:
        m.read(2 * PS + 10, 10)
    assert exc.value.errno == errno.EIO and not isinstance(exc.value, BusError)
    with pytest.raises(OSError):
        m.write(2 * PS, b"w")  # a write needs the page read first
    assert m.read(3 * PS, PS) == b"r" * PS  # its neighbours are fine

    plan.clear()
    assert m.read(2 * PS, PS) == b"r" * PS
    m.write(2 * PS, b"w")
    assert m.close() == 0
    assert path.read_bytes()[2 * PS:2 * PS + 2] == b"wr"


def _faulty_mmap_vm(vm: VM, plan: FaultPlan) -> None:
    """Make vnpager.mmap of host files on *vm* go through *plan*."""
    vm.hostfs = faulty_mount(vm, plan)


def test_mmap_flush_raises_the_write_back_error(vm: VM, plan: FaultPlan, tmp_path: Path) -> None:
    path = _file(tmp_path, 2)
    _faulty_mmap_vm(vm, plan)
    with open(path, "r+b") as f, vnpager.mmap(f.fileno(), 0, vm=vm) as m:
        m[:5] = b"hello"
        plan.fail("write", errno.ENOSPC)
        with pytest.raises(OSError) as exc:
            m.flush()
        assert exc.value.errno == errno.ENOSPC
        assert m[:5] == b"hello"
        plan.clear()
        m.flush()
    assert path.read_bytes()[:5] == b"hello"


def test_mmap_every_map_open_is_told_once(vm: VM, plan: FaultPlan, tmp_path: Path) -> None:
    path = _file(tmp_path, 2)
    _faulty_mmap_vm(vm, plan)
    with open(path, "r+b") as f, vnpager.mmap(f.fileno(), 0, vm=vm) as m1, \
            vnpager.mmap(f.fileno(), 0, vm=vm) as m2:
        m1[:5] = b"hello"
        plan.fail("write", errno.EIO, times=1)
        with pytest.raises(OSError):
            m1.flush()
        m1.flush()  # told once
        with pytest.raises(OSError) as exc:
            m2.flush()  # the page is written now, but m2 was open when it failed
        assert exc.value.errno == errno.EIO
        m2.flush()
