"""uvm_vnp_setsize, uvm_vnp_sync, uvn_cluster, and the error and revalidation
hooks the front ends call."""

from __future__ import annotations

import errno

import pytest

from helpers import PS, contents, flush, getpages, mkfile, pattern, progfs, store
from vnpager import VM
from vnpager.kern.debug import Panic
from vnpager.kern.lock import kernel_lock
from vnpager.uvm.pmap import Pmap, pmap_is_modified
from vnpager.uvm.uvm_page import PG_CLEAN, PQ_FREE
from vnpager.uvm.uvm_pager import PGO_ALLPAGES, PGO_CLEANIT, PGO_SYNCIO
from vnpager.uvm.uvm_param import MAXBSIZE, PROT_READ
from vnpager.uvm.uvm_vnode import (
    UVM_VNODE_WRITEABLE,
    uvm_vnp_revalidate,
    uvm_vnp_setsize,
    uvm_vnp_sync,
    uvm_vnp_wrote,
    uvn_cluster,
    uvn_detach,
    uvn_errseq_check,
    uvn_errseq_sample,
)
from vnpager.vfs.memfs import memfs_create
from vnpager.vfs.mount import vrele
from vnpager.vfs.vnode import Vnode


def setsize(vp: Vnode, size: int) -> None:
    with kernel_lock:
        uvm_vnp_setsize(vp, size)


def test_uvm_vnp_setsize_grow_changes_only_the_size(vm: VM) -> None:
    vp, uvn = mkfile(vm, pattern(2))
    pgs = getpages(uvn, 0, 2)
    setsize(vp, 10 * PS)
    assert uvn.u_size == 10 * PS and list(uvn.memt.values()) == pgs
    assert bytes(pgs[1].data[:2]) == b"\x02\x02"


def test_uvm_vnp_setsize_shrink_tosses_pages_past_the_end_unwritten(vm: VM) -> None:
    vp, uvn = mkfile(vm, pattern(4))
    pgs = getpages(uvn, 0, 4)
    store(Pmap(vm), pgs[3], b"gone")
    setsize(vp, 2 * PS)
    assert uvn.u_size == 2 * PS and list(uvn.memt.values()) == pgs[:2]
    assert all(pg.pg_flags & PQ_FREE for pg in pgs[2:])
    assert vm.uvmexp.write_ios == 0 and contents(vp)[3 * PS:3 * PS + 4] == b"\x04" * 4


def test_uvm_vnp_setsize_shrink_keeps_bytes_before_end_in_partial_page(vm: VM) -> None:
    vp, uvn = mkfile(vm, pattern(3))
    pgs = getpages(uvn, 0, 3)
    store(Pmap(vm), pgs[1], b"kept", at=100)
    setsize(vp, PS + 104)
    assert list(uvn.memt.values()) == pgs[:2]
    assert bytes(pgs[1].data[:100]) == b"\x02" * 100 and bytes(pgs[1].data[100:104]) == b"kept"
    assert bytes(pgs[1].data[104:]) == bytes(PS - 104)
    # the page is still dirty: a flush writes the bytes before the end only
    assert pmap_is_modified(pgs[1])
    assert flush(uvn, 0, 0, PGO_CLEANIT | PGO_SYNCIO | PGO_ALLPAGES)
    assert contents(vp)[PS + 100:PS + 104] == b"kept"


def test_uvm_vnp_setsize_shrink_partial_page_not_resident(vm: VM) -> None:
    vp, uvn = mkfile(vm, pattern(3))
    pgs = getpages(uvn, 2 * PS, 1)
    setsize(vp, PS + 5)
    assert uvn.uo_npages == 0 and pgs[0].pg_flags & PQ_FREE


def test_uvm_vnp_setsize_shrink_to_page_boundary(vm: VM) -> None:
    vp, uvn = mkfile(vm, pattern(2))
    pgs = getpages(uvn, 0, 2)
    setsize(vp, PS)
    assert list(uvn.memt.values()) == [pgs[0]] and bytes(pgs[0].data[-2:]) == b"\x01\x01"


def test_uvm_vnp_setsize_of_unattached_vnode_does_nothing(vm: VM) -> None:
    vp = memfs_create(vm.vfs, vm.memfs, b"abc")
    setsize(vp, 1)
    assert vp.v_uvm.u_size == 0


def test_uvm_vnp_setsize_requires_kernel_lock(vm: VM) -> None:
    vp, _ = mkfile(vm, b"abc")
    with pytest.raises(Panic, match="kernel lock"):
        uvm_vnp_setsize(vp, 1)


def test_uvm_vnp_sync_writes_dirty_pages_of_writeable_objects(vm: VM) -> None:
    vp, uvn = mkfile(vm, pattern(3))
    pgs = getpages(uvn, 0, 3)
    store(Pmap(vm), pgs[2], b"sync")
    uvm_vnp_sync(vm)
    assert contents(vp)[2 * PS:2 * PS + 4] == b"sync" and pgs[2].pg_flags & PG_CLEAN
    # still referenced by another: stays on the writeable list
    assert uvn in vm.uvn_wlist and uvn.uo_refs == 1


def test_uvm_vnp_sync_ignores_read_only_objects(vm: VM) -> None:
    vp, uvn = mkfile(vm, pattern(1), prot=PROT_READ)
    store(Pmap(vm), getpages(uvn, 0, 1)[0], b"nope")
    uvm_vnp_sync(vm)
    assert vm.uvmexp.write_ios == 0 and contents(vp)[:4] == b"\x01" * 4


def test_uvm_vnp_sync_per_mount(vm: VM) -> None:
    _, mp = progfs(vm)
    here, uvn_here = mkfile(vm, pattern(1), mp=mp)
    there, uvn_there = mkfile(vm, pattern(1))
    pm = Pmap(vm)
    store(pm, getpages(uvn_here, 0, 1)[0], b"here")
    store(pm, getpages(uvn_there, 0, 1)[0], b"there")
    uvm_vnp_sync(vm, mp)
    assert contents(here)[:4] == b"here" and contents(there)[:5] == b"\x01" * 5
    uvm_vnp_sync(vm)
    assert contents(there)[:5] == b"there"


def test_uvm_vnp_sync_drops_clean_persisting_object_from_writeable_list(vm: VM) -> None:
    vp, uvn = mkfile(vm, pattern(2))
    store(Pmap(vm), getpages(uvn, 0, 2)[1], b"late")
    uvn_detach(uvn)
    vrele(vp)
    assert uvn.uo_refs == 0 and uvn in vm.uvn_wlist
    uvm_vnp_sync(vm)
    assert contents(vp)[PS:PS + 4] == b"late"
    assert uvn not in vm.uvn_wlist and not uvn.u_flags & UVM_VNODE_WRITEABLE
    # the sync's references are gone: the object persists, the vnode is free
    assert uvn.uo_refs == 0 and uvn.uo_npages == 2
    assert vp.v_usecount == 0 and vp in vm.vfs.free_list
    writes = vm.uvmexp.write_ios
    uvm_vnp_sync(vm)
    assert vm.uvmexp.write_ios == writes


def test_uvm_vnp_sync_keeps_object_whose_write_failed_on_writeable_list(vm: VM) -> None:
    fs, mp = progfs(vm)
    vp, uvn = mkfile(vm, pattern(1), mp=mp)
    store(Pmap(vm), getpages(uvn, 0, 1)[0], b"full")
    uvn_detach(uvn)
    vrele(vp)
    fs.fail["write"] = errno.ENOSPC
    uvm_vnp_sync(vm)
    assert uvn in vm.uvn_wlist and uvn.u_error == errno.ENOSPC
    del fs.fail["write"]
    uvm_vnp_sync(vm)
    assert uvn not in vm.uvn_wlist and contents(vp)[:4] == b"full"


def test_uvn_cluster_is_maxbsize_from_offset(vm: VM) -> None:
    _, uvn = mkfile(vm, size=1 << 20)
    assert uvn_cluster(uvn, 3 * PS) == (3 * PS, 3 * PS + MAXBSIZE)


def test_uvn_cluster_is_clipped_to_rounded_size(vm: VM) -> None:
    _, uvn = mkfile(vm, size=5 * PS + 1)
    assert uvn_cluster(uvn, 2 * PS) == (2 * PS, 6 * PS)
    assert uvn_cluster(uvn, 5 * PS) == (5 * PS, 6 * PS)


def test_uvn_cluster_offset_past_end_panics(vm: VM) -> None:
    _, uvn = mkfile(vm, size=2 * PS)
    with pytest.raises(Panic, match="out of range"):
        uvn_cluster(uvn, 2 * PS)



def test_uvn_errseq_each_mapping_told_once(vm: VM) -> None:
    fs, mp = progfs(vm)
    _, uvn = mkfile(vm, pattern(1), mp=mp)
    early = uvn_errseq_sample(uvn)
    assert uvn_errseq_check(uvn, early) == (0, early)
    store(Pmap(vm), getpages(uvn, 0, 1)[0], b"fail")
    fs.fail["write"] = errno.EIO
    assert not flush(uvn, 0, 0, PGO_CLEANIT | PGO_SYNCIO | PGO_ALLPAGES)
    # a mapping made after the error, before anyone saw it, is told too
    late = uvn_errseq_sample(uvn)
    error, early = uvn_errseq_check(uvn, early)
    assert error == errno.EIO and uvn_errseq_check(uvn, early) == (0, early)
    assert uvn_errseq_check(uvn, late)[0] == errno.EIO
    # once seen, a new mapping starts clean
    assert uvn_errseq_check(uvn, uvn_errseq_sample(uvn))[0] == 0


def test_uvm_vnp_revalidate_follows_size_changed_behind_pager(vm: VM) -> None:
    vp, uvn = mkfile(vm, pattern(3))
    pgs = getpages(uvn, 0, 3)
    vp.v_data.data.truncate(PS + 1)
    assert uvm_vnp_revalidate(vp, drop_stale=False) == 0
    assert uvn.u_size == PS + 1 and list(uvn.memt.values()) == pgs[:2]


def test_uvm_vnp_revalidate_drops_stale_pages_of_changed_file(vm: VM) -> None:
    vp, uvn = mkfile(vm, pattern(2))
    pgs = getpages(uvn, 0, 2)
    assert uvm_vnp_revalidate(vp, drop_stale=True) == 0  # unchanged: pages kept
    assert uvn.uo_npages == 2
    vp.v_data.mtime_ns += 1  # someone else wrote the file
    seen = vp.v_data.mtime_ns
    store(Pmap(vm), pgs[0], b"mine")
    assert uvm_vnp_revalidate(vp, drop_stale=True) == 0
    assert uvn.uo_npages == 0 and uvn.u_mtime_ns == seen
    assert contents(vp)[:4] == b"mine"  # dirty pages written before the drop


def test_uvm_vnp_revalidate_getattr_error(vm: VM) -> None:
    fs, mp = progfs(vm)
    vp, _ = mkfile(vm, pattern(1), mp=mp)
    fs.fail["getattr"] = errno.ESTALE
    assert uvm_vnp_revalidate(vp, drop_stale=True) == errno.ESTALE


def test_uvm_vnp_wrote_records_our_mtime(vm: VM) -> None:
    fs, mp = progfs(vm)
    vp, uvn = mkfile(vm, pattern(1), mp=mp)
    store(Pmap(vm), getpages(uvn, 0, 1)[0], b"ours")
    assert flush(uvn, 0, 0, PGO_CLEANIT | PGO_SYNCIO | PGO_ALLPAGES)
    assert uvn.u_mtime_ns == vp.v_data.mtime_ns  # the write-back recorded it
    vp.v_data.mtime_ns += 1  # a write of ours by other means
    uvm_vnp_wrote(vp)
    assert uvn.u_mtime_ns == vp.v_data.mtime_ns
    fs.fail["getattr"] = errno.EIO
    vp.v_data.mtime_ns += 1
    uvm_vnp_wrote(vp)  # no attributes: nothing recorded
    assert uvn.u_mtime_ns != vp.v_data.mtime_ns


def test_uvn_init_names_in_traces(vm: VM) -> None:
    vp, uvn = mkfile(vm, b"x", mp=None)
    assert uvn.trace_name() == f"uvn<{vp.v_key}>"
    assert f"refs={uvn.uo_refs}" in repr(uvn)
