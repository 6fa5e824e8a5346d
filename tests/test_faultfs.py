"""faultfs: faults injected under the vnode operations, seen by the pager."""

from __future__ import annotations

import errno
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vfs_helpers import dirty_page, get_page, release_page, size_of, vop_read, vop_write
from vnpager import VM
from vnpager.kern.lock import RW_WRITE, kernel_lock
from vnpager.kern.proc import curproc
from vnpager.uvm.uvm_page import PG_CLEAN, uvm_pagelookup
from vnpager.uvm.uvm_pager import PGO_ALLPAGES, PGO_CLEANIT, PGO_SYNCIO, VM_PAGER_ERROR, VM_PAGER_OK
from vnpager.uvm.uvm_param import PROT_READ, PROT_WRITE
from vnpager.uvm.uvm_vnode import UvmVnode, uvn_attach, uvn_detach, uvn_flush
from vnpager.vfs import faultfs
from vnpager.vfs.faultfs import OPS, FaultFS, FaultPlan
from vnpager.vfs.hostfs import HostFS, hostfs_vget_fd, hostfs_vget_path
from vnpager.vfs.memfs import MemFS, memfs_create
from vnpager.vfs.mount import Mount, vrele
from vnpager.vfs.vnode import VOP_FSYNC, VOP_GETATTR, Vattr, Vnode

PAGE = 4096


@pytest.fixture
def plan() -> FaultPlan:
    return FaultPlan(seed=42)


@pytest.fixture
def memmp(vm: VM, plan: FaultPlan) -> Iterator[Mount]:
    mp = vm.vfs.mount(FaultFS(MemFS(), plan), "faulty-mem")
    yield mp
    plan.clear()
    assert vm.vfs.dounmount(mp) == 0


@pytest.fixture
def hostmp(vm: VM, plan: FaultPlan) -> Iterator[Mount]:
    mp = vm.vfs.mount(FaultFS(HostFS(), plan), "faulty-host")
    yield mp
    plan.clear()
    assert vm.vfs.dounmount(mp) == 0  # reclaims through faultfs: closes the descriptors


# --- at the vnode operations ---

def test_without_rules_it_is_the_lower_fs(vm: VM, memmp: Mount, plan: FaultPlan) -> None:
    vp = memfs_create(vm.vfs, memmp, b"abc")
    assert vp.v_op.name == "faultfs(memfs)"
    assert vop_write(vp, 3, b"def") == (0, 3)
    assert vop_read(vp, 0, 10) == (0, b"abcdef")
    assert size_of(vp) == 6 and VOP_FSYNC(vp) == 0
    assert plan.injected == Counter()
    vrele(vp)


def test_the_third_write_fails(vm: VM, memmp: Mount, plan: FaultPlan) -> None:
    vp = memfs_create(vm.vfs, memmp)
    rule = plan.fail("write", errno.ENOSPC, skip=2, times=1)
    results = [vop_write(vp, i, b"x") for i in range(5)]
    assert results == [(0, 1), (0, 1), (errno.ENOSPC, 0), (0, 1), (0, 1)]
    assert vop_read(vp, 0, 10) == (0, b"xx\0xx")
    assert plan.injected == Counter({("write", "ENOSPC"): 1})
    assert (rule.seen, rule.fired) == (3, 1)
    assert plan.rules == []  # spent
    vrele(vp)


def test_reads_in_a_range_fail_until_cleared(vm: VM, memmp: Mount, plan: FaultPlan) -> None:
    vp = memfs_create(vm.vfs, memmp, bytes(range(256)) * 64)
    plan.fail("read", errno.EIO, offsets=range(PAGE, 2 * PAGE))
    assert vop_read(vp, 0, PAGE) == (0, (bytes(range(256)) * 16))
    assert vop_read(vp, PAGE - 1, 2) == (errno.EIO, b"")  # overlaps the range
    assert vop_read(vp, 2 * PAGE - 1, 1) == (errno.EIO, b"")
    assert vop_read(vp, 2 * PAGE, 1) == (0, b"\0")
    assert vop_write(vp, PAGE, b"w") == (0, 1)  # writes are not concerned
    plan.clear()
    assert vop_read(vp, PAGE, 1) == (0, b"w")
    assert plan.injected == Counter({("read", "EIO"): 2})
    vrele(vp)


def test_other_operations_fail(vm: VM, memmp: Mount, plan: FaultPlan) -> None:
    vp = memfs_create(vm.vfs, memmp, b"abc")
    plan.fail(["getattr", "fsync", "setsize"], errno.EAGAIN)
    assert VOP_GETATTR(vp, Vattr()) == errno.EAGAIN
    assert VOP_FSYNC(vp) == errno.EAGAIN
    assert vp.v_op.setsize(vp, 0) == errno.EAGAIN
    plan.clear()
    assert size_of(vp) == 3
    assert plan.injected == Counter({("getattr", "EAGAIN"): 1, ("fsync", "EAGAIN"): 1,
                                     ("setsize", "EAGAIN"): 1})
    vrele(vp)


def test_short_read_stops_as_at_end_of_file(vm: VM, memmp: Mount, plan: FaultPlan) -> None:
    vp = memfs_create(vm.vfs, memmp, b"0123456789")
    plan.short("read", 4, times=1)
    assert vop_read(vp, 0, 3) == (0, b"012")  # no shorter than asked: not injected
    assert vop_read(vp, 2, 8) == (0, b"2345")
    assert vop_read(vp, 2, 8) == (0, b"23456789")
    assert plan.injected == Counter({("read", "short"): 1})
    vrele(vp)


def test_short_write_then_an_error(vm: VM, memmp: Mount, plan: FaultPlan) -> None:
    vp = memfs_create(vm.vfs, memmp)
    plan.short("write", 3, error=errno.ENOSPC)
    assert vop_write(vp, 0, b"abcdef") == (errno.ENOSPC, 3)
    assert vop_read(vp, 0, 10) == (0, b"abc")
    assert plan.injected == Counter({("write", "short+ENOSPC"): 1})
    vrele(vp)


def test_short_write_then_the_retry_succeeds(vm: VM, memmp: Mount, plan: FaultPlan) -> None:
    calls: list[tuple[int, int]] = []
    lower = MemFS()
    real_write = lower.write

    def write(vp: Vnode, uio: faultfs.Uio, ioflag: int) -> int:
        calls.append((uio.offset, uio.resid))
        return real_write(vp, uio, ioflag)

    lower.write = write
    mp = vm.vfs.mount(FaultFS(lower, plan), "counting")
    vp = memfs_create(vm.vfs, mp)
    plan.short("write", 2)
    assert vop_write(vp, 10, b"abcdef") == (0, 6)
    assert calls == [(10, 2), (12, 4)]
    assert vop_read(vp, 10, 10) == (0, b"abcdef")
    vrele(vp)
    assert vm.vfs.dounmount(mp) == 0


def test_rules_only_for_one_vnode(vm: VM, memmp: Mount, plan: FaultPlan) -> None:
    a, b = memfs_create(vm.vfs, memmp, b"a"), memfs_create(vm.vfs, memmp, b"b")
    plan.fail("read", errno.EIO, vnode=a)
    assert vop_read(a, 0, 1) == (errno.EIO, b"")
    assert vop_read(b, 0, 1) == (0, b"b")
    vrele(a)
    vrele(b)


def test_first_failure_decides_and_delays_add_up(vm: VM, memmp: Mount, plan: FaultPlan,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[tuple[float, bool]] = []
    monkeypatch.setattr(faultfs.time, "sleep", lambda s: slept.append((s, kernel_lock.held())))
    vp = memfs_create(vm.vfs, memmp, b"abc")
    plan.delay(OPS, 0.25)  # every call
    first = plan.fail("read", errno.EIO, times=1)
    second = plan.fail("read", errno.ENXIO, times=1)
    plan.delay("read", 0.5)
    with kernel_lock:  # a slow backend must not sleep with the big lock
        assert vop_read(vp, 0, 1) == (errno.EIO, b"")
        assert size_of(vp) == 3
        assert kernel_lock.held()
    assert slept == [(0.75, False), (0.25, False)]
    assert (first.fired, second.seen, second.fired) == (1, 1, 0)
    assert vop_read(vp, 0, 1) == (errno.ENXIO, b"")
    assert plan.injected == Counter({("read", "delay"): 4, ("getattr", "delay"): 1,
                                     ("read", "EIO"): 1, ("read", "ENXIO"): 1})
    vrele(vp)


def test_random_faults_follow_the_seed(vm: VM) -> None:
    def fates(seed: int) -> list[int]:
        plan = FaultPlan(seed)
        mp = vm.vfs.mount(FaultFS(MemFS(), plan), f"seed{seed}")
        vp = memfs_create(vm.vfs, mp, b"x")
        plan.fail("read", errno.EIO, probability=0.3)
        plan.fail("read", errno.EAGAIN, probability=0)
        out = [vop_read(vp, 0, 1)[0] for _ in range(200)]
        assert sum(plan.injected.values()) == out.count(errno.EIO)
        vrele(vp)
        assert vm.vfs.dounmount(mp) == 0
        return out

    run = fates(7)
    assert run == fates(7)
    assert run != fates(8)
    assert 0 < run.count(errno.EIO) < 200 and errno.EAGAIN not in run


def test_counts_are_exact_under_threads(vm: VM, memmp: Mount, plan: FaultPlan) -> None:
    vp = memfs_create(vm.vfs, memmp, b"x")
    rule = plan.fail("getattr", errno.EIO, skip=10, times=25)
    errors: list[int] = []

    def worker() -> None:
        got = [VOP_GETATTR(vp, Vattr()) for _ in range(50)]
        errors.extend(e for e in got if e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [errno.EIO] * 25
    assert plan.injected == Counter({("getattr", "EIO"): 25})
    assert (rule.seen, rule.fired) == (35, 25)  # spent after 25: later calls do not match
    vrele(vp)


@pytest.mark.parametrize("make", [
    lambda p: p.short("getattr", 1),
    lambda p: p.fail("fsync", errno.EIO, offsets=range(0, 1)),
    lambda p: p.fail("read", 0),
    lambda p: p.fail("mmap", errno.EIO),
    lambda p: p.fail("read", errno.EIO, offsets=range(0, 10, 2)),
    lambda p: p.fail("read", errno.EIO, times=0),
    lambda p: p.delay("read", -1),
    lambda p: p.fail("read", errno.EIO, probability=1.5),
])
def test_bad_rules_are_refused(plan: FaultPlan, make: Callable[[FaultPlan], object]) -> None:
    with pytest.raises(ValueError):
        make(plan)
    assert plan.rules == []


def test_host_files_by_path_and_by_fd(vm: VM, hostmp: Mount, plan: FaultPlan, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"host data")
    vp = hostfs_vget_path(vm.vfs, hostmp, str(path))
    plan.fail("read", errno.EIO, times=1)
    assert vop_read(vp, 0, 4) == (errno.EIO, b"")
    assert vop_read(vp, 0, 4) == (0, b"host")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert hostfs_vget_fd(vm.vfs, hostmp, fd) is vp  # the same file, the same vnode
    finally:
        os.close(fd)
    assert vp.v_usecount == 2
    vrele(vp)
    vrele(vp)


# --- through the pager ---

def _attach(vp: Vnode) -> UvmVnode:
    uvn = uvn_attach(vp, PROT_READ | PROT_WRITE)
    assert uvn is not None
    vrele(vp)  # the object holds its own reference
    return uvn


def _flush(uvn: UvmVnode) -> bool:
    uvn.vmobjlock.rw_enter(RW_WRITE)
    try:
        return uvn_flush(uvn, 0, 0, PGO_CLEANIT | PGO_SYNCIO | PGO_ALLPAGES)
    finally:
        uvn.vmobjlock.rw_exit()


def test_failed_write_back_keeps_the_page_dirty(vm: VM, hostmp: Mount, plan: FaultPlan,
                                                tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"." * (3 * PAGE))
    uvn = _attach(hostfs_vget_path(vm.vfs, hostmp, str(path)))
    pg = dirty_page(uvn, PAGE, b"dirty")
    plan.fail("write", errno.ENOSPC)

    assert not _flush(uvn)
    assert uvm_pagelookup(uvn, PAGE) is pg and not pg.pg_flags & PG_CLEAN
    assert (uvn.u_error, uvn.u_errseq) == (errno.ENOSPC, 1)
    assert path.read_bytes()[PAGE:PAGE + 5] == b"....."

    plan.clear()
    assert _flush(uvn)
    assert pg.pg_flags & PG_CLEAN
    assert path.read_bytes()[PAGE:PAGE + 5] == b"dirty"
    assert plan.injected == Counter({("write", "ENOSPC"): 1})
    uvn_detach(uvn)


def test_short_write_back_then_an_error(vm: VM, hostmp: Mount, plan: FaultPlan, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"." * PAGE)
    uvn = _attach(hostfs_vget_path(vm.vfs, hostmp, str(path)))
    pg = dirty_page(uvn, 0, b"0123456789")
    plan.short("write", 4, error=errno.EIO, times=1)
    assert not _flush(uvn)
    assert not pg.pg_flags & PG_CLEAN and uvn.u_error == errno.EIO
    assert path.read_bytes()[:10] == b"0123......"  # what a torn write leaves
    assert _flush(uvn)
    assert path.read_bytes()[:10] == b"0123456789"
    uvn_detach(uvn)


def test_failed_read_frees_the_page(vm: VM, memmp: Mount, plan: FaultPlan) -> None:
    uvn = _attach(memfs_create(vm.vfs, memmp, b"y" * (2 * PAGE)))
    nfree = len(vm.page_free)
    plan.fail("read", errno.EIO, offsets=range(PAGE, 2 * PAGE))
    assert get_page(uvn, PAGE) == (VM_PAGER_ERROR, None)
    assert curproc().p_errno == errno.EIO
    assert uvn.uo_npages == 0 and len(vm.page_free) == nfree
    result, pg = get_page(uvn, 0)  # outside the range: fine
    assert result == VM_PAGER_OK and pg is not None
    release_page(uvn, pg)
    uvn_detach(uvn)


def test_short_read_is_zero_filled(vm: VM, memmp: Mount, plan: FaultPlan) -> None:
    uvn = _attach(memfs_create(vm.vfs, memmp, b"z" * PAGE))
    plan.short("read", 100)
    pg = dirty_page(uvn, 0, b"")
    assert bytes(pg.data) == b"z" * 100 + bytes(PAGE - 100)
    plan.clear()
    uvn_detach(uvn)


def test_attach_fails_when_getattr_does(vm: VM, memmp: Mount, plan: FaultPlan) -> None:
    vp = memfs_create(vm.vfs, memmp, b"q")
    plan.fail("getattr", errno.EIO, times=1)
    assert uvn_attach(vp, PROT_READ) is None
    assert curproc().p_errno == errno.EIO
    uvn = uvn_attach(vp, PROT_READ)
    assert uvn is not None and uvn.u_size == 1
    vrele(vp)
    uvn_detach(uvn)


class _HalfWriteFS(MemFS):
    """Writes half of what it is asked and says nothing (a short write(2)),
    until healed."""

    healed = False

    def write(self, vp: Vnode, uio: faultfs.Uio, ioflag: int) -> int:
        if self.healed:
            return super().write(vp, uio, ioflag)
        rest = uio.resid - uio.resid // 2
        uio.resid -= rest
        super().write(vp, uio, ioflag)
        uio.resid += rest
        return 0


def test_write_back_stopped_short_without_an_error_fails(vm: VM) -> None:
    fs = _HalfWriteFS()
    mp = vm.vfs.mount(fs, "half")
    vp = memfs_create(vm.vfs, mp, bytes(PAGE))
    uvn = _attach(vp)
    pg = dirty_page(uvn, 0, b"a" * PAGE)
    assert not _flush(uvn)
    assert not pg.pg_flags & PG_CLEAN and uvn.u_error == errno.EIO
    fs.healed = True
    assert _flush(uvn)
    assert vp.v_data.data.pread(0, PAGE) == b"a" * PAGE
    uvn_detach(uvn)
    assert vm.vfs.dounmount(mp) == 0
