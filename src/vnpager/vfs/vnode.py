"""Vnodes and the vnode operations the pager calls (vnode.h, vfs_vnops.c).

A :class:`Vnode` is a file as the kernel sees it.  Its filesystem supplies
the operations as a :class:`VnodeOps`; the ``VOP_*`` functions here dispatch
to them, returning an errno (0 for success) as the kernel's do.

The VM part of a vnode (``v_uvm``) is made by the VM that owns the vnode's
mount (see :class:`vnpager.vfs.vfs_subr.Vfs`): this layer never imports UVM.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vnpager.kern.debug import panic
from vnpager.kern.lock import LK_EXCLUSIVE, LK_RETRY, LockMgr, kernel_lock

if TYPE_CHECKING:
    from vnpager.vfs.mount import Mount
    from vnpager.vfs.specfs import BlockDevice


class VType(enum.IntEnum):
    VNON = 0
    VREG = 1
    VDIR = 2
    VBLK = 3
    VCHR = 4
    VLNK = 5
    VBAD = 8


VNON, VREG, VDIR, VBLK, VCHR, VLNK, VBAD = (
    VType.VNON, VType.VREG, VType.VDIR, VType.VBLK, VType.VCHR, VType.VLNK, VType.VBAD)

# v_flag
VROOT = 0x0001
VTEXT = 0x0002  # an executable is mapped from it: do not let it be written
VXLOCK = 0x0100  # being recycled or cleaned (vgone in progress)

UIO_READ = 0
UIO_WRITE = 1

IO_NOCACHE = 0x0040  # write: the data need not stay cached

DIOCGPART = 0x4010_6404  # ioctl: get the partition of a disk


@dataclass
class Vattr:
    va_type: VType = VNON
    va_size: int = 0
    va_mtime_ns: int = 0
    va_mode: int = 0


@dataclass
class Uio:
    """A transfer between a vnode and memory, as ``struct uio``.

    ``iov`` are the buffers (page frames, for the pager); ``resid`` counts
    down the bytes still to move and ``offset`` moves with it.
    """

    iov: list[memoryview]
    offset: int
    resid: int
    rw: int

    def buffers(self) -> list[memoryview]:
        """The first ``resid`` bytes of ``iov``, as a list of views."""
        out, left = [], self.resid
        for b in self.iov:
            if left <= 0:
                break
            out.append(b[:left] if len(b) > left else b)
            left -= len(out[-1])
        return out

    def advance(self, n: int) -> None:
        """Account for *n* bytes moved: drop them from the front."""
        self.resid -= n
        self.offset += n
        while n and self.iov:
            b = self.iov[0]
            if len(b) <= n:
                n -= len(b)
                self.iov.pop(0)
            else:
                self.iov[0] = b[n:]
                n = 0


class VnodeOps:
    """A filesystem's vnode operations; each returns an errno.

    The defaults answer as deadfs does: every operation on a vnode whose
    filesystem is gone fails.
    """

    name = "deadfs"
    # reads need not the vnode lock (uvn_io then reads through VOP_STRATEGY),
    # so several can be in flight on one vnode: objfs, whose reads are requests
    unlocked_read = False
    # writes reach the file's other users only at VOP_COMMIT (objfs
    # publishes a new version): the front ends' sync commits after its flush
    commits = False
    readonly = False  # no vnode of it may be opened for writing
    ra_winsize_max: int | None = None  # bytes of its largest read-ahead window (None: the VM's)

    def getattr(self, vp: Vnode, vap: Vattr) -> int:
        return errno.EBADF

    def read(self, vp: Vnode, uio: Uio, ioflag: int) -> int:
        return errno.EIO

    def write(self, vp: Vnode, uio: Uio, ioflag: int) -> int:
        return errno.EIO

    def ioctl(self, vp: Vnode, cmd: int, data: dict[str, Any]) -> int:
        return errno.ENOTTY

    def setsize(self, vp: Vnode, size: int) -> int:
        return errno.EIO

    def fsync(self, vp: Vnode) -> int:
        return errno.EIO

    def commit(self, vp: Vnode) -> int:
        """Make what VOP_WRITE wrote visible to the file's other users (as
        NFS's COMMIT).  A local filesystem has nothing to do."""
        return 0

    def reclaim(self, vp: Vnode) -> None:
        """Release the filesystem's private data of *vp*."""


dead_vnodeops = VnodeOps()


@dataclass(eq=False)
class Vnode:
    """``struct vnode``.

    => ``v_usecount`` changes under the Vfs's vnode lock (``vref``/``vrele``).
    """

    v_type: VType
    v_op: VnodeOps
    v_mount: Mount | None
    v_data: Any = None
    v_rdev: BlockDevice | None = None
    v_flag: int = 0
    v_usecount: int = 0
    v_uvm: Any = None  # the VM's uvm_vnode for this vnode
    v_key: Any = None  # the filesystem's name for it (inode)
    v_vfs: Any = None  # the Vfs (the kernel) this vnode belongs to
    v_lock: LockMgr = field(default_factory=lambda: LockMgr("vnode"))

    def trace_name(self) -> str:
        return f"vp<{self.v_key}>"

    def __repr__(self) -> str:
        return f"<Vnode {self.v_type.name} {self.v_key!r} use={self.v_usecount} flag={self.v_flag:#x}>"


def vn_lock(vp: Vnode, flags: int = LK_EXCLUSIVE) -> int:
    """Lock *vp*; returns 0, EBUSY (LK_NOWAIT), EDEADLK (LK_RECURSEFAIL).

    Unless LK_RETRY, a vnode that was recycled while we waited (VBAD)
    is unlocked again and reported as ENOENT.
    """
    error = vp.v_lock.lock(flags & ~LK_RETRY)
    if error == 0 and vp.v_type == VBAD and not flags & LK_RETRY:
        vp.v_lock.unlock()
        return errno.ENOENT
    return error


def VOP_LOCK(vp: Vnode, flags: int = LK_EXCLUSIVE) -> int:
    return vp.v_lock.lock(flags)


def VOP_UNLOCK(vp: Vnode) -> None:
    vp.v_lock.unlock()


def VOP_ISLOCKED(vp: Vnode) -> bool:
    return vp.v_lock.locked()


def VOP_GETATTR(vp: Vnode, vap: Vattr) -> int:
    return vp.v_op.getattr(vp, vap)


def VOP_READ(vp: Vnode, uio: Uio, ioflag: int = 0) -> int:
    """=> caller holds the vnode lock."""
    if not vp.v_lock.held():
        panic("VOP_READ: vnode not locked")
    with kernel_lock.dropped():  # the thread sleeps in biowait()
        return vp.v_op.read(vp, uio, ioflag)


def VOP_WRITE(vp: Vnode, uio: Uio, ioflag: int = 0) -> int:
    """=> caller holds the vnode lock."""
    if not vp.v_lock.held():
        panic("VOP_WRITE: vnode not locked")
    with kernel_lock.dropped():
        return vp.v_op.write(vp, uio, ioflag)


def VOP_STRATEGY(vp: Vnode, uio: Uio) -> int:
    """Transfer *uio* as a buffer I/O does: without the vnode lock.

    Asynchronous pageout writes through it, so that a write in flight never
    waits for a vnode lock whose holder (terminate, say) is waiting for that
    write; so do the reads of a filesystem with ``unlocked_read``.
    """
    with kernel_lock.dropped():
        if uio.rw == UIO_READ:
            return vp.v_op.read(vp, uio, 0)
        return vp.v_op.write(vp, uio, IO_NOCACHE)


def VOP_IOCTL(vp: Vnode, cmd: int, data: dict[str, Any]) -> int:
    return vp.v_op.ioctl(vp, cmd, data)


def VOP_FSYNC(vp: Vnode) -> int:
    return vp.v_op.fsync(vp)


def VOP_COMMIT(vp: Vnode) -> int:
    return vp.v_op.commit(vp)
