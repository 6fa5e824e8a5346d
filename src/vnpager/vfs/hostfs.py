"""hostfs: files of the host, read and written straight into page frames.

A vnode of hostfs holds one descriptor of its file, opened read-write where
the host permits (so that a page-in never fails for want of read access)
and read-only otherwise.  Transfers use ``os.preadv``/``os.pwritev`` on the
frames the pager hands in: no copy in between.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from vnpager.vfs.mount import Mount, Vfs
from vnpager.vfs.vnode import VREG, Uio, Vattr, Vnode, VnodeOps, VType


@dataclass
class HostNode:
    fd: int
    writable: bool
    path: str | None = None
    retired: list[int] = field(default_factory=list)  # closed at reclaim


def _errno(e: OSError) -> int:
    return e.errno or errno.EIO


class HostFS(VnodeOps):
    name = "hostfs"

    def getattr(self, vp: Vnode, vap: Vattr) -> int:
        try:
            st = os.fstat(vp.v_data.fd)
        except OSError as e:
            return _errno(e)
        vap.va_type = VREG if stat.S_ISREG(st.st_mode) else VType.VNON
        vap.va_size, vap.va_mtime_ns, vap.va_mode = st.st_size, st.st_mtime_ns, st.st_mode
        return 0

    def read(self, vp: Vnode, uio: Uio, ioflag: int) -> int:
        fd = vp.v_data.fd
        try:
            while uio.resid > 0:
                n = os.preadv(fd, uio.buffers(), uio.offset)
                if n == 0:
                    break  # end of file: the caller sees uio.resid left over
                uio.advance(n)
        except OSError as e:
            return _errno(e)
        return 0

    def write(self, vp: Vnode, uio: Uio, ioflag: int) -> int:
        node: HostNode = vp.v_data
        if not node.writable:
            return errno.EBADF
        try:
            while uio.resid > 0:
                n = os.pwritev(node.fd, uio.buffers(), uio.offset)
                if n == 0:
                    return errno.EIO
                uio.advance(n)
        except OSError as e:
            return _errno(e)
        return 0

    def setsize(self, vp: Vnode, size: int) -> int:
        try:
            os.ftruncate(vp.v_data.fd, size)
        except OSError as e:
            return _errno(e)
        return 0

    def fsync(self, vp: Vnode) -> int:
        try:
            os.fsync(vp.v_data.fd)
        except OSError as e:
            return _errno(e)
        return 0

    def reclaim(self, vp: Vnode) -> None:
        node: HostNode | None = vp.v_data
        if node is not None:
            for fd in [node.fd, *node.retired]:
                os.close(fd)


def _key(st: os.stat_result) -> Any:
    return (st.st_dev, st.st_ino)


def hostfs_vget_path(vfs: Vfs, mp: Mount, path: str) -> Vnode:
    """The vnode of the host file *path*, referenced.  Raises OSError."""
    try:
        fd, writable = os.open(path, os.O_RDWR | os.O_CLOEXEC), True
    except PermissionError:
        fd, writable = os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
    return _vget(vfs, mp, fd, writable, path)


def hostfs_vget_fd(vfs: Vfs, mp: Mount, fd: int) -> Vnode:
    """The vnode of the file open on *fd*, referenced.  Raises OSError.

    The vnode keeps its own descriptor: the file reopened read-write through
    /proc where allowed, else a duplicate of *fd*.
    """
    try:
        mine, writable = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC), True
    except OSError:
        mine = os.dup(fd)
        writable = fcntl.fcntl(mine, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
    return _vget(vfs, mp, mine, writable, None)


def _vget(vfs: Vfs, mp: Mount, fd: int, writable: bool, path: str | None) -> Vnode:
    try:
        st = os.fstat(fd)
        key = _key(st)
        vp = vfs.lookup(mp, key)
        if vp is not None and os.fstat(vp.v_data.fd).st_nlink == 0 < st.st_nlink:
            # the vnode's file was unlinked and its inode number reused
            vfs.vunhash(vp)
            vfs.vrele(vp)
            vp = None
        if vp is not None:
            node: HostNode = vp.v_data
            if writable and not node.writable:
                # upgrade; the old descriptor may be in use by an I/O now
                node.retired.append(node.fd)
                node.fd, node.writable = fd, True
            else:
                os.close(fd)
            return vp
        vtype = VREG if stat.S_ISREG(st.st_mode) else VType.VNON
    except BaseException:
        os.close(fd)
        raise
    return vfs.getnewvnode(mp, vtype, key, HostNode(fd, writable, path))
