"""uvn_get (the locked and unlocked passes), uvn_io and uvn_put."""

from __future__ import annotations

import errno
import threading

import pytest

from helpers import (
    PS,
    contents,
    flush,
    get_busy,
    getpages,
    machine,
    mkfile,
    pattern,
    progfs,
    start,
    store,
    unbusy,
    wait_sleeping,
)
from vnpager import VM
from vnpager.kern.debug import Panic
from vnpager.kern.lock import LK_EXCLUSIVE, RW_WRITE
from vnpager.kern.proc import curproc
from vnpager.uvm.pmap import Pmap
from vnpager.uvm.uvm_page import (
    PG_BUSY,
    PG_CLEAN,
    PG_FAKE,
    VmPage,
    uvm_page_unbusy,
    uvm_pagealloc,
    uvm_pagefree,
)
from vnpager.uvm.uvm_pager import (
    PGO_ALLPAGES,
    PGO_CLEANIT,
    PGO_DONTCARE,
    PGO_FREE,
    PGO_LOCKED,
    PGO_NOWAIT,
    PGO_SYNCIO,
    VM_PAGER_AGAIN,
    VM_PAGER_BAD,
    VM_PAGER_ERROR,
    VM_PAGER_OK,
    VM_PAGER_UNLOCK,
    PageSlot,
)
from vnpager.uvm.uvm_param import PROT_READ
from vnpager.uvm.uvm_vnode import (
    UVM_VNODE_IOSYNC,
    UvmVnode,
    uvn_flush,
    uvn_get,
    uvn_io,
    uvn_put,
)
from vnpager.vfs.vnode import UIO_READ, UIO_WRITE, vn_lock


def locked_get(uvn: UvmVnode, pps: list[PageSlot], centeridx: int = 0,
               flags: int = 0) -> tuple[int, int]:
    with uvn.vmobjlock:
        result = uvn_get(uvn, 0, pps, len(pps), centeridx, PROT_READ, 0, PGO_LOCKED | flags)
        uvm_page_unbusy([pg for pg in pps if isinstance(pg, VmPage)])
    return result


def test_uvn_get_locked_takes_only_resident_unbusy_pages(vm: VM) -> None:
    _, uvn = mkfile(vm, pattern(4))
    resident = getpages(uvn, PS, 2)  # pages 1 and 2, in one read
    pps: list[PageSlot] = [None] * 4
    assert locked_get(uvn, pps, centeridx=1) == (VM_PAGER_OK, 2)
    assert pps == [None, *resident, None]
    assert vm.uvmexp.read_ios == 1  # the locked pass never does I/O


def test_uvn_get_locked_missing_center_means_unlock(vm: VM) -> None:
    _, uvn = mkfile(vm, pattern(4))
    getpages(uvn, PS, 1)
    assert locked_get(uvn, [None] * 4, centeridx=0) == (VM_PAGER_UNLOCK, 1)


def test_uvn_get_locked_allpages_wants_every_page(vm: VM) -> None:
    _, uvn = mkfile(vm, pattern(3))
    getpages(uvn, 0, 2)
    assert locked_get(uvn, [None] * 3, flags=PGO_ALLPAGES) == (VM_PAGER_UNLOCK, 2)
    getpages(uvn, 2 * PS, 1)
    assert locked_get(uvn, [None] * 3, flags=PGO_ALLPAGES) == (VM_PAGER_OK, 3)


def test_uvn_get_locked_skips_dontcare_slots(vm: VM) -> None:
    _, uvn = mkfile(vm, pattern(3))
    getpages(uvn, 0, 3)
    pps: list[PageSlot] = [PGO_DONTCARE, None, PGO_DONTCARE]
    assert locked_get(uvn, pps, centeridx=1, flags=PGO_ALLPAGES) == (VM_PAGER_OK, 1)
    assert pps[0] is PGO_DONTCARE and pps[2] is PGO_DONTCARE
    # a center the caller does not care about cannot be missing
    _, empty = mkfile(vm, pattern(1))
    assert locked_get(empty, [PGO_DONTCARE], centeridx=0) == (VM_PAGER_OK, 0)


def test_uvn_get_locked_busy_page_counts_as_missing(vm: VM) -> None:
    _, uvn = mkfile(vm, pattern(2))
    pgs = getpages(uvn, 0, 2)
    with uvn.vmobjlock:
        pgs[0].pg_flags |= PG_BUSY
    assert locked_get(uvn, [None, None], centeridx=0) == (VM_PAGER_UNLOCK, 1)
    with uvn.vmobjlock:
        uvm_page_unbusy([pgs[0]])


def test_uvn_get_locked_requires_object_lock(vm: VM) -> None:
    _, uvn = mkfile(vm, pattern(1))
    with pytest.raises(Panic, match="uvn_get"):
        uvn_get(uvn, 0, [None], 1, 0, PROT_READ, 0, PGO_LOCKED)


def test_uvn_get_unlocked_reads_center_and_window_after_it_without_allpages(vm: VM) -> None:
    _, uvn = mkfile(vm, pattern(4))
    result, pps = get_busy(uvn, 0, 3, flags=0, centeridx=1)
    assert result == VM_PAGER_OK and not uvn.vmobjlock.rw_lock_held()
    assert pps[0] is None  # before the center: not wanted, not read
    pgs = pps[1:]
    for i, pg in enumerate(pgs, start=2):  # the center, and page 2 read ahead with it
        assert isinstance(pg, VmPage) and pg.pg_flags & PG_BUSY and not pg.pg_flags & PG_FAKE
        assert bytes(pg.data[:3]) == bytes([i]) * 3
    assert vm.uvmexp.read_ios == 1 and uvn.uo_npages == 2  # one read, nothing past the window
    unbusy(uvn, pgs)  # type: ignore[arg-type]


def test_uvn_get_unlocked_takes_resident_page_without_io(vm: VM) -> None:
    _, uvn = mkfile(vm, pattern(2))
    pgs = getpages(uvn, 0, 2)
    result, pps = get_busy(uvn, 0, 2)
    assert result == VM_PAGER_OK and pps == pgs and vm.uvmexp.read_ios == 1
    unbusy(uvn, pgs)


def test_uvn_get_unlocked_skips_slots_already_filled(vm: VM) -> None:
    _, uvn = mkfile(vm, pattern(2))
    pps: list[PageSlot] = [PGO_DONTCARE, None]
    uvn.vmobjlock.rw_enter(RW_WRITE)
    assert uvn_get(uvn, 0, pps, 2, 1, PROT_READ, 0, PGO_ALLPAGES) == (VM_PAGER_OK, 2)
    assert pps[0] is PGO_DONTCARE and uvn.uo_npages == 1
    unbusy(uvn, [pps[1]])  # type: ignore[list-item]


def test_uvn_get_unlocked_zeroes_tail_past_eof(vm: VM) -> None:
    _, junk = mkfile(vm, b"\xff" * PS)
    pg = getpages(junk, 0, 1)[0]
    with junk.vmobjlock:  # free the frame full of 0xff: it is reused next
        uvn_flush(junk, 0, 0, PGO_FREE | PGO_ALLPAGES)
    _, uvn = mkfile(vm, b"short")
    again = getpages(uvn, 0, 1)[0]
    assert again.frame == pg.frame
    assert bytes(again.data) == b"short" + bytes(PS - 5)


def test_uvn_get_unlocked_read_error_frees_page(vm: VM) -> None:
    fs, mp = progfs(vm)
    _, uvn = mkfile(vm, pattern(2), mp=mp)
    fs.fail["read"] = errno.EIO
    free = len(vm.page_free)
    result, pps = get_busy(uvn, 0, 2)
    assert result == VM_PAGER_ERROR and curproc().p_errno == errno.EIO
    assert pps == [None, None] and uvn.uo_npages == 0 and len(vm.page_free) == free
    assert not uvn.vmobjlock.rw_lock_held()


def test_uvn_get_unlocked_waits_for_memory() -> None:
    small = machine(16)
    _, uvn = mkfile(small, pattern(17))
    pgs = getpages(uvn, 0, 16)  # every frame in use
    getter = start(lambda: get_busy(uvn, 16 * PS, 1), "getter")
    wait_sleeping("uvn_getpage")
    assert small.uvmexp.allocfail >= 1 and small.uvmexp.waits == 1
    # the getter let go of the object lock: its own pages can be freed
    with uvn.vmobjlock:
        uvn_flush(uvn, 0, PS, PGO_FREE)
    result, pps = getter.join_ok()
    assert result == VM_PAGER_OK and pps[0].frame == pgs[0].frame
    assert bytes(pps[0].data[:2]) == b"\x11\x11"
    unbusy(uvn, pps)
    small.check_invariants()


def test_uvn_io_offset_at_or_past_eof_is_bad(vm: VM) -> None:
    _, uvn = mkfile(vm, b"x" * 10)
    result, pps = get_busy(uvn, PS, 1)
    assert result == VM_PAGER_BAD and pps == [None] and uvn.uo_npages == 0
    with uvn.vmobjlock:
        pg = uvm_pagealloc(vm, uvn, PS)
        assert pg is not None
        assert uvn_io(uvn, [pg], 1, PGO_SYNCIO, UIO_WRITE) == VM_PAGER_BAD
        with vm.pageqlock:
            uvm_pagefree(pg)


def test_uvn_io_zero_byte_read_is_an_error(vm: VM) -> None:
    vp, uvn = mkfile(vm, pattern(2))
    vp.v_data.data.truncate(0)  # behind the pager's back: u_size is stale
    result, _ = get_busy(uvn, PS, 1)
    assert result == VM_PAGER_ERROR and curproc().p_errno == errno.EIO


def test_uvn_io_nowait_gives_again_when_vnode_locked_elsewhere(vm: VM) -> None:
    vp, uvn = mkfile(vm, pattern(1))
    locked, release = threading.Event(), threading.Event()

    def holder() -> None:
        assert vn_lock(vp, LK_EXCLUSIVE) == 0
        locked.set()
        assert release.wait(30)
        vp.v_lock.unlock()

    t = start(holder, "holder")
    assert locked.wait(30)
    result, pps = get_busy(uvn, 0, 1)  # uvn_get reads with PGO_NOWAIT
    assert result == VM_PAGER_AGAIN and pps == [None] and uvn.uo_npages == 0
    release.set()
    t.join_ok()
    assert getpages(uvn, 0, 1)


def test_uvn_io_vnode_locked_by_caller_is_edeadlk(vm: VM) -> None:
    vp, uvn = mkfile(vm, pattern(1))
    assert vn_lock(vp, LK_EXCLUSIVE) == 0
    try:
        result, _ = get_busy(uvn, 0, 1)  # e.g. a fault during a read(2) of the same file
    finally:
        vp.v_lock.unlock()
    assert result == VM_PAGER_ERROR and curproc().p_errno == errno.EDEADLK


def test_uvn_io_iosync_without_syncio_is_again(vm: VM) -> None:
    _, uvn = mkfile(vm, pattern(1))
    pg = getpages(uvn, 0, 1)[0]
    with uvn.vmobjlock:
        pg.pg_flags |= PG_BUSY
        uvn.u_flags |= UVM_VNODE_IOSYNC  # as while a flush waits for I/O
        assert uvn_io(uvn, [pg], 1, 0, UIO_READ) == VM_PAGER_AGAIN
        uvn.u_flags &= ~UVM_VNODE_IOSYNC
        uvm_page_unbusy([pg])


def test_uvn_io_no_pager_map_without_syncio_is_again(vm: VM) -> None:
    _, uvn = mkfile(vm, pattern(1))
    pg = getpages(uvn, 0, 1)[0]
    vm.pager_map.inuse = vm.pager_map.nslots
    with uvn.vmobjlock:
        pg.pg_flags |= PG_BUSY
        assert uvn_io(uvn, [pg], 1, PGO_NOWAIT, UIO_WRITE) == VM_PAGER_AGAIN
        uvm_page_unbusy([pg])
    vm.pager_map.inuse = 0
    assert vm.uvmexp.write_ios == 0


def test_uvn_put_writes_pages(vm: VM) -> None:
    vp, uvn = mkfile(vm, pattern(2))
    pgs = getpages(uvn, 0, 2)
    with uvn.vmobjlock:
        for pg in pgs:
            pg.pg_flags |= PG_BUSY
            pg.data[:2] = b"pp"
        assert uvn_put(uvn, pgs, 2, PGO_SYNCIO) == VM_PAGER_OK
        uvm_page_unbusy(pgs)
    data = vp.v_data.data
    assert data.pread(0, 2) == b"pp" and data.pread(PS, 2) == b"pp"
    assert vm.uvmexp.write_ios == 1 and vm.uvmexp.pageouts == 2


def test_uvn_put_requires_object_lock(vm: VM) -> None:
    _, uvn = mkfile(vm, pattern(1))
    pg = getpages(uvn, 0, 1)[0]
    with pytest.raises(Panic, match="uvn_put"):
        uvn_put(uvn, [pg], 1, PGO_SYNCIO)



def test_uvn_io_short_write_is_an_error_and_pages_stay_dirty(vm: VM) -> None:
    fs, mp = progfs(vm)
    vp, uvn = mkfile(vm, pattern(2), mp=mp)
    pgs = getpages(uvn, 0, 2)
    pm = Pmap(vm)
    for pg in pgs:
        store(pm, pg, b"both")
    fs.write_limit = PS  # the backend stops after one page, with no error
    assert flush(uvn, 0, 0, PGO_CLEANIT | PGO_SYNCIO | PGO_ALLPAGES) is False
    # the cluster was dropped dirty, and this flush does not try it again
    assert uvn.u_error == errno.EIO and uvn.u_errseq == 1
    assert not pgs[0].pg_flags & PG_CLEAN and not pgs[1].pg_flags & PG_CLEAN
    assert contents(vp)[PS:PS + 4] != b"both"
    fs.write_limit = None
    assert flush(uvn, 0, 0, PGO_CLEANIT | PGO_SYNCIO | PGO_ALLPAGES) is True
    assert contents(vp)[:4] == b"both" and contents(vp)[PS:PS + 4] == b"both"


def test_uvn_io_multi_page_read_zero_fills_after_eof(vm: VM) -> None:
    _, uvn = mkfile(vm, pattern(1, tail=3))
    with uvn.vmobjlock:
        pgs = [uvm_pagealloc(vm, uvn, off) for off in (0, PS)]
        assert all(pgs)
        for pg in pgs:
            pg.data[:] = b"\xff" * PS  # type: ignore[union-attr]
        assert uvn_io(uvn, pgs, 2, PGO_SYNCIO, UIO_READ) == VM_PAGER_OK  # type: ignore[arg-type]
        assert bytes(pgs[0].data) == b"\x01" * PS  # type: ignore[union-attr]
        assert bytes(pgs[1].data) == b"\xee" * 3 + bytes(PS - 3)  # type: ignore[union-attr]
        with vm.pageqlock:
            for pg in pgs:
                uvm_pagefree(pg)  # type: ignore[arg-type]


def test_uvn_io_npages_other_than_the_pages_given_panics(vm: VM) -> None:
    # the read would zero-fill every frame of pps after the npages it read
    _, uvn = mkfile(vm, b"short")
    with uvn.vmobjlock:
        pgs = [uvm_pagealloc(vm, uvn, off) for off in (0, PS)]
        assert all(pgs)
        for pg in pgs:
            pg.data[:] = b"\xff" * PS  # type: ignore[union-attr]
        try:
            with pytest.raises(Panic, match="uvn_io: npages"):
                uvn_io(uvn, pgs, 1, PGO_SYNCIO, UIO_READ)  # type: ignore[arg-type]
            untouched = [bytes(pg.data) == b"\xff" * PS for pg in pgs]  # type: ignore[union-attr]
        finally:
            with vm.pageqlock:
                for pg in pgs:
                    uvm_pagefree(pg)  # type: ignore[arg-type]
    assert untouched == [True, True]


def test_uvn_get_clears_the_errno_of_an_earlier_call(vm: VM) -> None:
    fs, mp = progfs(vm)
    _, uvn = mkfile(vm, pattern(2), mp=mp)
    fs.fail["read"] = errno.EIO
    assert get_busy(uvn, 0, 1)[0] == VM_PAGER_ERROR and curproc().p_errno == errno.EIO
    del fs.fail["read"]
    result, pps = get_busy(uvn, 0, 1)
    error = curproc().p_errno
    unbusy(uvn, pps)  # type: ignore[arg-type]
    assert result == VM_PAGER_OK and error == 0
