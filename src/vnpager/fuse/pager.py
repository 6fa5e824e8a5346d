"""What the FUSE file system asks of the pager, one function per request.

Each of these may sleep (for pages, memory, the vnode lock, I/O), so the
file system runs them in worker threads, never on the event loop.
Files are named by host path or by hostfs vnode key ``(st_dev, st_ino)``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from vnpager.kern.lock import LK_EXCLUSIVE
from vnpager.uvm.uvm_bio import ubc_write
from vnpager.uvm.uvm_param import PROT_READ, PROT_WRITE
from vnpager.uvm.uvm_vnode import (
    UVM_VNODE_VALID,
    uvm_vnp_sync,
    uvm_vnp_uncache,
    uvm_vnp_wrote,
)
from vnpager.vfs.hostfs import HostNode
from vnpager.vfs.mount import MNT_FORCE
from vnpager.vfs.vnode import VOP_FSYNC, VOP_UNLOCK, Vnode, vn_lock
from vnpager.vnmap import FileObject

if TYPE_CHECKING:
    from vnpager.uvm.uvm import VM


def open_object(vm: VM, path: str, write: bool) -> FileObject:
    """Attach the object of *path* for an open (PROT_WRITE if *write*;
    EACCES if the backing file is read-only)."""
    return FileObject.open(vm, path, PROT_READ | (PROT_WRITE if write else 0))


def truncate(vm: VM, path: str, size: int, f: FileObject | None) -> None:
    """Set the size of *path* (whose open object *f* may be given)."""
    if f is not None:
        f.setsize(size)
        return
    with open_object(vm, path, write=True) as f:
        f.setsize(size)


def write(f: FileObject, buf: bytes, off: int) -> int:
    """Copy *buf* into the object's pages at *off*; then stamp the host
    file's mtime and ctime now, as a kernel's write does (the write-back
    would, but only later), and record the stamp as ours (uvm_vnp_wrote)
    so that the next attach does not take it for a change from outside."""
    n = ubc_write(f.uvn, buf, off)
    vp = f.uvn.u_vnode
    if isinstance(vp.v_data, HostNode):
        os.utime(vp.v_data.fd)
        uvm_vnp_wrote(vp)
    return n


def fsync(f: FileObject) -> None:
    """Write the object's dirty pages (uvn_flush, SYNCIO), then fsync the host file."""
    f.sync()
    error = VOP_FSYNC(f.uvn.u_vnode)
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
            FileObject.attach(vp, PROT_READ).close(sync=True)
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


def shutdown(vm: VM, objects: list[FileObject]) -> None:
    """Unmount time: detach what is still open, write every dirty page
    (uvm_vnp_sync), terminate every object (forced unmount), stop the VM."""
    for f in objects:
        f.close()
    uvm_vnp_sync(vm)
    vm.vfs.dounmount(vm.hostfs, MNT_FORCE)
    vm.close()
