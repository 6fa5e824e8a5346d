"""Mounts, the vnode free list and recycling (vfs_subr.c, vfs_syscalls.c).

A :class:`Vfs` is one kernel's vnode state: its mounts, how many vnodes it
may have (``desiredvnodes``), and the free list of vnodes nobody uses, from
which :meth:`Vfs.getnewvnode` recycles the oldest once the limit is
reached.  Recycling calls vgone(), which hands the vnode's VM object to the
VM's terminate hook (uvm_vnp_terminate) before the vnode is reused.

The VM gives a Vfs three hooks, so that this layer need not import UVM:
``vnode_init`` (make ``v_uvm``), ``vnode_terminate`` (uvm_vnp_terminate)
and ``sync`` (uvm_vnp_sync for one mount).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from vnpager.kern.debug import KASSERT, panic
from vnpager.kern.lock import LK_EXCLUSIVE, LK_RETRY, Mutex
from vnpager.vfs.vnode import (
    VBAD,
    VOP_COMMIT,
    VXLOCK,
    Vnode,
    VnodeOps,
    VType,
    dead_vnodeops,
    vn_lock,
)

MNT_FORCE = 0x0008_0000


class Mount:
    """``struct mount``: one filesystem instance and its vnodes."""

    def __init__(self, vfs: Vfs, ops: VnodeOps, name: str) -> None:
        self.mnt_vfs = vfs
        self.mnt_op = ops
        self.mnt_name = name
        self.mnt_vnodes: dict[Any, Vnode] = {}
        self.mnt_unmounted = False

    def __repr__(self) -> str:
        return f"<Mount {self.mnt_op.name} {self.mnt_name}>"


class Vfs:
    """The vnode and mount state of one kernel (one VM)."""

    def __init__(self, desiredvnodes: int,
                 vnode_init: Callable[[Vnode], None],
                 vnode_terminate: Callable[[Vnode], None],
                 sync: Callable[[Mount | None], None]) -> None:
        self.desiredvnodes = desiredvnodes
        self.numvnodes = 0
        self.lock = Mutex("vnode_free_list")
        self.free_list: dict[Vnode, None] = {}  # oldest first
        self.mountlist: list[Mount] = []
        self.vnode_init = vnode_init
        self.vnode_terminate = vnode_terminate
        self.sync = sync

    # mounts
    def mount(self, ops: VnodeOps, name: str) -> Mount:
        mp = Mount(self, ops, name)
        with self.lock:
            self.mountlist.append(mp)
        return mp

    def dounmount(self, mp: Mount, flags: int = 0) -> int:
        """Unmount *mp*: sync it, then vgone its vnodes.

        Without MNT_FORCE a vnode still in use makes it fail with EBUSY
        (after the unused vnodes, and their persisting objects, are gone).
        With MNT_FORCE vnodes in use are made dead: their VM objects live on,
        and their I/O fails from then on.
        """
        self.sync(mp)
        busy = False
        for vp in list(mp.mnt_vnodes.values()):
            with self.lock:
                if vp.v_usecount and not flags & MNT_FORCE:
                    busy = True
                    continue
                if vp.v_mount is not mp:  # recycled meanwhile
                    continue
                self._unhash(vp)
            self.vgone(vp)
            with self.lock:
                if vp.v_usecount == 0:  # else it goes when its last user lets go
                    self.numvnodes -= 1
        if busy:
            return errno.EBUSY
        with self.lock:
            mp.mnt_unmounted = True
            self.mountlist.remove(mp)
        return 0

    def commit_all(self) -> list[tuple[Vnode, int]]:
        """VOP_COMMIT every vnode of the filesystems that commit (objfs
        publishes what it staged); the vnodes that failed, with the errno.
        => caller holds no vnode lock."""
        with self.lock:
            vps = [vp for mp in self.mountlist if mp.mnt_op.commits for vp in mp.mnt_vnodes.values()]
        failed = []
        for vp in vps:
            err = VOP_COMMIT(vp)
            if err:
                failed.append((vp, err))
        return failed

    # vnodes
    def lookup(self, mp: Mount, key: Any) -> Vnode | None:
        """Find the vnode *key* of *mp* and take a reference to it."""
        with self.lock:
            vp = mp.mnt_vnodes.get(key)
            if vp is not None:
                self._vref_locked(vp)
            return vp

    def getnewvnode(self, mp: Mount, vtype: VType, key: Any, data: Any = None,
                    ops: VnodeOps | None = None) -> Vnode:
        """Make a vnode for *key* on *mp*, referenced once, recycling if full.

        If another thread made the same vnode meanwhile, that one is
        returned (referenced) and *data* is reclaimed.
        """
        victim: Vnode | None = None
        with self.lock:
            if mp.mnt_unmounted:
                raise OSError(errno.ENXIO, f"{mp.mnt_name} is not mounted")
            if self.numvnodes >= self.desiredvnodes and self.free_list:
                victim = next(iter(self.free_list))
                del self.free_list[victim]
                self._unhash(victim)
                victim.v_flag |= VXLOCK
            else:
                self.numvnodes += 1
        if victim is not None:
            self.vgone(victim)
            with self.lock:
                if victim.v_usecount:  # gained a user while dying: leave it dead
                    victim = None
                    self.numvnodes += 1
        vp = victim if victim is not None else Vnode(VBAD, dead_vnodeops, None)
        vp.v_type, vp.v_op, vp.v_mount = vtype, ops or mp.mnt_op, mp
        vp.v_data, vp.v_key, vp.v_vfs, vp.v_flag, vp.v_rdev = data, key, self, 0, None
        self.vnode_init(vp)
        with self.lock:
            other = mp.mnt_vnodes.get(key)
            if other is None:
                mp.mnt_vnodes[key] = vp
                vp.v_usecount = 1
                return vp
            self._vref_locked(other)
            self.numvnodes -= 1
        vp.v_op.reclaim(vp)
        return other

    def vunhash(self, vp: Vnode) -> None:
        """Forget *vp*'s key: another file has taken it (its inode number
        reused after an unlink).  *vp* lives on for its users, unfindable,
        and is recycled from the free list as usual."""
        with self.lock:
            self._unhash(vp)

    def vref(self, vp: Vnode) -> None:
        with self.lock:
            self._vref_locked(vp)

    def _vref_locked(self, vp: Vnode) -> None:
        if vp.v_usecount == 0:
            self.free_list.pop(vp, None)
        vp.v_usecount += 1

    def vrele(self, vp: Vnode) -> None:
        """Drop a reference; an unused vnode goes on the free list."""
        with self.lock:
            if vp.v_usecount <= 0:
                panic(f"vrele: {vp!r} has no references")
            vp.v_usecount -= 1
            if vp.v_usecount == 0:
                if vp.v_mount is not None:
                    self.free_list[vp] = None
                else:  # a dead vnode: nothing will find it again
                    self.numvnodes -= 1

    def _unhash(self, vp: Vnode) -> None:
        KASSERT(self.lock.held(), "_unhash: vfs not locked")
        mp = vp.v_mount
        if mp is not None and mp.mnt_vnodes.get(vp.v_key) is vp:
            del mp.mnt_vnodes[vp.v_key]
        self.free_list.pop(vp, None)

    def vgone(self, vp: Vnode) -> None:
        """Kill *vp*: terminate its VM object, reclaim it, make it dead.

        => *vp* is already off its mount's table; caller holds no vnode lock.
        """
        vp.v_flag |= VXLOCK
        vn_lock(vp, LK_EXCLUSIVE | LK_RETRY)
        try:
            self.vnode_terminate(vp)
            vp.v_op.reclaim(vp)
        finally:
            vp.v_op, vp.v_type, vp.v_mount, vp.v_data = dead_vnodeops, VBAD, None, None
            vp.v_flag &= ~VXLOCK
            vp.v_lock.unlock()


def vref(vp: Vnode) -> None:
    vp.v_vfs.vref(vp)


def vrele(vp: Vnode) -> None:
    vp.v_vfs.vrele(vp)
