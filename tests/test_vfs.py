"""vfs: the vnode free list and recycling, unmounting, hostfs transfers."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from helpers import getpages, machine, mkfile, pattern, progfs
from vnpager import VM
from vnpager.uvm.uvm_vnode import UVM_VNODE_VALID, uvn_detach
from vnpager.vfs.hostfs import hostfs_vget_path
from vnpager.vfs.memfs import memfs_create
from vnpager.vfs.mount import MNT_FORCE, vref, vrele
from vnpager.vfs.vnode import (
    UIO_READ,
    UIO_WRITE,
    VBAD,
    VOP_GETATTR,
    VOP_READ,
    VOP_WRITE,
    Uio,
    Vattr,
    Vnode,
    vn_lock,
)


def test_vref_vrele_move_vnode_on_and_off_free_list(vm: VM) -> None:
    vp = memfs_create(vm.vfs, vm.memfs, b"x")
    assert vp.v_usecount == 1 and vp not in vm.vfs.free_list
    vrele(vp)
    assert vp in vm.vfs.free_list
    vref(vp)
    assert vp.v_usecount == 1 and vp not in vm.vfs.free_list
    assert vm.vfs.lookup(vm.memfs, vp.v_key) is vp and vp.v_usecount == 2


def test_vrele_without_reference_panics(vm: VM) -> None:
    vp = memfs_create(vm.vfs, vm.memfs, b"x")
    vrele(vp)
    with pytest.raises(AssertionError, match="no references"):
        vrele(vp)


def test_getnewvnode_recycles_oldest_free_vnode_through_terminate() -> None:
    vm = machine(desiredvnodes=2)
    old, uvn = mkfile(vm, pattern(2))
    getpages(uvn, 0, 2)
    uvn_detach(uvn)
    vrele(old)
    newer = memfs_create(vm.vfs, vm.memfs, b"b")
    vrele(newer)
    assert list(vm.vfs.free_list) == [old, newer]
    third = memfs_create(vm.vfs, vm.memfs, b"c")
    assert third is old and vm.vfs.numvnodes == 2
    assert not uvn.u_flags & UVM_VNODE_VALID and uvn.uo_npages == 0
    assert vm.vfs.free_list == {newer: None}


def test_getnewvnode_grows_when_nothing_is_free() -> None:
    vm = machine(desiredvnodes=1)
    a = memfs_create(vm.vfs, vm.memfs, b"a")
    b = memfs_create(vm.vfs, vm.memfs, b"b")
    assert a is not b and vm.vfs.numvnodes == 2


def test_getnewvnode_same_key_returns_existing(vm: VM) -> None:
    vp = memfs_create(vm.vfs, vm.memfs, b"a", name="same")
    again = memfs_create(vm.vfs, vm.memfs, b"b", name="same")
    assert again is vp and vp.v_usecount == 2


def test_dounmount_busy_without_force(vm: VM) -> None:
    _, mp = progfs(vm)
    used = memfs_create(vm.vfs, mp, b"used")
    unused = memfs_create(vm.vfs, mp, b"unused")
    vrele(unused)
    assert vm.vfs.dounmount(mp) == errno.EBUSY
    assert unused.v_type == VBAD and used.v_mount is mp and mp in vm.vfs.mountlist
    vrele(used)
    assert vm.vfs.dounmount(mp) == 0 and mp not in vm.vfs.mountlist
    with pytest.raises(OSError, match="not mounted"):
        memfs_create(vm.vfs, mp, b"late")


def test_dounmount_force_kills_vnodes_in_use(vm: VM) -> None:
    _, mp = progfs(vm)
    vp = memfs_create(vm.vfs, mp, b"used")
    numvnodes = vm.vfs.numvnodes
    assert vm.vfs.dounmount(mp, MNT_FORCE) == 0
    assert vp.v_type == VBAD and vp.v_mount is None and vm.vfs.numvnodes == numvnodes
    assert VOP_GETATTR(vp, Vattr()) == errno.EBADF
    vrele(vp)  # the last user lets it go
    assert vm.vfs.numvnodes == numvnodes - 1 and vp not in vm.vfs.free_list


def transfer(vp: Vnode, rw: int, offset: int, buf: bytearray) -> tuple[int, int]:
    uio = Uio([memoryview(buf)], offset, len(buf), rw)
    assert vn_lock(vp) == 0
    try:
        error = VOP_READ(vp, uio) if rw == UIO_READ else VOP_WRITE(vp, uio)
    finally:
        vp.v_lock.unlock()
    return error, uio.resid


def test_hostfs_read_write_through_uio(vm: VM, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"hello world")
    vp = hostfs_vget_path(vm.vfs, vm.hostfs, str(path))
    buf = bytearray(20)
    assert transfer(vp, UIO_READ, 6, buf) == (0, 15)  # 5 bytes, then end of file
    assert buf[:5] == b"world"
    assert transfer(vp, UIO_WRITE, 6, bytearray(b"there")) == (0, 0)
    assert path.read_bytes() == b"hello there"
    vattr = Vattr()
    assert VOP_GETATTR(vp, vattr) == 0 and vattr.va_size == 11
    assert hostfs_vget_path(vm.vfs, vm.hostfs, str(path)) is vp  # one vnode per file


def test_vn_lock_of_recycled_vnode_is_enoent(vm: VM) -> None:
    _, mp = progfs(vm)
    vp = memfs_create(vm.vfs, mp, b"x")
    vm.vfs.dounmount(mp, MNT_FORCE)
    assert vn_lock(vp) == errno.ENOENT and not vp.v_lock.locked()
