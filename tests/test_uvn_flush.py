"""uvn_flush: cleaning, deactivating and freeing the pages of a range."""

from __future__ import annotations

import errno
import itertools
import os
from pathlib import Path

import pytest

from helpers import (
    PS,
    Gate,
    ProgFS,
    contents,
    dirty_progfs,
    flush,
    get_busy,
    getpages,
    mkfile,
    pattern,
    progfs,
    start,
    store,
    unbusy,
    wait_sleeping,
)
from vnpager import VM
from vnpager.kern.lock import RW_WRITE
from vnpager.uvm.pmap import Pmap, pmap_is_modified
from vnpager.uvm.uvm_page import (
    PG_BUSY,
    PG_CLEAN,
    PG_RELEASED,
    PQ_ACTIVE,
    PQ_FREE,
    PQ_INACTIVE,
    VmPage,
    uvm_page_unbusy,
)
from vnpager.uvm.uvm_pager import (
    PGO_ALLPAGES,
    PGO_CLEANIT,
    PGO_DEACTIVATE,
    PGO_FREE,
    PGO_LOCKED,
    PGO_SYNCIO,
    VM_PAGER_OK,
    uvm_pagermapout,
)
from vnpager.uvm.uvm_param import PROT_READ, PROT_WRITE
from vnpager.uvm.uvm_vnode import UVM_VNODE_IOSYNC, uvn_attach, uvn_flush, uvn_get
from vnpager.vfs.hostfs import hostfs_vget_path
from vnpager.vfs.memfs import MemData


def dirty_file(vm: VM, npages: int = 4, dirty: tuple[int, ...] = (1, 2)) -> tuple[MemData, object,
                                                                                  list[VmPage]]:
    """A file of *npages* resident pages; the pages at *dirty* stored to."""
    vp, uvn = mkfile(vm, pattern(npages))
    pgs = getpages(uvn, 0, npages)
    pm = Pmap(vm)
    for i in dirty:
        store(pm, pgs[i], b"new%d" % i)
    return vp.v_data.data, uvn, pgs


def modified(pg: VmPage) -> bool:
    return not pg.pg_flags & PG_CLEAN or pmap_is_modified(pg)


FLAGS = (PGO_CLEANIT, PGO_SYNCIO, PGO_DEACTIVATE, PGO_FREE)


@pytest.mark.parametrize("flags", [sum(c) for n in range(len(FLAGS) + 1)
                                   for c in itertools.combinations(FLAGS, n)])
def test_uvn_flush_flag_combinations(vm: VM, flags: int) -> None:
    data, uvn, pgs = dirty_file(vm)
    assert flush(uvn, 0, 0, flags | PGO_ALLPAGES) is True
    cleaned = bool(flags & PGO_CLEANIT)
    assert data.pread(PS, 4) == (b"new1" if cleaned else b"\x02" * 4)
    assert data.pread(2 * PS, 4) == (b"new2" if cleaned else b"\x03" * 4)
    assert vm.uvmexp.write_ios == (1 if cleaned else 0)  # one clustered write
    for i, pg in enumerate(pgs):
        assert not pg.pg_flags & (PG_BUSY | PG_RELEASED)
        if flags & PGO_DEACTIVATE:
            assert pg.pg_flags & PQ_INACTIVE and not pg.pv and pg.uobject is uvn
        elif flags & PGO_FREE:
            assert pg.pg_flags & PQ_FREE and pg.uobject is None
        else:
            assert pg.pg_flags & PQ_ACTIVE and pg.uobject is uvn
        if pg.uobject is uvn:
            assert modified(pg) == (i in (1, 2) and not cleaned)
    vm.check_invariants()


def test_uvn_flush_range_touches_only_its_pages(vm: VM) -> None:
    data, uvn, pgs = dirty_file(vm, 4, dirty=(0, 1, 2, 3))
    # [PS+1, 2*PS+1) rounds out to pages 1 and 2
    assert flush(uvn, PS + 1, 2 * PS + 1, PGO_CLEANIT | PGO_SYNCIO | PGO_FREE)
    assert [pg.pg_flags & PQ_FREE != 0 for pg in pgs] == [False, True, True, False]
    assert data.pread(0, 4) == b"\x01" * 4 and data.pread(3 * PS, 4) == b"\x04" * 4
    assert data.pread(PS, 4) == b"new1" and data.pread(2 * PS, 4) == b"new2"


def test_uvn_flush_range_is_clipped_to_object_size(vm: VM) -> None:
    data, uvn, _pgs = dirty_file(vm, 2, dirty=(1,))
    assert flush(uvn, PS, 1 << 40, PGO_CLEANIT | PGO_SYNCIO)
    assert data.pread(PS, 4) == b"new1" and data.size == 2 * PS


def test_uvn_flush_allpages_ignores_range(vm: VM) -> None:
    data, uvn, _ = dirty_file(vm, 4, dirty=(0, 3))
    assert flush(uvn, PS, 2 * PS, PGO_CLEANIT | PGO_SYNCIO | PGO_ALLPAGES)
    assert data.pread(0, 4) == b"new0" and data.pread(3 * PS, 4) == b"new3"
    assert vm.uvmexp.write_ios == 2  # not contiguous: two writes


def test_uvn_flush_clusters_contiguous_dirty_pages_into_one_write(vm: VM) -> None:
    fs, _, uvn, pgs = dirty_progfs(vm, 8, (2, 3, 4, 5), b"c")
    assert flush(uvn, 0, 0, PGO_CLEANIT | PGO_SYNCIO | PGO_ALLPAGES)
    assert [c for c in fs.calls if c[0] == "write"] == [("write", 2 * PS, 4 * PS)]
    assert vm.uvmexp.write_ios == 1 and vm.uvmexp.pageouts == 4
    assert not any(modified(pg) for pg in pgs)


def test_uvn_flush_finds_dirty_pages_by_pmap_modified_bit(vm: VM) -> None:
    data, uvn, pgs = dirty_file(vm, 1, dirty=())
    pgs[0].data[:4] = b"mmu?"  # a store the pmap did not see: not dirty
    assert flush(uvn, 0, 0, PGO_CLEANIT | PGO_SYNCIO | PGO_ALLPAGES)
    assert vm.uvmexp.write_ios == 0
    store(Pmap(vm), pgs[0], b"seen")
    assert flush(uvn, 0, 0, PGO_CLEANIT | PGO_SYNCIO | PGO_ALLPAGES)
    assert vm.uvmexp.write_ios == 1 and data.pread(0, 4) == b"seen"


def test_uvn_flush_deactivate_leaves_wired_pages(vm: VM) -> None:
    data, uvn, pgs = dirty_file(vm, 2, dirty=(1,))
    for pg in pgs:
        pg.wire_count = 1
    assert flush(uvn, 0, 0, PGO_CLEANIT | PGO_SYNCIO | PGO_DEACTIVATE | PGO_ALLPAGES)
    assert all(pg.pg_flags & PQ_ACTIVE for pg in pgs)
    assert data.pread(PS, 4) == b"new1"
    for pg in pgs:
        pg.wire_count = 0


def test_uvn_flush_deactivate_and_free_does_not_leave_page_released(vm: VM) -> None:
    _, uvn, pgs = dirty_file(vm, 2, dirty=(1,))
    assert flush(uvn, 0, 0, PGO_CLEANIT | PGO_DEACTIVATE | PGO_FREE | PGO_ALLPAGES)
    assert not pgs[1].pg_flags & PG_RELEASED
    # a fault that gets and unbusies the page must not free it
    uvn.vmobjlock.rw_enter(RW_WRITE)
    pps: list = [None]
    assert uvn_get(uvn, PS, pps, 1, 0, PROT_READ, 0, PGO_LOCKED)[0] == VM_PAGER_OK
    uvm_page_unbusy([pps[0]])
    uvn.vmobjlock.rw_exit()
    assert pgs[1].uobject is uvn


def test_uvn_flush_cleanit_skips_busy_page_without_syncio(vm: VM) -> None:
    data, uvn, pgs = dirty_file(vm, 2, dirty=(0, 1))
    with uvn.vmobjlock:
        pgs[0].pg_flags |= PG_BUSY  # held by someone else (a fault, say)
        assert uvn_flush(uvn, 0, 0, PGO_ALLPAGES | PGO_CLEANIT)
        assert data.pread(0, 4) == b"\x01" * 4 and data.pread(PS, 4) == b"new1"
        uvm_page_unbusy([pgs[0]])
    assert modified(pgs[0])


def test_uvn_flush_syncio_waits_for_a_busy_dirty_page_without_io(vm: VM) -> None:
    # the seed waits only for u_nio to drain, which here is 0 at once, and
    # would return with page 0 still dirty: we wait for the page itself
    data, uvn, pgs = dirty_file(vm, 2, dirty=(0,))
    with uvn.vmobjlock:
        pgs[0].pg_flags |= PG_BUSY  # a fault between its two pgo_get passes
    syncer = start(lambda: flush(uvn, 0, 0, PGO_ALLPAGES | PGO_CLEANIT | PGO_SYNCIO), "msync")
    wait_sleeping("uvn_flsh")
    assert data.pread(0, 4) == b"\x01" * 4
    with uvn.vmobjlock:
        uvm_page_unbusy([pgs[0]])
    assert syncer.join_ok() is True
    assert data.pread(0, 4) == b"new0" and not modified(pgs[0])


def test_uvn_flush_deactivates_busy_page_without_cleanit(vm: VM) -> None:
    _, uvn, pgs = dirty_file(vm, 1, dirty=())
    with uvn.vmobjlock:
        pgs[0].pg_flags |= PG_BUSY
        assert uvn_flush(uvn, 0, 0, PGO_ALLPAGES | PGO_DEACTIVATE)
        assert pgs[0].pg_flags & PQ_INACTIVE and pgs[0].pg_flags & PG_BUSY
        uvm_page_unbusy([pgs[0]])


def test_uvn_flush_free_waits_for_busy_page(vm: VM) -> None:
    _, uvn, _ = dirty_file(vm, 2, dirty=())
    result, pps = get_busy(uvn, 0, 1)  # we own page 0 busy, as a fault would
    assert result == VM_PAGER_OK
    flusher = start(lambda: flush(uvn, 0, 0, PGO_FREE | PGO_ALLPAGES), "flusher")
    wait_sleeping("uvn_flsh")
    assert uvn.uo_npages == 2  # it waits for our page before going on
    unbusy(uvn, pps)  # type: ignore[arg-type]
    assert flusher.join_ok() is True
    assert uvn.uo_npages == 0


def test_uvn_flush_syncio_waits_for_io_of_others(vm: VM) -> None:
    fs, mp = progfs(vm)
    vp, uvn = mkfile(vm, pattern(2), mp=mp)
    pgs = getpages(uvn, 0, 2)
    store(Pmap(vm), pgs[0], b"once")
    gate = Gate("write")
    fs.hooks.append(gate)
    first = start(lambda: flush(uvn, 0, 0, PGO_CLEANIT | PGO_SYNCIO | PGO_ALLPAGES), "first")
    gate.wait_entered()
    second = start(lambda: flush(uvn, 0, 0, PGO_CLEANIT | PGO_SYNCIO | PGO_ALLPAGES), "second")
    wait_sleeping("uvn_flush")  # found page 0 busy: waits for u_nio to drain
    assert uvn.u_flags & UVM_VNODE_IOSYNC
    gate.open()
    assert first.join_ok() is True and second.join_ok() is True
    assert gate.passed == 1 and contents(vp)[:4] == b"once"
    assert not uvn.u_flags & UVM_VNODE_IOSYNC


def test_uvn_flush_again_falls_back_to_syncio(vm: VM) -> None:
    data, uvn, _ = dirty_file(vm, 2, dirty=(1,))
    vm.pager_map.inuse = vm.pager_map.nslots  # no pager map for an async write
    flusher = start(lambda: flush(uvn, 0, 0, PGO_CLEANIT | PGO_FREE | PGO_ALLPAGES), "flusher")
    wait_sleeping("pager_map")  # retried with SYNCIO: it waits for a slot
    assert vm.uvmexp.write_ios == 0
    uvm_pagermapout(vm.pager_map)  # another I/O finishes
    assert flusher.join_ok() is True
    vm.pager_map.inuse -= vm.pager_map.nslots - 1
    assert vm.pager_map.inuse == 0
    assert data.pread(PS, 4) == b"new1" and vm.uvmexp.write_ios == 1
    assert uvn.uo_npages == 0


@pytest.mark.parametrize("error", [errno.EIO, errno.ENOSPC])
@pytest.mark.parametrize("extra", [0, PGO_FREE, PGO_DEACTIVATE, PGO_SYNCIO])
def test_uvn_flush_write_error_keeps_page_dirty_and_records_it(vm: VM, error: int, extra: int) -> None:
    fs, vp, uvn, pgs = dirty_progfs(vm, 4, (1, 2), b"keep")
    fs.fail["write"] = error
    # a synchronous flush returns the failure; an asynchronous one has only
    # started the write, whose failure is recorded on the object when it ends
    assert flush(uvn, 0, 0, PGO_CLEANIT | PGO_ALLPAGES | extra) is (extra != PGO_SYNCIO)
    # pages 1 and 2 are one cluster: one write, one error
    assert uvn.u_error == error and uvn.u_errseq == 1 and vm.uvmexp.write_errors == 1
    assert [c for c in fs.calls if c[0] == "write"] == [("write", PS, 2 * PS)]
    for pg in pgs[1:3]:
        assert pg.uobject is uvn and modified(pg)
        assert not pg.pg_flags & (PG_BUSY | PG_RELEASED)
    # the retry writes them
    del fs.fail["write"]
    assert flush(uvn, 0, 0, PGO_CLEANIT | PGO_SYNCIO | PGO_ALLPAGES) is True
    assert contents(vp)[PS:PS + 4] == b"keep" and contents(vp)[2 * PS:2 * PS + 4] == b"keep"
    vm.check_invariants()


def writes(fs: ProgFS) -> list[tuple[int, int]]:
    """(offset, bytes) of each write the filesystem was asked for."""
    return [(off, n) for op, off, n in fs.calls if op == "write"]


def test_uvn_flush_failed_cluster_costs_one_write(vm: VM) -> None:
    # uvm_pager_put gave back only the centre of a failed cluster, so each
    # page after it started a cluster of its own: 16 writes, 136 pages
    fs, _, uvn, pgs = dirty_progfs(vm, 16, tuple(range(16)))
    fs.fail["write"] = errno.EIO
    assert flush(uvn, 0, 0, PGO_CLEANIT | PGO_SYNCIO | PGO_ALLPAGES) is False
    assert writes(fs) == [(0, 16 * PS)]
    assert uvn.u_errseq == 1 and vm.uvmexp.write_errors == 1 and vm.uvmexp.pageouts == 16
    assert all(modified(pg) and not pg.pg_flags & PG_BUSY for pg in pgs)
    # the next flush tries them again, once
    assert flush(uvn, 0, 0, PGO_CLEANIT | PGO_SYNCIO | PGO_ALLPAGES) is False
    assert writes(fs) == [(0, 16 * PS)] * 2 and uvn.u_errseq == 2


def test_uvn_flush_busy_page_that_fails_is_written_once(vm: VM) -> None:
    # page 5 is busy when the flush passes it: the clusters before and after
    # it fail; then the flush waits for page 5 and writes it alone, not
    # again with the failed pages after it
    fs, _, uvn, pgs = dirty_progfs(vm, 16, tuple(range(16)))
    fs.fail["write"] = errno.EIO
    with uvn.vmobjlock:
        pgs[5].pg_flags |= PG_BUSY  # a fault between its two pgo_get passes
    syncer = start(lambda: flush(uvn, 0, 0, PGO_CLEANIT | PGO_SYNCIO | PGO_ALLPAGES), "msync")
    try:
        wait_sleeping("uvn_flsh")
        before_wait = writes(fs)
    finally:
        with uvn.vmobjlock:
            uvm_page_unbusy([pgs[5]])
    assert syncer.join_ok() is False
    assert before_wait == [(0, 5 * PS), (6 * PS, 10 * PS)]
    assert writes(fs) == [(0, 5 * PS), (6 * PS, 10 * PS), (5 * PS, PS)]
    assert uvn.u_errseq == 3 and all(modified(pg) for pg in pgs)


def test_uvn_flush_one_dirty_page_of_sparse_terabyte_file(vm: VM, tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    path.write_bytes(b"")
    os.truncate(path, 1 << 40)
    vp = hostfs_vget_path(vm.vfs, vm.hostfs, str(path))
    uvn = uvn_attach(vp, PROT_READ | PROT_WRITE)
    assert uvn is not None and uvn.u_size == 1 << 40
    pg = getpages(uvn, 1 << 39, 1)[0]
    store(Pmap(vm), pg, b"far")
    assert flush(uvn, 0, 0, PGO_CLEANIT | PGO_SYNCIO | PGO_FREE | PGO_ALLPAGES)
    assert vm.uvmexp.write_ios == 1 and uvn.uo_npages == 0
    with open(path, "rb") as f:
        f.seek(1 << 39)
        assert f.read(3) == b"far"

