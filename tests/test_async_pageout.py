"""Asynchronous pageout (issue 6, point 1): uvn_put without PGO_SYNCIO starts
the write and returns VM_PAGER_PEND; uvn_aiodone finishes the pages."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from helpers import PS, Gate, dirty_progfs, flush, getpages, machine, mkfile, pattern, start, wait_sleeping
from vnpager import VM
from vnpager.uvm.pmap import pmap_is_modified
from vnpager.uvm.uvm_page import PG_BUSY, PG_CLEAN, PQ_FREE, PQ_INACTIVE
from vnpager.uvm.uvm_pager import (
    PGO_ALLPAGES,
    PGO_CLEANIT,
    PGO_DEACTIVATE,
    PGO_FREE,
    PGO_SYNCIO,
    VM_PAGER_OK,
    VM_PAGER_PEND,
)
from vnpager.uvm.uvm_pdaemon import uvmpd_scan
from vnpager.uvm.uvm_vnode import uvn_detach, uvn_flush, uvn_put, uvn_record_error
from vnpager.vnmap import vnode_of


def test_uvn_put_without_syncio_is_pending_until_aiodone() -> None:
    vm = machine()
    fs, vp, uvn, pgs = dirty_progfs(vm, 2, (0,))
    gate = Gate("write")
    fs.hooks.append(gate)
    pg = pgs[0]
    with uvn.vmobjlock:
        pg.pg_flags |= PG_BUSY
        assert uvn_put(uvn, [pg], 1, 0) == VM_PAGER_PEND
        assert uvn.u_nio == 1
    gate.wait_entered()
    # the write is in flight: the page is still busy and dirty
    assert pg.pg_flags & PG_BUSY and pmap_is_modified(pg)
    gate.open()
    vm.aiodaemon.drain()
    assert not pg.pg_flags & PG_BUSY and pg.pg_flags & PG_CLEAN and not pmap_is_modified(pg)
    assert uvn.u_nio == 0 and vp.v_data.data.pread(0, 4) == b"new0"
    assert vm.uvmexp.write_ios == 1 and vm.uvmexp.pageouts == 1
    vm.check_invariants()


def test_uvn_aiodone_wakes_a_thread_waiting_for_the_page() -> None:
    vm = machine()
    fs, vp, uvn, pgs = dirty_progfs(vm, 2, (1,))
    gate = Gate("write")
    fs.hooks.append(gate)
    with uvn.vmobjlock:
        assert uvn_flush(uvn, 0, 0, PGO_CLEANIT | PGO_ALLPAGES)  # started
    gate.wait_entered()
    # a synchronous flush meanwhile waits for the write in flight (IOSYNC)
    syncer = start(lambda: flush(uvn, 0, 0, PGO_CLEANIT | PGO_SYNCIO | PGO_ALLPAGES), "msync")
    wait_sleeping("uvn_flush")
    gate.open()
    assert syncer.join_ok() is True
    assert pgs[1].pg_flags & PG_CLEAN and vp.v_data.data.pread(PS, 4) == b"new1"
    assert vm.uvmexp.write_ios == 1  # the sync flush found nothing left to write


def test_uvn_aiodone_frees_released_pages() -> None:
    vm = machine()
    _, vp, uvn, pgs = dirty_progfs(vm, 3, (0, 1, 2))
    with uvn.vmobjlock:
        assert uvn_flush(uvn, 0, 0, PGO_CLEANIT | PGO_FREE | PGO_ALLPAGES)
    vm.aiodaemon.drain()
    assert all(pg.pg_flags & PQ_FREE for pg in pgs) and uvn.uo_npages == 0
    assert vp.v_data.data.pread(2 * PS, 4) == b"new2" and vm.uvmexp.write_ios == 1
    vm.check_invariants()


def test_uvn_aiodone_keeps_pages_dirty_and_records_the_error() -> None:
    vm = machine()
    fs, vp, uvn, pgs = dirty_progfs(vm, 2, (0, 1))
    fs.fail["write"] = errno.ENOSPC
    with uvn.vmobjlock:
        assert uvn_flush(uvn, 0, 0, PGO_CLEANIT | PGO_FREE | PGO_ALLPAGES)
    vm.aiodaemon.drain()
    # released pages whose write failed are not freed: they stay, dirty
    assert uvn.uo_npages == 2 and uvn.u_error == errno.ENOSPC and uvn.u_errseq == 1
    assert all(not pg.pg_flags & (PG_BUSY | PG_CLEAN) for pg in pgs)
    del fs.fail["write"]
    assert flush(uvn, 0, 0, PGO_CLEANIT | PGO_SYNCIO | PGO_ALLPAGES)
    assert vp.v_data.data.pread(PS, 4) == b"new1"


def test_page_daemon_returns_while_its_write_is_in_flight() -> None:
    vm = machine(pages=16)
    fs, _, uvn, pgs = dirty_progfs(vm, 8, tuple(range(8)))
    flush(uvn, 0, 0, PGO_DEACTIVATE | PGO_ALLPAGES)  # inactive and dirty
    with vm.pageqlock:
        free = len(vm.page_free)
    gate = Gate("write")
    fs.hooks.append(gate)
    # take the free pages away so the daemon has a shortage to work on
    _, hog = mkfile(vm, pattern(free))
    getpages(hog, 0, free - 1)
    uvmpd_scan(vm)  # returns: it does not wait for the write it started
    gate.wait_entered()
    assert vm.uvmexp.pdpageouts >= 1 and any(pg.pg_flags & PG_BUSY for pg in pgs)
    gate.open()
    vm.aiodaemon.drain()
    written = [pg for pg in pgs if pg.uobject is uvn and pg.pg_flags & PG_CLEAN]
    assert written and all(pg.pg_flags & PQ_INACTIVE for pg in written)
    uvmpd_scan(vm)  # the next scan frees the pages the write cleaned
    assert vm.uvmexp.pdfreed >= 1
    vm.check_invariants()


def test_uvn_detach_drains_the_asynchronous_writes_of_a_dying_object() -> None:
    vm = machine()
    fs, vp, uvn, _pgs = dirty_progfs(vm, 4, (0, 3))
    with uvn.vmobjlock:
        uvn.u_flags &= ~0x002  # not CANPERSIST: the last detach kills it
    gate = Gate("write")
    fs.hooks.append(gate)
    dying = start(lambda: uvn_detach(uvn), "detach")
    gate.wait_entered()
    wait_sleeping("uvn_term")  # RELKILL: waiting for the write in flight
    gate.open()
    dying.join_ok()
    assert uvn.u_flags == 0 and uvn.uo_npages == 0
    data = vp.v_data.data
    assert data.pread(0, 4) == b"new0" and data.pread(3 * PS, 4) == b"new3"
    vm.check_invariants()


def test_uvn_record_error_counts_each_failure() -> None:
    vm = machine()
    _, uvn = mkfile(vm, pattern(1))
    with uvn.vmobjlock:
        uvn_record_error(uvn, errno.EIO)
        uvn_record_error(uvn, errno.ENOSPC)
    assert (uvn.u_error, uvn.u_errseq, vm.uvmexp.write_errors) == (errno.ENOSPC, 2, 2)


def test_synchronous_vm_has_no_aio_daemon() -> None:
    vm = machine(async_pageout=False)
    _, _, uvn, pgs = dirty_progfs(vm, 1, (0,))
    assert vm.aiodaemon is None
    with uvn.vmobjlock:
        pgs[0].pg_flags |= PG_BUSY
        assert uvn_put(uvn, [pgs[0]], 1, 0) == VM_PAGER_OK
        pgs[0].pg_flags &= ~PG_BUSY



def test_uvn_aiodone_records_our_mtime_so_the_next_attach_keeps_the_pages(tmp_path: Path) -> None:
    """A write-back of ours (here an asynchronous one, as the page daemon's)
    changes the file's mtime: it is recorded, so close-to-open does not take
    it for another program's write and drop the persisting pages."""
    path = tmp_path / "f"
    path.write_bytes(pattern(4))
    os.utime(path, ns=(0, 0))  # so that any write of ours gives it another mtime
    vm = VM(physmem=64 * PS, pagedaemon=False)
    try:
        vm.pwrite(path, b"ours", 0)  # dirty; the object persists
        vp = vnode_of(vm, path)
        uvn = vp.v_uvm
        vm.vfs.vrele(vp)
        assert flush(uvn, 0, 0, PGO_CLEANIT | PGO_ALLPAGES)  # asynchronous, then drained
        assert path.read_bytes()[:4] == b"ours" and os.stat(path).st_mtime_ns != 0
        pageins = vm.stats()["pageins"]
        assert vm.pread(path, PS, 0) == b"ours" + pattern(1)[4:]
        assert vm.stats()["pageins"] == pageins  # the page was kept, not read again
    finally:
        vm.close()
