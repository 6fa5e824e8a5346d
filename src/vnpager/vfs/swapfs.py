"""swapfs: the backing store of anonymous memory, on disk (the swap behind
uvm_aobj.c and uvm_swap.c).

Each vnode is one anonymous object: a zero-filled file of a given size
whose bytes live in a file of the host, created unlinked (``O_TMPFILE``)
in the mount's directory at the object's first page-out.  So an object
never paged out costs nothing, a page's offset in the object is its offset
in the file (a clustered page-out is one ``pwritev``), and the file is
sparse: what was never written reads as zeros.  The disk space goes back
when the object's size drops to 0 (``uvm_anon_discard``), when the vnode
is reclaimed, or, for a VM dropped without close(), when the node is
collected.  What is paged out sits in the host's page cache, which the
host may drop to disk, not in this process: ``physmem`` bounds the
process's memory for anonymous pages too.

**Fork.**  The child must not share a swap file that the parent keeps
writing, nor the parent one that the child writes: :func:`swapfs_fork_prepare`
copies each file (its data only) while the process is quiet, the child
takes the copies (:func:`swapfs_fork_child`) and the parent closes them
(:func:`swapfs_fork_parent`).  A copy that fails (the disk full) leaves the
child's object unreadable (EIO on the pages it had paged out), never
sharing the parent's.

=> a node's fields change under the vnode's I/O: the pager serialises
   reads, writes and size changes of one object (vnode lock, kernel lock).
"""

from __future__ import annotations

import errno
import itertools
import os
import tempfile
import threading
import weakref
from dataclasses import dataclass, field

from vnpager.vfs.mount import Mount, Vfs
from vnpager.vfs.vnode import VREG, Uio, Vattr, Vnode, VnodeOps

_keys = itertools.count(1)


@dataclass(eq=False)
class SwapNode:
    """One anonymous object's backing store.

    => ``lock`` guards every field and is held across each transfer, so
       that a shrink to 0 (which closes the file) never races a page-out
       in flight (asynchronous page-outs take no vnode lock).
    """

    size: int
    fd: int = -1  # the host file, or -1 while nothing was paged out
    error: int = 0  # the paged-out bytes were lost (fork could not copy them)
    fork_copy: int = -1  # between fork's prepare and its after hooks
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _closer: weakref.finalize | None = field(default=None, repr=False)

    def set_fd(self, fd: int) -> None:
        """Own *fd* (closing the one held before, if any).  => lock held."""
        self.close()
        self.fd = fd
        self._closer = weakref.finalize(self, os.close, fd)

    def close(self) -> None:
        """=> lock held."""
        if self._closer is not None:
            self._closer()  # closes self.fd, once
        self.fd, self._closer = -1, None


def _tmpfile(directory: str) -> int:
    """An unlinked temporary file of *directory*, open read-write."""
    flag = getattr(os, "O_TMPFILE", 0)
    if flag:
        try:
            return os.open(directory, flag | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    fd, path = tempfile.mkstemp(dir=directory, prefix="vnpager-swap-")  # no O_TMPFILE here
    os.unlink(path)
    return fd


def _head(bufs: list[memoryview], n: int) -> list[memoryview]:
    """The first *n* bytes of *bufs*."""
    out = []
    for b in bufs:
        if n <= 0:
            break
        out.append(b[:n])
        n -= len(out[-1])
    return out


def _zero(uio: Uio, n: int) -> None:
    """Fill *n* bytes of *uio* with zeros."""
    for buf in uio.buffers():
        k = min(len(buf), n)
        buf[:k] = bytes(k)
        uio.advance(k)
        n -= k
        if not n:
            break


class SwapFS(VnodeOps):
    """Anonymous objects' files, in *swapdir* (see the module docstring)."""

    name = "swapfs"

    def __init__(self, swapdir: str) -> None:
        self.swapdir = swapdir

    def getattr(self, vp: Vnode, vap: Vattr) -> int:
        node: SwapNode = vp.v_data
        vap.va_type, vap.va_size, vap.va_mtime_ns = VREG, node.size, 0
        return 0

    def read(self, vp: Vnode, uio: Uio, ioflag: int) -> int:
        node: SwapNode = vp.v_data
        with node.lock:
            if node.error:
                return node.error
            n = max(0, min(uio.resid, node.size - uio.offset))
            if node.fd < 0:
                _zero(uio, n)  # never paged out: all zeros, no I/O
                return 0
            try:
                while n > 0:
                    got = os.preadv(node.fd, uio.buffers(), uio.offset)
                    if got == 0:  # the file is kept at the node's size: cannot happen
                        return errno.EIO
                    uio.advance(min(got, n))
                    n -= got
            except OSError as e:
                return e.errno or errno.EIO
        return 0

    def write(self, vp: Vnode, uio: Uio, ioflag: int) -> int:
        """Write within the size; bytes past it are dropped (the pager writes
        within its size: past it is a page-out that raced a shrink)."""
        node: SwapNode = vp.v_data
        with node.lock:
            n = max(0, min(uio.resid, node.size - uio.offset))
            try:
                if n and node.fd < 0:
                    node.set_fd(_tmpfile(self.swapdir))
                    os.ftruncate(node.fd, node.size)
                while n > 0:
                    done = os.pwritev(node.fd, _head(uio.buffers(), n), uio.offset)
                    if done == 0:
                        return errno.EIO
                    uio.advance(done)
                    n -= done
            except OSError as e:
                return e.errno or errno.EIO
            uio.advance(uio.resid)
        return 0

    def setsize(self, vp: Vnode, size: int) -> int:
        node: SwapNode = vp.v_data
        with node.lock:
            node.size = size
            if size == 0:
                node.close()  # the disk space goes back at once
                node.error = 0
            elif node.fd >= 0:
                try:
                    os.ftruncate(node.fd, size)
                except OSError as e:
                    return e.errno or errno.EIO
        return 0

    def fsync(self, vp: Vnode) -> int:
        return 0  # swap need not survive the process

    def reclaim(self, vp: Vnode) -> None:
        node: SwapNode | None = vp.v_data
        if node is not None:
            with node.lock:
                node.close()


def swapfs_create(vfs: Vfs, mp: Mount, size: int) -> Vnode:
    """A new anonymous object's file of *size* zero bytes, referenced once."""
    return vfs.getnewvnode(mp, VREG, next(_keys), SwapNode(size))


def _nodes(mp: Mount) -> list[SwapNode]:
    return [vp.v_data for vp in list(mp.mnt_vnodes.values()) if isinstance(vp.v_data, SwapNode)]


def _copy_data(src: int, dst: int, size: int) -> None:
    """Copy the data extents of *src* into *dst* (holes stay holes, where
    the host can tell them: SEEK_DATA)."""
    os.ftruncate(dst, size)
    seek_data = getattr(os, "SEEK_DATA", None)
    off = 0
    while off < size:
        if seek_data is None:
            start, end = off, size
        else:
            try:
                start = os.lseek(src, off, seek_data)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after off
                    return
                raise
            end = os.lseek(src, start, os.SEEK_HOLE)
        _copy_range(src, dst, start, end)
        off = end


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    copy_file_range = getattr(os, "copy_file_range", None)  # Linux
    while start < end:
        if copy_file_range is not None:
            n = copy_file_range(src, dst, end - start, start, start)
        else:
            n = os.pwrite(dst, os.pread(src, min(end - start, 1 << 20), start), start)
        if n == 0:
            raise OSError(errno.EIO, "swap file shorter than its size")
        start += n


def swapfs_fork_prepare(mp: Mount) -> None:
    """Before fork: copy each swap file for the child (=> the VM is quiet)."""
    fs: SwapFS = mp.mnt_op  # type: ignore[assignment]
    for node in _nodes(mp):
        if node.fd < 0:
            continue
        try:
            node.fork_copy = _tmpfile(fs.swapdir)
            _copy_data(node.fd, node.fork_copy, node.size)
        except OSError:  # the child cannot have these bytes (swapfs_fork_child)
            if node.fork_copy >= 0:
                os.close(node.fork_copy)
            node.fork_copy = -1


def swapfs_fork_parent(mp: Mount) -> None:
    """After fork, in the parent: the copies are the child's."""
    for node in _nodes(mp):
        if node.fork_copy >= 0:
            os.close(node.fork_copy)
        node.fork_copy = -1


def swapfs_fork_child(mp: Mount) -> None:
    """After fork, in the child: use the copies, let go of the parent's
    files.  A file without a copy (it failed, or the VM could not be made
    quiet for one) is never shared: its bytes are lost to the child (EIO)."""
    for node in _nodes(mp):
        node.lock = threading.Lock()  # free at the fork (the VM was quiet), but made anew
        if node.fork_copy >= 0:
            node.set_fd(node.fork_copy)
        elif node.fd >= 0:
            node.close()
            node.error = errno.EIO
        node.fork_copy = -1
