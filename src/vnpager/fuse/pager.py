"""What the FUSE file system asks of the pager, one function per request.

Each of these may sleep (for pages, memory, the vnode lock, I/O), so the
file system runs them in worker threads, never on the event loop.
Files are named by host path or by hostfs vnode key ``(st_dev, st_ino)``.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from vnpager.kern.lock import LK_EXCLUSIVE
from vnpager.ubc import ubc_attach, ubc_sync
from vnpager.uvm.uvm_bio import ubc_setsize
from vnpager.uvm.uvm_param import PROT_READ, PROT_WRITE
from vnpager.uvm.uvm_vnode import (
    UVM_VNODE_VALID,
    UvmVnode,
    uvm_vnp_sync,
    uvm_vnp_uncache,
    uvn_detach,
)
from vnpager.vfs.mount import MNT_FORCE
from vnpager.vfs.vnode import VOP_FSYNC, VOP_UNLOCK, Vnode, vn_lock

if TYPE_CHECKING:
    from vnpager.uvm.uvm import VM


def open_object(vm: VM, path: str, write: bool) -> UvmVnode:
    """Attach the object of *path* for an open (PROT_WRITE if *write*)."""
    uvn = ubc_attach(vm, path, PROT_READ | (PROT_WRITE if write else 0))
    if write and not uvn.u_vnode.v_data.writable:  # hostfs could only open it read-only
        uvn_detach(uvn)
        raise OSError(errno.EACCES, "the backing file is read-only")
    return uvn


def truncate(vm: VM, path: str, size: int, uvn: UvmVnode | None) -> None:
    """Set the size of *path* (whose open object *uvn* may be given)."""
    if uvn is not None:
        ubc_setsize(uvn, size)
        return
    uvn = open_object(vm, path, write=True)
    try:
        ubc_setsize(uvn, size)
    finally:
        uvn_detach(uvn)


def fsync(uvn: UvmVnode) -> None:
    """Write the object's dirty pages (uvn_flush, SYNCIO), then fsync the host file."""
    ubc_sync(uvn)
    error = VOP_FSYNC(uvn.u_vnode)
    if error:
        raise OSError(error, "fsync of the backing file failed")


def _cached_vnode(vm: VM, key: tuple[int, int]) -> Vnode | None:
    """The hostfs vnode of *key* if there is one, referenced."""
    return vm.vfs.lookup(vm.hostfs, key)


def flush_cached(vm: VM, key: tuple[int, int]) -> None:
    """Write the dirty pages of file *key*, if it has an object with any.

    Before its times are set: a later write-back would change its mtime.
    """
    vp = _cached_vnode(vm, key)
    if vp is None:
        return
    try:
        if vp.v_uvm.u_flags & UVM_VNODE_VALID:
            uvn = ubc_attach(vm, vp, PROT_READ)
            try:
                ubc_sync(uvn)
            finally:
                uvn_detach(uvn)
    finally:
        vm.vfs.vrele(vp)


def uncache(vm: VM, key: tuple[int, int]) -> None:
    """File *key* is losing a name (unlink, rename over): stop its object
    persisting, so that it dies now or at its last close."""
    vp = _cached_vnode(vm, key)
    if vp is None:
        return
    try:
        if vn_lock(vp, LK_EXCLUSIVE) == 0:
            uvm_vnp_uncache(vp)
            VOP_UNLOCK(vp)
    finally:
        vm.vfs.vrele(vp)


def cached_size(vm: VM, key: tuple[int, int]) -> int:
    """The pager's size of file *key*, or -1 if it has no object.

    Only reads: safe on the event loop (a stale answer is as good as a
    racing one)."""
    vp = vm.hostfs.mnt_vnodes.get(key)
    if vp is None or vp.v_uvm is None or not vp.v_uvm.u_flags & UVM_VNODE_VALID:
        return -1
    size: int = vp.v_uvm.u_size
    return size


def shutdown(vm: VM, objects: list[UvmVnode]) -> None:
    """Unmount time: detach what is still open, write every dirty page
    (uvm_vnp_sync), terminate every object (forced unmount), stop the VM."""
    for uvn in objects:
        uvn_detach(uvn)
    uvm_vnp_sync(vm)
    vm.vfs.dounmount(vm.hostfs, MNT_FORCE)
    vm.close()
