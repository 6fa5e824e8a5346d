"""memfs: files that live in memory, stored sparsely.

It backs tests that need no disk and block devices of specfs (anonymous
memory pages out to swapfs, on disk: memfs would hold it in this
process).  A file's bytes are kept in a :class:`MemData`: fixed-size
chunks that exist only where something other than zeros was written, plus
an explicit size.  So a big sparse file costs only the chunks written.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from vnpager.vfs.mount import Mount, Vfs
from vnpager.vfs.vnode import UIO_READ, UIO_WRITE, VREG, Uio, Vattr, Vnode, VnodeOps

MEM_CHUNK = 16 * 1024  # bytes per chunk: a few pages, so a touched page costs little

_ZEROS = memoryview(bytes(MEM_CHUNK))
_inos = itertools.count(1)


class MemData:
    """The bytes of a file: *size* bytes, where the holes read as zeros.

    Thread-safe on its own (a lock per file), so that setsize and getattr
    need not rely on the caller's vnode lock.  Writing zeros into a hole
    leaves the hole: a page of anonymous memory written back untouched
    costs nothing.
    """

    def __init__(self, data: bytes = b"", size: int | None = None) -> None:
        """Hold *data*, then make the size *size* (default: len(data))."""
        self._lock = threading.Lock()
        self._chunks: dict[int, bytearray] = {}
        self._size = 0
        if data:
            self.write(Uio([memoryview(data)], 0, len(data), UIO_WRITE))
        if size is not None:
            self.truncate(size)

    @property
    def size(self) -> int:
        return self._size

    @property
    def stored(self) -> int:
        """Bytes of memory the chunks take (holes take none)."""
        return len(self._chunks) * MEM_CHUNK

    def read(self, uio: Uio) -> None:
        """Copy from uio.offset into uio's buffers, stopping at the end of file.

        What is left unread shows in ``uio.resid``.
        """
        with self._lock:
            for buf in uio.buffers():
                n = max(0, min(len(buf), self._size - uio.offset))
                for idx, within, pos, m in _pieces(uio.offset, n):
                    chunk = self._chunks.get(idx)
                    buf[pos:pos + m] = _ZEROS[:m] if chunk is None else chunk[within:within + m]
                uio.advance(n)
                if n < len(buf):
                    break

    def write(self, uio: Uio) -> None:
        """Copy all of uio's buffers in at uio.offset, growing the file as needed."""
        with self._lock:
            for buf in uio.buffers():
                for idx, within, pos, m in _pieces(uio.offset, len(buf)):
                    src = buf[pos:pos + m]
                    chunk = self._chunks.get(idx)
                    if chunk is None:
                        if src == _ZEROS[:m]:
                            continue  # zeros into a hole: it stays a hole
                        chunk = self._chunks[idx] = bytearray(MEM_CHUNK)
                    chunk[within:within + m] = src
                self._size = max(self._size, uio.offset + len(buf))
                uio.advance(len(buf))

    def truncate(self, size: int) -> None:
        """Make the file *size* bytes long; bytes past it read as zeros if it grows again."""
        if size < 0:
            raise ValueError(f"negative size {size}")
        with self._lock:
            if size < self._size:
                last, within = divmod(size, MEM_CHUNK)
                for idx in [i for i in self._chunks if i > last or (i == last and within == 0)]:
                    del self._chunks[idx]
                tail = self._chunks.get(last)
                if tail is not None:
                    tail[within:] = _ZEROS[:MEM_CHUNK - within]
            self._size = size

    def pread(self, offset: int, length: int) -> bytes:
        """Up to *length* bytes from *offset*, fewer at the end of file."""
        buf = bytearray(length)
        uio = Uio([memoryview(buf)], offset, length, UIO_READ)
        self.read(uio)
        return bytes(buf[:length - uio.resid])

    def __bytes__(self) -> bytes:
        return self.pread(0, self._size)

    def __repr__(self) -> str:
        return f"<MemData size={self._size} stored={self.stored}>"


def _pieces(offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
    """Split [offset, offset + length) at chunk bounds.

    Yields (chunk index, offset within the chunk, offset within the span, bytes).
    """
    pos = 0
    while pos < length:
        idx, within = divmod(offset + pos, MEM_CHUNK)
        m = min(MEM_CHUNK - within, length - pos)
        yield idx, within, pos, m
        pos += m


@dataclass
class MemNode:
    data: MemData = field(default_factory=MemData)
    mtime_ns: int = field(default_factory=time.time_ns)


class MemFS(VnodeOps):
    name = "memfs"

    def getattr(self, vp: Vnode, vap: Vattr) -> int:
        node: MemNode = vp.v_data
        vap.va_type, vap.va_size, vap.va_mtime_ns = vp.v_type, node.data.size, node.mtime_ns
        return 0

    def read(self, vp: Vnode, uio: Uio, ioflag: int) -> int:
        vp.v_data.data.read(uio)
        return 0

    def write(self, vp: Vnode, uio: Uio, ioflag: int) -> int:
        node: MemNode = vp.v_data
        node.data.write(uio)
        node.mtime_ns = time.time_ns()
        return 0

    def setsize(self, vp: Vnode, size: int) -> int:
        node: MemNode = vp.v_data
        node.data.truncate(size)
        node.mtime_ns = time.time_ns()
        return 0

    def fsync(self, vp: Vnode) -> int:
        return 0


def memfs_create(vfs: Vfs, mp: Mount, data: bytes = b"", name: object = None,
                 size: int | None = None) -> Vnode:
    """A new memfs file holding *data*, as a vnode referenced once.

    With *size* the file is that long (cut, or grown with a hole, after
    *data*); nothing past *data* takes memory until written.
    """
    key = name if name is not None else next(_inos)
    return vfs.getnewvnode(mp, VREG, key, MemNode(MemData(data, size)))
