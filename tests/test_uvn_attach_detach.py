"""uvn_init, uvn_attach, uvn_reference, uvn_detach, uvm_vnp_terminate and
uvm_vnp_uncache: the life of a vnode's VM object."""

from __future__ import annotations

import errno

import pytest

from helpers import PS, RW, Pmap, contents, get_busy, getpages, machine, mkfile, pattern, progfs, store
from vnpager import VM
from vnpager.kern.debug import Panic
from vnpager.kern.lock import LK_EXCLUSIVE
from vnpager.kern.proc import curproc
from vnpager.uvm import uvm_vnode
from vnpager.uvm.uvm_page import PQ_FREE, PQ_INACTIVE, VmPage
from vnpager.uvm.uvm_pager import VM_PAGER_ERROR
from vnpager.uvm.uvm_param import PROT_READ
from vnpager.uvm.uvm_vnode import (
    UVM_VNODE_CANPERSIST,
    UVM_VNODE_VALID,
    UVM_VNODE_WRITEABLE,
    uvm_vnp_terminate,
    uvm_vnp_uncache,
    uvn_attach,
    uvn_detach,
    uvn_init,
    uvn_reference,
)
from vnpager.vfs.memfs import memfs_create
from vnpager.vfs.mount import MNT_FORCE, vrele
from vnpager.vfs.specfs import D_TAPE, BlockDevice, bdevvp
from vnpager.vfs.vnode import VBAD, VTEXT, vn_lock


def persist(vm: VM, npages: int = 3) -> tuple[object, object, list[VmPage]]:
    """A file whose object persists with *npages* resident pages and whose
    vnode is unreferenced (on the free list)."""
    vp, uvn = mkfile(vm, pattern(npages))
    pgs = getpages(uvn, 0, npages)
    uvn_detach(uvn)
    vrele(vp)
    assert vp.v_usecount == 0 and vp in vm.vfs.free_list
    return vp, uvn, pgs


def test_uvn_init_empties_the_writeable_list(vm: VM) -> None:
    _, uvn = mkfile(vm, b"x")
    assert uvn in vm.uvn_wlist
    uvn_init(vm)
    assert not vm.uvn_wlist


def test_uvn_attach_new_object_is_valid_and_sized(vm: VM) -> None:
    vp, uvn = mkfile(vm, pattern(2, tail=10), prot=PROT_READ)
    assert uvn is vp.v_uvm
    assert uvn.u_flags == UVM_VNODE_VALID | UVM_VNODE_CANPERSIST
    assert uvn.uo_refs == 1 and uvn.u_size == 2 * PS + 10
    assert vp.v_usecount == 2  # the creator's and the object's
    assert uvn not in vm.uvn_wlist


def test_uvn_attach_valid_bumps_references_and_joins_writeable_list(vm: VM) -> None:
    vp, uvn = mkfile(vm, b"abc", prot=PROT_READ)
    assert uvn_attach(vp, PROT_READ) is uvn
    assert uvn.uo_refs == 2 and vp.v_usecount == 2  # no second vnode reference
    assert not uvn.u_flags & UVM_VNODE_WRITEABLE
    assert uvn_attach(vp, RW) is uvn
    assert uvn.u_flags & UVM_VNODE_WRITEABLE and uvn in vm.uvn_wlist
    assert uvn_attach(vp, RW) is uvn  # already on the list: stays once
    assert list(vm.uvn_wlist).count(uvn) == 1 and uvn.uo_refs == 4


def test_uvn_attach_persisting_object_regains_vnode_reference_without_io(vm: VM) -> None:
    vp, uvn, pgs = persist(vm)
    assert uvn.uo_refs == 0 and uvn.u_flags & UVM_VNODE_VALID
    assert all(pg.pg_flags & PQ_INACTIVE for pg in pgs)
    reads = vm.uvmexp.read_ios
    assert uvn_attach(vp, PROT_READ) is uvn
    assert uvn.uo_refs == 1 and vp.v_usecount == 1 and vp not in vm.vfs.free_list
    assert getpages(uvn, 0, 3) == pgs
    assert vm.uvmexp.read_ios == reads
    assert bytes(pgs[2].data[:4]) == b"\x03" * 4


def test_uvn_attach_block_device_takes_size_from_partition(vm: VM) -> None:
    dev = BlockDevice("sd0a", secsize=512, psize=64)
    vp = bdevvp(vm.vfs, vm.specfs, dev)
    uvn = uvn_attach(vp, RW)
    assert uvn is not None and uvn.u_size == 512 * 64


def test_uvn_attach_block_device_must_be_a_disk(vm: VM) -> None:
    vp = bdevvp(vm.vfs, vm.specfs, BlockDevice("st0", 512, 8, d_type=D_TAPE))
    curproc().p_errno = errno.ESTALE  # an earlier call's: not this one's
    assert uvn_attach(vp, PROT_READ) is None
    assert vp.v_uvm.u_flags == 0 and vp.v_usecount == 1 and curproc().p_errno == 0


def test_uvn_attach_block_device_partition_ioctl_failure(vm: VM) -> None:
    vp = bdevvp(vm.vfs, vm.specfs, BlockDevice("sd1a", 512, 8, fail_ioctl=errno.ENXIO))
    assert uvn_attach(vp, PROT_READ) is None
    assert curproc().p_errno == errno.ENXIO and vp.v_uvm.u_flags == 0


def test_uvn_attach_getattr_failure_returns_none(vm: VM) -> None:
    fs, mp = progfs(vm)
    vp = memfs_create(vm.vfs, mp, b"data")
    fs.fail["getattr"] = errno.ESTALE
    assert uvn_attach(vp, RW) is None
    assert curproc().p_errno == errno.ESTALE
    assert vp.v_uvm.u_flags == 0 and vp.v_usecount == 1 and not vm.uvn_wlist
    del fs.fail["getattr"]
    assert uvn_attach(vp, RW) is vp.v_uvm  # a later attach starts afresh


def test_uvn_reference_adds_a_reference(vm: VM) -> None:
    _, uvn = mkfile(vm, b"x")
    uvn_reference(uvn)
    assert uvn.uo_refs == 2
    uvn_detach(uvn)
    assert uvn.uo_refs == 1 and uvn.u_flags & UVM_VNODE_VALID


def test_uvn_reference_of_invalid_object_panics(vm: VM) -> None:
    vp = memfs_create(vm.vfs, vm.memfs, b"x")
    with pytest.raises(Panic, match="uvn_reference"):
        uvn_reference(vp.v_uvm)


def test_uvn_detach_not_last_keeps_object(vm: VM) -> None:
    vp, uvn = mkfile(vm, pattern(1))
    uvn_attach(vp, PROT_READ)
    vp.v_flag |= VTEXT
    uvn_detach(uvn)
    assert uvn.uo_refs == 1 and vp.v_usecount == 2 and vp.v_flag & VTEXT


def test_uvn_detach_last_with_canpersist_deactivates_and_persists(vm: VM) -> None:
    vp, uvn = mkfile(vm, pattern(2))
    pgs = getpages(uvn, 0, 2)
    pm = Pmap(vm)
    store(pm, pgs[0], b"dirty")
    vp.v_flag |= VTEXT
    writes = vm.uvmexp.write_ios
    uvn_detach(uvn)
    assert uvn.uo_refs == 0 and uvn.u_flags & UVM_VNODE_VALID
    assert vp.v_usecount == 1 and not vp.v_flag & VTEXT
    assert uvn.uo_npages == 2 and all(pg.pg_flags & PQ_INACTIVE and not pg.pv for pg in pgs)
    assert vm.uvmexp.write_ios == writes  # persisting writes nothing
    assert uvn in vm.uvn_wlist  # still dirty: sync must find it


def test_uvn_detach_last_visits_only_the_pages_used_since(monkeypatch: pytest.MonkeyPatch) -> None:
    # the seed's detach deactivates every resident page: a vm.pread of one
    # page of a persisting object then cost in proportion to the whole cache
    vm = machine(256)
    try:
        vp, uvn = mkfile(vm, pattern(128), prot=PROT_READ)
        pgs = getpages(uvn, 0, 128)
        uvn_detach(uvn)  # persists with 128 inactive pages
        assert all(pg.pg_flags & PQ_INACTIVE for pg in pgs)
        deactivated: list[VmPage] = []
        real = uvm_vnode.uvm_pagedeactivate_run

        def counting(pgs: list[VmPage]) -> None:
            deactivated.extend(pgs)
            real(pgs)

        monkeypatch.setattr(uvm_vnode, "uvm_pagedeactivate_run", counting)
        assert vm.pread(vp, 4, 77 * PS) == bytes([78]) * 4
        assert deactivated == [pgs[77]]
        assert uvn.uo_refs == 0 and uvn.uo_npages == 128
        assert all(pg.pg_flags & PQ_INACTIVE for pg in pgs)
        vm.check_invariants()
    finally:
        vm.close()


def test_uvn_detach_last_without_canpersist_kills_object(vm: VM) -> None:
    vp, uvn = mkfile(vm, pattern(3))
    pgs = getpages(uvn, 0, 3)
    store(Pmap(vm), pgs[1], b"dirty")
    assert uvm_vnp_uncache(vp) is False  # still referenced: dies at last detach
    uvn_detach(uvn)
    assert uvn.u_flags == 0 and uvn.uo_npages == 0
    assert uvn not in vm.uvn_wlist and vp.v_usecount == 1
    assert contents(vp)[PS:PS + 5] == b"dirty"
    assert all(pg.pg_flags & PQ_FREE for pg in pgs)


def test_uvn_detach_unwritable_pages_keep_object_alive(vm: VM) -> None:
    fs, mp = progfs(vm)
    vp, uvn = mkfile(vm, pattern(2), mp=mp)
    pgs = getpages(uvn, 0, 2)
    store(Pmap(vm), pgs[0], b"lost?")
    uvm_vnp_uncache(vp)
    fs.fail["write"] = errno.ENOSPC
    uvn_detach(uvn)
    # our improvement: the dirty page and its error stay, the clean one goes
    assert uvn.u_flags & UVM_VNODE_VALID and uvn.uo_refs == 0
    assert list(uvn.memt.values()) == [pgs[0]]
    assert uvn.u_error == errno.ENOSPC and uvn.u_errseq == 1
    assert uvn in vm.uvn_wlist and vp.v_usecount == 1
    # once the disk has room, the next sync writes it and the object dies
    del fs.fail["write"]
    vm.vfs.sync(None)
    assert uvn.u_flags == 0 and uvn.uo_npages == 0
    assert contents(vp)[:5] == b"lost?"


def test_uvm_vnp_terminate_recycling_frees_persisting_object() -> None:
    vm = machine(desiredvnodes=2)
    vp, uvn, pgs = persist(vm, 2)
    other = memfs_create(vm.vfs, vm.memfs, b"other")
    assert vm.vfs.numvnodes == 2
    newest = memfs_create(vm.vfs, vm.memfs, b"third")  # recycles vp
    assert newest is vp and uvn.u_flags == 0 and uvn.uo_npages == 0
    assert uvn not in vm.uvn_wlist
    assert all(pg.pg_flags & PQ_FREE for pg in pgs)
    assert vm.uvmexp.lostpages == 0 and other.v_usecount == 1
    # the recycled vnode's object starts afresh for its new file
    uvn2 = uvn_attach(newest, PROT_READ)
    assert uvn2 is uvn and uvn.u_size == 5
    vm.check_invariants()


def test_uvm_vnp_terminate_recycling_writes_dirty_pages_first() -> None:
    vm = machine(desiredvnodes=1)
    vp, uvn = mkfile(vm, pattern(2))
    data = vp.v_data.data
    pg = getpages(uvn, PS, 1)[0]
    store(Pmap(vm), pg, b"keep")
    uvn_detach(uvn)
    vrele(vp)
    memfs_create(vm.vfs, vm.memfs, b"new")
    assert data.pread(PS, 4) == b"keep" and uvn.u_flags == 0


def test_uvm_vnp_terminate_gives_up_unwritable_pages_and_counts_them() -> None:
    vm = machine(desiredvnodes=1)
    fs, mp = progfs(vm)
    vp, uvn = mkfile(vm, pattern(2), mp=mp)
    pgs = getpages(uvn, 0, 2)
    store(Pmap(vm), pgs[1], b"doomed")
    uvn_detach(uvn)
    vrele(vp)
    fs.fail["write"] = errno.EIO
    memfs_create(vm.vfs, mp, b"new")
    assert uvn.u_flags == 0 and uvn.uo_npages == 0
    assert vm.uvmexp.lostpages == 1 and vm.uvmexp.write_errors == 1
    # the vnode now holds another file: the old file's error is not its own
    assert (uvn.u_error, uvn.u_errseq) == (0, 0)
    vm.check_invariants()


def test_uvm_vnp_terminate_forced_unmount_object_lives_on_dead(vm: VM) -> None:
    _fs, mp = progfs(vm)
    vp, uvn = mkfile(vm, pattern(2), mp=mp)
    data = vp.v_data.data
    pgs = getpages(uvn, 0, 2)
    store(Pmap(vm), pgs[0], b"saved")
    assert vm.vfs.dounmount(mp) == errno.EBUSY
    assert vm.vfs.dounmount(mp, MNT_FORCE) == 0
    assert vp.v_type == VBAD and vp.v_mount is None
    assert uvn.u_flags & UVM_VNODE_VALID and not uvn.u_flags & UVM_VNODE_CANPERSIST
    assert uvn.uo_refs == 1 and uvn.uo_npages == 0
    assert data.pread(0, 5) == b"saved"
    # later I/O fails with an error, never hangs
    lock = uvn.vmobjlock
    result, _ = get_busy(uvn, 0, 1)
    assert result == VM_PAGER_ERROR and curproc().p_errno
    assert not lock.rw_lock_held() and uvn.uo_npages == 0
    # the last detach kills it and lets the dead vnode go
    numvnodes = vm.vfs.numvnodes
    uvn_detach(uvn)
    vrele(vp)
    assert uvn.u_flags == 0 and vp.v_usecount == 0 and uvn not in vm.uvn_wlist
    assert vm.vfs.numvnodes == numvnodes - 1


def test_uvm_vnp_terminate_of_invalid_or_objectless_vnode_does_nothing(vm: VM) -> None:
    vp = memfs_create(vm.vfs, vm.memfs, b"x")
    vn_lock(vp, LK_EXCLUSIVE)
    uvm_vnp_terminate(vp)
    vp.v_lock.unlock()
    assert vp.v_uvm.u_flags == 0
    vp.v_uvm = None
    uvm_vnp_terminate(vp)


def test_uvm_vnp_uncache_of_unattached_vnode_is_true(vm: VM) -> None:
    vp = memfs_create(vm.vfs, vm.memfs, b"x")
    assert uvm_vnp_uncache(vp) is True


def test_uvm_vnp_uncache_kills_persisting_object(vm: VM) -> None:
    vp, uvn, pgs = persist(vm, 2)
    store(Pmap(vm), pgs[1], b"flushed")
    data = vp.v_data.data
    vm.vfs.vref(vp)
    vn_lock(vp, LK_EXCLUSIVE)
    assert uvm_vnp_uncache(vp) is True
    assert vp.v_lock.held()  # given back locked
    vp.v_lock.unlock()
    assert uvn.u_flags == 0 and uvn.uo_npages == 0 and vp.v_usecount == 1
    assert data.pread(PS, 7) == b"flushed"


def test_uvm_vnp_uncache_of_active_object_defers_death(vm: VM) -> None:
    vp, uvn = mkfile(vm, b"abc")
    assert uvm_vnp_uncache(vp) is False
    assert uvn.u_flags & UVM_VNODE_VALID and not uvn.u_flags & UVM_VNODE_CANPERSIST



def test_uvm_vnp_terminate_recycling_read_only_persisting_object() -> None:
    vm = machine(desiredvnodes=1)
    vp, uvn = mkfile(vm, pattern(1), prot=PROT_READ)
    getpages(uvn, 0, 1)
    uvn_detach(uvn)
    vrele(vp)
    assert uvn not in vm.uvn_wlist
    memfs_create(vm.vfs, vm.memfs, b"new")
    assert uvn.u_flags == 0 and uvn.uo_npages == 0
