"""Block devices (specfs, bdevsw).

A :class:`BlockDevice` is a disk (or, for the pager's refusal test, a tape)
with a partition of ``psize`` sectors of ``secsize`` bytes.  The pager asks
its size with the DIOCGPART ioctl, as uvn_attach does, not with getattr.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

from vnpager.vfs.memfs import MemData
from vnpager.vfs.mount import Mount, Vfs
from vnpager.vfs.vnode import DIOCGPART, VBLK, Uio, Vattr, Vnode, VnodeOps

D_DISK = 1
D_TAPE = 2


@dataclass(eq=False)
class BlockDevice:
    name: str
    secsize: int
    psize: int  # sectors in the partition
    d_type: int = D_DISK
    data: MemData = field(default_factory=MemData)  # the medium, sparse: a big disk costs nothing
    fail_ioctl: int = 0  # an errno for DIOCGPART to fail with (tests)

    def d_ioctl(self, cmd: int, data: dict[str, Any]) -> int:
        if cmd != DIOCGPART:
            return errno.ENOTTY
        if self.fail_ioctl:
            return self.fail_ioctl
        data["secsize"], data["psize"] = self.secsize, self.psize
        return 0


class SpecFS(VnodeOps):
    name = "specfs"

    def getattr(self, vp: Vnode, vap: Vattr) -> int:
        vap.va_type, vap.va_size = VBLK, 0  # as for a device node: no size
        return 0

    def read(self, vp: Vnode, uio: Uio, ioflag: int) -> int:
        assert vp.v_rdev is not None
        vp.v_rdev.data.read(uio)
        return 0

    def write(self, vp: Vnode, uio: Uio, ioflag: int) -> int:
        dev = vp.v_rdev
        assert dev is not None
        if uio.offset + uio.resid > dev.secsize * dev.psize:
            return errno.ENOSPC
        dev.data.write(uio)
        return 0

    def ioctl(self, vp: Vnode, cmd: int, data: dict[str, Any]) -> int:
        assert vp.v_rdev is not None
        return vp.v_rdev.d_ioctl(cmd, data)


def bdevvp(vfs: Vfs, mp: Mount, dev: BlockDevice) -> Vnode:
    """The vnode of block device *dev*, referenced."""
    vp = vfs.lookup(mp, dev)
    if vp is None:
        vp = vfs.getnewvnode(mp, VBLK, dev, None)
    vp.v_rdev = dev
    return vp
