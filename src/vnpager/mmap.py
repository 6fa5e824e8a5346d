"""``vnpager.mmap``: Python's ``mmap.mmap`` on the vnode pager.

The same class, arguments, methods, errors and messages as CPython 3.11's
``mmap.mmap`` on Unix (plus 3.13's ``trackfd`` and ``seekable``), but the
pages live in a :class:`~vnpager.VM` of bounded size (``vm=``, by default
:func:`default_vm`), are read and written by the vnode pager, and every
access goes through the VM's address space and fault handler.

On a hardware VM (``vm=vnpager.VM(mmu="hardware")``, or ``VNPAGER_MMU=
hardware`` for the default VM) this returns a :class:`vnpager.client.HwMmap`
instead: CPython's own mmap object over the file's pages in the pager
server, with the buffer protocol and the kernel's failure semantics
(SIGBUS); the list below is the software MMU's (see the README's "Two
machines").

Differences from CPython's mmap, each on purpose or forced:

* **No buffer protocol.**  The mapped pages are not contiguous memory, so
  ``memoryview(m)``, ``re.search(pattern, m)``, ``hashlib.sha256(m)``,
  ``f.write(m)`` and ``m.readinto``-style consumers raise TypeError.  Use
  ``m[a:b]`` or ``m.read(n)`` (bytes copies), ``bytes(m)`` (a copy of the
  whole map), ``numpy.asarray(m)`` (a uint8 copy; ``copy=False`` is
  ValueError), and ``m.find``/``m.rfind``/``m.readline`` (which read small
  windows first, then larger ones, never the whole map at once).
  ``bytearray(m)`` cannot work without the buffer protocol on 3.11 (it
  iterates, and wants ints where iteration gives one-byte bytes): it raises
  a TypeError that says to use ``bytearray(m[:])``.  ``b in m`` gives the
  stdlib's one-byte membership answer, by a search instead of iterating.
  Slice assignment, ``write`` and ``find`` accept any bytes-like object.
* **Errors instead of signals.**  Touching a page past the file's current
  end raises :class:`BusError` (an OSError, errno EFAULT) instead of
  SIGBUS; a page that cannot be read raises OSError with the backend's
  errno; touching a PROT_NONE mapping raises ``SegvError`` instead of
  SIGSEGV.  The process lives and the mapping stays usable.
* **Truncation from outside is noticed by a size check per operation.**
  The pager's idea of the file size would go stale when someone else
  truncates the file, so every operation that touches the mapped bytes
  first compares the file's size with the pager's and, if they differ,
  shrinks or grows the pager through the mapping core
  (:meth:`vnpager.vnmap.FileObject.follow_size`: ``uvm_vnp_revalidate``
  under the object's size lock, which tosses the pages past a new end).
  Checking only on a fault would be cheaper but would keep serving
  resident pages of a truncated file.  The size comes from
  ``lseek(SEEK_END)`` on the map's own descriptor (a description of its
  own: the file reopened through /proc), about a third of an ``fstat``'s
  cost (0.2 against 0.6 µs); a map without one (trackfd=False, no /proc,
  or a map of a vnode) pays the fstat (VOP_GETATTR).  ``len``, ``tell``
  and ``seek`` do not check.
* **Coherence with other I/O on the file is close-to-open, as NFS gives.**
  CPython's mappings share the kernel's page cache with ``read``/``write``;
  ours are a cache of their own.  Writes reach the file at ``flush()``, at
  ``close()`` (which writes back, so that a reader who opens the file
  after the close sees them), when the page daemon cleans the page, or
  when the VM closes (the default VM closes at exit).  Changes made to the
  file by other means are seen by mappings made after them: a file mapped
  again finds its persisting pages without I/O unless its size or mtime
  changed, in which case those pages are dropped first (the same attach
  as ``vm.pread`` and ``vm.open``'s: :mod:`vnpager.vnmap`).  All mappings
  of one file in one VM share one object, so they see each other's writes
  at once.
* **fork.**  After ``os.fork()`` each process has a VM of its own: its own
  frames (private memory, copied on write), swap and daemon threads.  Fork
  first writes every dirty file page back, so each process then writes
  back only what it dirtied itself.  The two caches are coherent
  close-to-open, as two programs' are; an anonymous map, MAP_SHARED or not,
  is not shared with the child (CPython's MAP_SHARED one is); a page that
  both processes write ends up as the last write-back has it, whole; a
  child leaving through ``os._exit`` (multiprocessing's workers do) writes
  back nothing it did not flush.  See the README.
* ``flush()`` and ``close()`` raise the write-back error (OSError with the
  backend's errno); the pages stay dirty, so a later flush can write them.
  A write-back that failed elsewhere (another map of the file, the page
  daemon, sync) is reported too, once to each map open when it happened,
  as Linux's fsync does with errseq.  CPython's ``close`` never reports
  write-back errors.
* ``fileno`` may also be a vnode of the VM (``vm.map(vp)`` says it
  shorter; ``vm.map(path)`` opens a host path for the map): such a map
  has no descriptor, and ``size()`` is the vnode's.
* ``resize()`` shrinks the object before the file and grows the file
  before the object, under the object's size lock, as every front end
  does (``ubc_setsize``), so no pageout writes pages back past a new end.
* ``resize()`` of an anonymous map grows its memory (CPython's grows the
  mapping but not the shared memory behind it, so touching the new pages
  is SIGBUS).  ``resize()`` of a MAP_PRIVATE map copies the mapped range
  into fresh private pages.
* Only ``MADV_NORMAL`` (read-ahead that grows on sequential faults),
  ``MADV_RANDOM`` (no read-ahead), ``MADV_SEQUENTIAL`` (the largest
  read-ahead; pages behind are deactivated), ``MADV_WILLNEED`` (read in
  the background from free memory) and ``MADV_DONTNEED`` (clean file
  pages are freed, dirty ones deactivated; the private changes of a
  MAP_PRIVATE range are kept, as on OpenBSD, where Linux throws them
  away) exist; other advice is EINVAL.
* Only regular files and anonymous memory can be mapped (ENODEV for
  others).  ``MAP_PRIVATE`` anonymous memory is mapped shared: nobody else
  can see it, so the two cannot be told apart.
* ``PAGESIZE`` and ``ALLOCATIONGRANULARITY`` are 4096, the default page
  size of a VM, whatever the host's; a VM made with another page size
  still accepts offsets that are multiples of its own page size.
* The object is not thread-safe against ``close()`` racing another
  operation on it: that operation raises instead of crashing.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import operator
import os
import stat
import sys
from collections.abc import Iterator
from typing import Any, NoReturn, SupportsIndex

from vnpager.client import HardwareVM
from vnpager.kern.lock import Mutex
from vnpager.uvm.uvm_fault import uvm_copyin, uvm_copyout, uvm_load, uvm_store
from vnpager.uvm.uvm_map import (
    MADV_DONTNEED,
    MADV_NORMAL,
    MADV_RANDOM,
    MADV_SEQUENTIAL,
    MADV_WILLNEED,
    MAP_PRIVATE,
    MAP_SHARED,
    Vmspace,
    uvm_anon_discard,
    uvm_anon_object,
    uvm_map_advice,
)
from vnpager.uvm.uvm_param import PAGE_SIZE, PROT_EXEC, PROT_READ, PROT_WRITE
from vnpager.uvm.uvm_vnode import UvmVnode
from vnpager.vfs.vnode import VOP_GETATTR, VREG, Vattr, Vnode
from vnpager.vm import VM
from vnpager.vnmap import FileObject

__all__ = [
    "ACCESS_COPY", "ACCESS_DEFAULT", "ACCESS_READ", "ACCESS_WRITE", "ALLOCATIONGRANULARITY",
    "MADV_DONTNEED", "MADV_NORMAL", "MADV_RANDOM", "MADV_SEQUENTIAL", "MADV_WILLNEED",
    "MAP_ANON", "MAP_ANONYMOUS", "MAP_PRIVATE", "MAP_SHARED", "PAGESIZE", "PROT_EXEC",
    "PROT_READ", "PROT_WRITE", "default_vm", "error", "mmap",
]

ACCESS_DEFAULT = 0
ACCESS_READ = 1
ACCESS_WRITE = 2
ACCESS_COPY = 3
_ACCESS_NAMES = ("ACCESS_DEFAULT", "ACCESS_READ", "ACCESS_WRITE", "ACCESS_COPY")

MAP_ANONYMOUS = MAP_ANON = 0x20  # Linux's value: accepted, and implied by fileno=-1

PAGESIZE = PAGE_SIZE
ALLOCATIONGRANULARITY = PAGE_SIZE

error = OSError

CHUNK = 1 << 20  # bytes per copy through the pager: bounds the memory of big reads
# the first window of a search (find, readline, in): most end near their start, and a
# copy costs little more than the call under a few KiB; each next window is 4 times larger
_FIRST_WINDOW = 256
_SSIZE_MAX = sys.maxsize
_INT_MAX = 2**31 - 1

# ---------------------------------------------------------------- the default VM

_default_vm: VM | HardwareVM | None = None
_default_vm_lock = Mutex("default_vm")  # a kern lock: remade in a forked child


def default_vm() -> VM | HardwareVM:
    """The VM that mappings use unless given one: made on first use as
    ``VM()`` makes it (``VNPAGER_PHYSMEM`` bytes, 256 MiB when unset), and
    closed at exit so that dirty pages reach their files.
    ``VNPAGER_MMU=hardware`` makes it a hardware VM (a private server)."""
    global _default_vm
    with _default_vm_lock:
        if _default_vm is None or _default_vm.closed:
            _default_vm = VM(mmu=os.environ.get("VNPAGER_MMU") or "software")
            atexit.register(_default_vm.close)
        return _default_vm


# ---------------------------------------------------------------- argument conversion
# As CPython's argument parsing does it, so that the same calls fail the same way.

def _ssize(x: SupportsIndex) -> int:
    """A Py_ssize_t argument (format "n")."""
    i = operator.index(x)
    if not -_SSIZE_MAX - 1 <= i <= _SSIZE_MAX:
        raise OverflowError("Python int too large to convert to C ssize_t")
    return i


def _cint(x: SupportsIndex) -> int:
    """A C int argument (format "i")."""
    i = operator.index(x)
    if i > _INT_MAX:
        raise OverflowError("signed integer is greater than maximum")
    if i < -_INT_MAX - 1:
        raise OverflowError("signed integer is less than minimum")
    return i


def _opt_ssize(x: SupportsIndex | None, default: int) -> int:
    return default if x is None else _ssize(x)


def _index_arg(x: SupportsIndex) -> int:
    """An index (sequence subscript): too large for Py_ssize_t is IndexError."""
    i = operator.index(x)
    if not -_SSIZE_MAX - 1 <= i <= _SSIZE_MAX:
        raise IndexError(f"cannot fit '{type(x).__name__}' into an index-sized integer")
    return i


def _buffer(obj: Any) -> memoryview:
    """The bytes of a bytes-like object (format "y*")."""
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"a bytes-like object is required, not '{type(obj).__name__}'") from None
    if not view.c_contiguous:
        raise BufferError("memoryview: underlying buffer is not C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _oserror(err: int) -> OSError:
    return OSError(err, os.strerror(err))


# ---------------------------------------------------------------- the map


class mmap:  # noqa: N801 - the stdlib's name
    """A memory-mapped file or anonymous memory: see the module docstring.

    ``mmap(fileno, length, flags=MAP_SHARED, prot=PROT_WRITE|PROT_READ,
    access=ACCESS_DEFAULT, offset=0, *, trackfd=True, vm=None)``
    """

    __slots__ = ("__weakref__", "_access", "_anon", "_closed", "_fd", "_file", "_flags", "_offset",
                 "_pos", "_probe", "_prot", "_size", "_space", "_trackfd", "_uobj", "_va", "_vm", "_vp")

    _access: int
    _anon: bool  # fileno=-1: an anonymous (swapfs) object nobody else can map
    _closed: bool
    _fd: int  # our descriptor of the file (trackfd), else -1
    _file: FileObject  # our hold on the object: attach, errseq, sync, size, map (vnpager.vnmap)
    _flags: int  # MAP_SHARED or MAP_PRIVATE, as mapped
    _offset: int
    _pos: int
    _probe: bool  # _fd is a file description of our own: lseek it for the size
    _prot: int
    _size: int
    _space: Vmspace
    _trackfd: bool  # False: the map may not resize (trackfd=False, as CPython's)
    _uobj: UvmVnode
    _va: int
    _vm: VM
    _vp: Vnode

    def __new__(cls, fileno: SupportsIndex | Vnode, length: SupportsIndex, flags: SupportsIndex = MAP_SHARED,
                prot: SupportsIndex = PROT_WRITE | PROT_READ, access: SupportsIndex = ACCESS_DEFAULT,
                offset: SupportsIndex = 0, *, trackfd: bool = True, vm: VM | HardwareVM | None = None) -> Any:
        vm = vm if vm is not None else default_vm()
        if isinstance(vm, HardwareVM):  # an mmap.mmap over real memory (vnpager.client.hwmmap)
            if isinstance(fileno, Vnode):
                raise TypeError("a hardware VM maps descriptors of host files, not vnodes")
            return vm.mmap(fileno, length, flags, prot, access, offset, trackfd=trackfd)
        vnode, fd = (fileno, -1) if isinstance(fileno, Vnode) else (None, _cint(fileno))
        size, flags, prot, access = _ssize(length), _cint(flags), _cint(prot), _cint(access)
        off = operator.index(offset)
        if size < 0:
            raise OverflowError("memory mapped length must be positive")
        if off < 0:
            raise OverflowError("memory mapped offset must be positive")
        if access != ACCESS_DEFAULT and (flags != MAP_SHARED or prot != PROT_WRITE | PROT_READ):
            raise ValueError("mmap can't specify both access and flags, prot.")
        if access == ACCESS_READ:
            flags, prot = MAP_SHARED, PROT_READ
        elif access == ACCESS_WRITE:
            flags, prot = MAP_SHARED, PROT_READ | PROT_WRITE
        elif access == ACCESS_COPY:
            flags, prot = MAP_PRIVATE, PROT_READ | PROT_WRITE
        elif access == ACCESS_DEFAULT:
            if not (prot & PROT_READ and prot & PROT_WRITE):
                access = ACCESS_WRITE if prot & PROT_WRITE else ACCESS_READ
        else:
            raise ValueError("mmap invalid access parameter.")

        # EBADF for a bad descriptor, as CPython's
        file_size, regular = _vnode_size(vnode) if vnode is not None else _fd_size(fd)
        if regular:
            size = _fit(size, off, file_size)

        # what the kernel's mmap(2) checks, in its order; it ignores the
        # descriptor of a MAP_ANONYMOUS map
        sharing = flags & (MAP_SHARED | MAP_PRIVATE)
        if size == 0 or off % vm.page_size or sharing not in (MAP_SHARED, MAP_PRIVATE):
            raise _oserror(errno.EINVAL)
        anon = file_size < 0 or bool(flags & MAP_ANONYMOUS)
        maxprot = PROT_READ | PROT_WRITE | PROT_EXEC  # anonymous memory, or the VM's own vnode
        if not anon and vnode is None:
            maxprot = _fd_maxprot(fd, sharing, prot)
        if not anon and not regular:
            raise _oserror(errno.ENODEV)

        self = object.__new__(cls)
        self._closed = True  # until mapped: __del__ and close() have nothing to undo
        self._vm, self._space = vm, vm.vmspace
        self._size, self._pos, self._offset = size, 0, off
        self._access, self._flags, self._prot = access, sharing, prot
        self._anon, self._fd, self._probe, self._trackfd = anon, -1, False, trackfd
        if anon:
            self._file = FileObject(uvm_anon_object(vm, size))
            self._flags = MAP_SHARED  # private to this object anyway
            off = 0
        else:  # a private map never writes to the object
            self._file = FileObject.open(vm, vnode if vnode is not None else fd,
                                         prot if sharing == MAP_SHARED else PROT_READ)
        self._uobj = self._file.uvn
        self._vp = self._uobj.u_vnode
        try:
            if not anon and trackfd and vnode is None:
                self._fd, self._probe = _own_descriptor(fd)
            self._va = self._file.map(self._space, size, off, prot, maxprot, self._flags)
        except BaseException:
            if self._fd != -1:
                os.close(self._fd)
            self._file.close()
            raise
        self._closed = False
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Everything is done in __new__, as CPython's type does (subclasses
        may call ``mmap.__new__`` with other arguments than their own)."""

    # -------------------------------------------------------- helpers

    def _check_valid(self) -> None:
        if self._closed:
            raise ValueError("mmap closed or invalid")

    def _check_writable(self) -> None:
        if self._access == ACCESS_READ:
            raise TypeError("mmap can't modify a readonly memory map.")

    def _revalidate(self) -> None:
        """Follow the file's size before touching the pages (see module doc)."""
        if self._probe:
            try:
                if os.lseek(self._fd, 0, os.SEEK_END) == self._uobj.u_size:
                    return
            except OSError:
                pass  # the fstat below reports it
        if not self._anon:
            self._file.follow_size()

    def _read(self, pos: int, n: int) -> bytes:
        """*n* bytes from *pos*, copied through the pager.  => revalidated."""
        return uvm_load(self._space, self._va + pos, n)

    def _write(self, pos: int, data: memoryview) -> None:
        """Store *data* at *pos* through the pager.  => revalidated."""
        uvm_store(self._space, self._va + pos, data)

    def _extended(self, start: int, step: int, count: int) -> Iterator[tuple[int, int]]:
        """Cover the *count* positions start, start+step, ... (step > 0) with
        windows of at most CHUNK bytes: yields (position, span)."""
        per = max(1, (CHUNK - 1) // step + 1)
        for first in range(0, count, per):
            k = min(per, count - first)
            yield start + first * step, (k - 1) * step + 1

    # -------------------------------------------------------- life

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Unmap; a shared file map writes its dirty pages back first.

        The map is closed even if the write-back fails; the error is raised
        then, and the pages stay dirty in the file's object.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._anon:
                uvm_anon_discard(self._uobj)  # nobody can map it again: free it unwritten
            elif self._flags == MAP_SHARED and self._prot & PROT_WRITE:
                self._sync(0, self._size)
        finally:
            self._file.close()  # unmaps
            if self._fd != -1:
                os.close(self._fd)
                self._fd = -1

    def _sync(self, offset: int, size: int) -> None:
        """Write back [offset, offset+size) of the map; raise the errno of this
        write-back, or else of one that failed since this map last reported
        (whoever wrote: another map, the page daemon, sync), once per map."""
        self._file.sync(self._offset + offset, self._offset + offset + size)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    def __enter__(self) -> mmap:
        self._check_valid()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError(f"cannot pickle '{self._type_name()}' object")

    def _type_name(self) -> str:
        return "mmap.mmap" if type(self) is mmap else type(self).__name__

    def __repr__(self) -> str:
        if self._closed:
            return f"<{self._type_name()} closed=True>"
        return (f"<{self._type_name()} closed=False, access={_ACCESS_NAMES[self._access]}, "
                f"length={self._size}, pos={self._pos}, offset={self._offset}>")

    # -------------------------------------------------------- file-like

    def tell(self) -> int:
        self._check_valid()
        return self._pos

    def seekable(self) -> bool:
        return True

    def seek(self, pos: SupportsIndex, whence: SupportsIndex = 0) -> None:
        dist, how = _ssize(pos), _cint(whence)
        self._check_valid()
        if how == 0:
            where = dist
        elif how == 1:
            where = self._pos + dist
        elif how == 2:
            where = self._size + dist
        else:
            raise ValueError("unknown seek type")
        if not 0 <= where <= self._size:
            raise ValueError("seek out of range")
        self._pos = where

    def size(self) -> int:
        """The size of the file (not of the map); OSError EBADF for anonymous
        memory or trackfd=False, as CPython."""
        self._check_valid()
        if self._fd == -1 and self._trackfd and not self._anon:  # a map of a vnode
            self._file.follow_size()
            return self._uobj.u_size
        return os.fstat(self._fd).st_size

    def read(self, n: SupportsIndex | None = None) -> bytes:
        num = _opt_ssize(n, _SSIZE_MAX)
        self._check_valid()
        remaining = max(0, self._size - self._pos)
        if num < 0 or num > remaining:
            num = remaining
        self._revalidate()
        data = self._read(self._pos, num)
        self._pos += num
        return data

    def read_byte(self) -> int:
        self._check_valid()
        if self._pos >= self._size:
            raise ValueError("read byte out of range")
        self._revalidate()
        value = self._read(self._pos, 1)[0]
        self._pos += 1
        return value

    def readline(self) -> bytes:
        self._check_valid()
        self._revalidate()
        pos, size = self._pos, self._size
        if pos >= size:
            return b""
        # the usual case, with no generator and no call between us and the load (as
        # __getitem__'s fast path): the line ends in the first window
        n = size - pos
        first = uvm_load(self._space, self._va + pos, n if n < _FIRST_WINDOW else _FIRST_WINDOW)
        nl = first.find(b"\n")
        if nl >= 0:
            self._pos = pos + nl + 1
            return first[:nl + 1]
        parts = [first]
        for at, chunk in self._windows(pos + len(first), size, 0, span=4 * _FIRST_WINDOW):
            nl = chunk.find(b"\n")
            if nl >= 0:
                parts.append(chunk[:nl + 1])
                self._pos = at + nl + 1
                return b"".join(parts)
            parts.append(chunk)
        self._pos = size
        return b"".join(parts)

    def write(self, data: Any) -> int:
        view = _buffer(data)
        self._check_valid()
        self._check_writable()
        if self._pos > self._size or self._size - self._pos < len(view):
            raise ValueError("data out of range")
        self._revalidate()
        self._write(self._pos, view)
        self._pos += len(view)
        return len(view)

    def write_byte(self, byte: SupportsIndex) -> None:
        value = operator.index(byte)
        if value < 0:
            raise OverflowError("unsigned byte integer is less than minimum")
        if value > 255:
            raise OverflowError("unsigned byte integer is greater than maximum")
        self._check_valid()
        self._check_writable()
        if self._pos >= self._size:
            raise ValueError("write byte out of range")
        self._revalidate()
        self._write(self._pos, memoryview(bytes((value,))))
        self._pos += 1

    # -------------------------------------------------------- search and move

    def find(self, sub: Any, start: SupportsIndex | None = None,
             end: SupportsIndex | None = None) -> int:
        return self._find(sub, start, end, reverse=False)

    def rfind(self, sub: Any, start: SupportsIndex | None = None,
              end: SupportsIndex | None = None) -> int:
        return self._find(sub, start, end, reverse=True)

    def _find(self, sub: Any, start_arg: SupportsIndex | None, end_arg: SupportsIndex | None,
              reverse: bool) -> int:
        """Search [start, end) window by window (see _windows): only the
        windows searched are read."""
        needle = _buffer(sub).tobytes()
        self._check_valid()
        start = self._clamp(_ssize(start_arg) if start_arg is not None else self._pos)
        end = self._clamp(_ssize(end_arg) if end_arg is not None else self._size)
        self._check_valid()  # an __index__ may have closed us
        n = len(needle)
        if end - start < n:
            return -1
        if n == 0:
            return end if reverse else start
        self._revalidate()
        for pos, window in self._windows(start, end, n - 1, reverse):
            i = window.rfind(needle) if reverse else window.find(needle)
            if i >= 0:
                return pos + i
        return -1

    def _windows(self, lo: int, hi: int, overlap: int, reverse: bool = False,
                 span: int = _FIRST_WINDOW) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) of [lo, hi), window by window from lo up (from hi
        down if *reverse*), each overlapping the next by *overlap* bytes so
        that a needle of overlap + 1 bytes across a boundary is in one of
        them.  The first window is small (*span*, or twice the needle) and
        each next one 4 times larger, up to CHUNK: a search that ends near
        its start copies little, one that goes far copies in big windows.
        => revalidated.
        """
        span = max(span, 2 * (overlap + 1))
        most = max(CHUNK, span)
        while lo < hi:
            a, b = (max(lo, hi - span), hi) if reverse else (lo, min(hi, lo + span))
            yield a, self._read(a, b - a)
            if (a == lo) if reverse else (b == hi):
                return
            if reverse:
                hi = a + overlap
            else:
                lo = b - overlap
            span = min(4 * span, most)

    def _clamp(self, i: int) -> int:
        if i < 0:
            return max(0, i + self._size)
        return min(i, self._size)

    def move(self, dest: SupportsIndex, src: SupportsIndex, count: SupportsIndex) -> None:
        d, s, cnt = _ssize(dest), _ssize(src), _ssize(count)
        self._check_valid()
        self._check_writable()
        if d < 0 or s < 0 or cnt < 0 or self._size - d < cnt or self._size - s < cnt:
            raise ValueError("source, destination, or count out of range")
        self._revalidate()
        # chunk by chunk in the direction that never reads what it wrote
        offsets = range(0, cnt, CHUNK)
        for i in offsets if d <= s else reversed(offsets):
            k = min(CHUNK, cnt - i)
            self._write(d + i, memoryview(self._read(s + i, k)))

    # -------------------------------------------------------- memory management

    def flush(self, offset: SupportsIndex = 0, size: SupportsIndex | None = None) -> None:
        """Write the dirty pages of [offset, offset+size) back to the file.

        Raises OSError with the write-back's errno; the pages that could not
        be written stay dirty, for a later flush.  *offset* must be a
        multiple of the page size (EINVAL, as Linux's msync).
        """
        off = _ssize(offset)
        n = _opt_ssize(size, self._size if not self._closed else 0)
        self._check_valid()
        if n < 0 or off < 0 or self._size - off < n:
            raise ValueError("flush values out of range")
        if self._access in (ACCESS_READ, ACCESS_COPY):
            return
        if off % self._vm.page_size:
            raise _oserror(errno.EINVAL)
        if self._anon or self._flags != MAP_SHARED:
            return  # nothing behind it to write to
        self._revalidate()
        self._sync(off, n)

    def madvise(self, option: SupportsIndex, start: SupportsIndex = 0,
                length: SupportsIndex | None = None) -> None:
        opt, st = _cint(option), _ssize(start)
        ln = _opt_ssize(length, self._size if not self._closed else 0)
        self._check_valid()
        if st < 0 or st >= self._size:
            raise ValueError("madvise start out of bounds")
        if ln < 0:
            raise ValueError("madvise length invalid")
        if _SSIZE_MAX - st < ln:
            raise OverflowError("madvise length too large")
        ln = min(ln, self._size - st)
        if st % self._vm.page_size:
            raise _oserror(errno.EINVAL)
        va = self._va + st
        uvm_map_advice(self._space, va, self._vm.round_page(va + ln), opt)

    def resize(self, newsize: SupportsIndex) -> None:
        """Change the map's length, and the file's to offset + newsize.

        Raises ValueError with trackfd=False, TypeError for a read-only or
        copy-on-write map, and (as Linux's mremap) OSError EINVAL for 0,
        after the file was truncated.
        """
        new = _ssize(newsize)
        self._check_valid()
        if self._access not in (ACCESS_WRITE, ACCESS_DEFAULT):
            raise TypeError("mmap can't resize a readonly or copy-on-write memory map.")
        if not self._anon and not self._trackfd:
            raise ValueError("mmap can't resize with trackfd=False.")
        if new < 0 or _SSIZE_MAX - new < self._offset:
            raise ValueError("new size out of range")
        if self._fd != -1 and fcntl.fcntl(self._fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise _oserror(errno.EINVAL)  # as ftruncate(2) of our descriptor
        # the file and the object together, in the one order (vnpager.vnmap)
        self._file.setsize(self._offset + new if not self._anon else new)
        if new == 0:
            raise _oserror(errno.EINVAL)
        va = self._file.map(self._space, new, 0 if self._anon else self._offset, self._prot,
                            self._maxprot(), self._flags)
        if self._flags == MAP_PRIVATE:  # carry the private pages over
            for i in range(0, min(new, self._size), CHUNK):
                buf = memoryview(bytearray(min(CHUNK, new - i, self._size - i)))
                uvm_copyin(self._space, self._va + i, buf)
                uvm_copyout(self._space, buf, va + i)
        old_va, self._va = self._va, va
        self._file.unmap(self._space, old_va)
        self._size = new

    # -------------------------------------------------------- sequence

    def __len__(self) -> int:
        self._check_valid()
        return self._size

    def __getitem__(self, item: SupportsIndex | slice) -> Any:
        if type(item) is slice and not self._closed:
            # m[lo:hi] with ints in range, the common case: no conversions
            lo, hi = item.start, item.stop
            if type(lo) is int and type(hi) is int and item.step is None and 0 <= lo < hi <= self._size:
                self._revalidate()
                return uvm_load(self._space, self._va + lo, hi - lo)
        self._check_valid()
        if isinstance(item, slice):
            start, stop, step = item.indices(self._size)
            self._check_valid()
            count = len(range(start, stop, step))
            if count == 0:
                return b""
            self._revalidate()
            if step == 1:
                return self._read(start, count)
            lo = start if step > 0 else start + (count - 1) * step
            parts = [self._read(pos, span)[::abs(step)]
                     for pos, span in self._extended(lo, abs(step), count)]
            data = b"".join(parts)
            return data if step > 0 else data[::-1]
        if not hasattr(type(item), "__index__"):
            raise TypeError("mmap indices must be integers")
        i = self._item_index(item)
        self._check_valid()
        self._revalidate()
        return self._read(i, 1)[0]

    def _item_index(self, item: SupportsIndex) -> int:
        i = _index_arg(item)
        if i < 0:
            i += self._size
        if not 0 <= i < self._size:
            raise IndexError("mmap index out of range")
        return i

    def __setitem__(self, item: SupportsIndex | slice, value: Any) -> None:
        if type(item) is slice and not self._closed and self._access != ACCESS_READ:
            # m[lo:hi] = data with ints in range and a length that fits: no conversions
            lo, hi = item.start, item.stop
            if type(lo) is int and type(hi) is int and item.step is None and 0 <= lo < hi <= self._size:
                view = _buffer(value)
                if len(view) == hi - lo:
                    self._revalidate()
                    uvm_store(self._space, self._va + lo, view)
                    return
        self._check_valid()
        self._check_writable()
        if isinstance(item, slice):
            start, stop, step = item.indices(self._size)
            count = len(range(start, stop, step))
            view = _buffer(value)
            if len(view) != count:
                raise IndexError("mmap slice assignment is wrong size")
            self._check_valid()
            if count == 0:
                return
            self._revalidate()
            if step == 1:
                self._write(start, view)
                return
            if step < 0:  # the same positions in ascending order, with the data reversed
                start, step, view = start + (count - 1) * step, -step, memoryview(view.tobytes()[::-1])
            done = 0
            for pos, span in self._extended(start, step, count):
                # read, modify, write: the bytes between the elements are
                # written back as they were read (a store by another thread
                # in between would be lost; CPython's GIL keeps it out)
                window = bytearray(self._read(pos, span))
                k = len(range(0, span, step))
                window[::step] = view[done:done + k]
                self._write(pos, memoryview(window))
                done += k
            return
        if not hasattr(type(item), "__index__"):
            raise TypeError("mmap indices must be integer")
        i = self._item_index(item)
        if not hasattr(type(value), "__index__"):
            raise TypeError("mmap item value must be an int")
        v = _ssize(value)
        if not 0 <= v <= 255:
            raise ValueError("mmap item value must be in range(0, 256)")
        self._check_valid()
        self._revalidate()
        self._write(i, memoryview(bytes((v,))))

    def __delitem__(self, item: SupportsIndex | slice) -> None:
        self._check_valid()
        self._check_writable()
        if isinstance(item, slice):
            raise TypeError("mmap object doesn't support slice deletion")
        raise TypeError("mmap doesn't support item deletion")

    def __iter__(self) -> Iterator[bytes]:
        """Bytes objects of length 1, as CPython's (its iteration goes through
        the sequence protocol, which returns bytes where indexing gives ints),
        each read when it is reached.  They are of a bytes subclass whose
        ``__index__`` raises a TypeError that says what to do instead: so
        ``bytearray(m)`` (which, without the buffer protocol, iterates and
        wants ints) fails with a message naming ``bytearray(m[:])``."""
        i = 0
        while True:
            self._check_valid()
            if i >= self._size:
                return
            self._revalidate()
            yield _Byte(self._read(i, 1))
            i += 1

    def __reversed__(self) -> Iterator[bytes]:
        self._check_valid()
        i = self._size - 1
        while i >= 0:
            self._check_valid()
            if i < self._size:
                self._revalidate()
                yield _Byte(self._read(i, 1))
            i -= 1

    def __contains__(self, item: object) -> bool:
        """The stdlib's answer to ``item in m``: its mmap has no
        ``__contains__``, so ``in`` iterates one-byte bytes objects and
        compares each with *item*.  It is a one-byte membership test:
        ``b"a" in m`` looks for the byte 97, ``b"ab" in m`` and ``97 in m``
        are False.  Instead of iterating, *item* is compared with the 256
        one-byte values once and the map searched for those that are equal
        (the same answer for any *item* whose == does not change its mind).
        """
        self._check_valid()
        if type(item) is bytes or type(item) is bytearray:  # the usual case: no == calls
            wanted = bytes(item) if len(item) == 1 else b""
        else:
            wanted = bytes(v for v in range(256) if bytes((v,)) == item)
        if not wanted or not self._size:
            return False
        self._revalidate()
        others = bytes(v for v in range(256) if v not in wanted)
        for _, window in self._windows(0, self._size, 0):
            if window.find(wanted) >= 0 if len(wanted) == 1 else window.translate(None, others):
                return True
        return False

    def __bytes__(self) -> bytes:
        """``bytes(m)``: a copy of the whole map (there is no buffer protocol,
        see the module docstring)."""
        self._check_valid()
        self._revalidate()
        return self._read(0, self._size)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> Any:
        """``numpy.asarray(m)``: a copy of the map as a writable uint8 array
        (CPython's mmap gives a view; ours has no contiguous memory to view,
        so ``copy=False`` raises ValueError, as numpy asks)."""
        import numpy  # a test-only dependency: only users of numpy get here

        if copy is False:
            raise ValueError("a vnpager.mmap cannot be viewed without a copy: its pages are not "
                             "contiguous memory")
        self._check_valid()
        self._revalidate()
        array = numpy.empty(self._size, dtype=numpy.uint8)
        view: memoryview = array.data
        for i in range(0, self._size, CHUNK):
            uvm_copyin(self._space, self._va + i, view[i:i + CHUNK])
        return array if dtype is None else array.astype(dtype, copy=False)

    def _maxprot(self) -> int:
        """=> only for remapping: the first mapping checked the descriptor."""
        return self._prot | PROT_READ


class _Byte(bytes):
    """One byte of a map, as its iteration yields it: a bytes of length 1
    (as the stdlib's), which refuses to be an int with advice (see
    mmap.__iter__)."""

    __slots__ = ()

    def __index__(self) -> int:
        raise TypeError("the items of a vnpager.mmap are bytes of length 1, not ints; to copy the "
                        "map use bytearray(m[:]) or bytes(m) (it has no buffer protocol)")


def _own_descriptor(fd: int) -> tuple[int, bool]:
    """A descriptor of the file open on *fd* for the map to keep, and
    whether its file description is ours alone: the file reopened through
    /proc with the same access mode, whose offset nobody else uses, so that
    the size check may lseek it.  Else (no /proc, or no permission any
    more) a duplicate, whose offset is the caller's."""
    mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    try:
        return os.open(f"/proc/self/fd/{fd}", mode | os.O_CLOEXEC), True
    except OSError:
        return os.dup(fd), False


def _fd_size(fd: int) -> tuple[int, bool]:
    """(size, is a regular file) of the file open on *fd*; (-1, False) for
    -1, anonymous memory.  Raises OSError (EBADF), as CPython's fstat."""
    if fd == -1:
        return -1, False
    st = os.fstat(fd)
    return st.st_size, stat.S_ISREG(st.st_mode)


def _vnode_size(vp: Vnode) -> tuple[int, bool]:
    """(size, is a regular file) of the file of *vp*.  Raises OSError."""
    vattr = Vattr()
    err = VOP_GETATTR(vp, vattr)
    if err:
        raise _oserror(err)
    return vattr.va_size, vp.v_type == VREG


def _fit(size: int, off: int, file_size: int) -> int:
    """The length of a map of *size* bytes (0: to the end) at *off* of a
    regular file of *file_size* bytes; ValueError as CPython's."""
    if size == 0:
        if file_size == 0:
            raise ValueError("cannot mmap an empty file")
        if off >= file_size:
            raise ValueError("mmap offset is greater than file size")
        return file_size - off
    if off > file_size or file_size - off < size:
        raise ValueError("mmap length is greater than file size")
    return size


def _fd_maxprot(fd: int, sharing: int, prot: int) -> int:
    """The most a map of *fd* may be given, as the kernel's mmap(2) checks
    the descriptor's access mode: EACCES if *prot* is more."""
    mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    if mode == os.O_WRONLY or (sharing == MAP_SHARED and prot & PROT_WRITE and mode != os.O_RDWR):
        raise _oserror(errno.EACCES)
    return PROT_READ | PROT_EXEC | (PROT_WRITE if sharing == MAP_PRIVATE or mode == os.O_RDWR else 0)
