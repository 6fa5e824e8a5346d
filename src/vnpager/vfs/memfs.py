"""memfs: files that live in memory (a bytearray each).

It backs tests that need no disk, block devices of specfs, and anonymous
memory (``vnpager.mmap(-1, ...)``).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from vnpager.vfs.mount import Mount, Vfs
from vnpager.vfs.vnode import VREG, Uio, Vattr, Vnode, VnodeOps

_inos = itertools.count(1)


@dataclass
class MemNode:
    data: bytearray = field(default_factory=bytearray)
    mtime_ns: int = field(default_factory=time.time_ns)


def mem_read(data: bytearray, uio: Uio) -> None:
    """Copy from *data* at uio.offset into uio's buffers, up to the end."""
    for buf in uio.buffers():
        chunk = data[uio.offset:uio.offset + len(buf)]
        if not chunk:
            break
        buf[:len(chunk)] = chunk
        uio.advance(len(chunk))
        if len(chunk) < len(buf):
            break


def mem_write(data: bytearray, uio: Uio) -> None:
    """Copy uio's buffers into *data* at uio.offset, growing it as needed."""
    for buf in uio.buffers():
        end = uio.offset + len(buf)
        if end > len(data):
            data.extend(bytes(end - len(data)))
        data[uio.offset:end] = buf
        uio.advance(len(buf))


class MemFS(VnodeOps):
    name = "memfs"

    def getattr(self, vp: Vnode, vap: Vattr) -> int:
        node: MemNode = vp.v_data
        vap.va_type, vap.va_size, vap.va_mtime_ns = vp.v_type, len(node.data), node.mtime_ns
        return 0

    def read(self, vp: Vnode, uio: Uio, ioflag: int) -> int:
        mem_read(vp.v_data.data, uio)
        return 0

    def write(self, vp: Vnode, uio: Uio, ioflag: int) -> int:
        node: MemNode = vp.v_data
        mem_write(node.data, uio)
        node.mtime_ns = time.time_ns()
        return 0

    def setsize(self, vp: Vnode, size: int) -> int:
        data = vp.v_data.data
        if size < len(data):
            del data[size:]
        else:
            data.extend(bytes(size - len(data)))
        return 0

    def fsync(self, vp: Vnode) -> int:
        return 0


def memfs_create(vfs: Vfs, mp: Mount, data: bytes = b"", name: object = None) -> Vnode:
    """A new memfs file holding *data*, as a vnode referenced once."""
    key = name if name is not None else next(_inos)
    return vfs.getnewvnode(mp, VREG, key, MemNode(bytearray(data)))
