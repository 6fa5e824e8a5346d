"""Maps that are memory: :class:`HwMmap`, an ``mmap.mmap`` over a memfd.

A hardware map is CPython's own mmap object (a subclass of it), made with
the *user's* arguments over the memfd that holds the file's pages in the
server: CPython validates the arguments and gives every error it always
gives, and the buffer protocol, slicing, ``find``, ``move`` and the rest are
CPython's C code on real memory -- zero copy, and a warm access never
leaves the client.  A page not yet mapped faults into the server through
the client's userfaultfd; the server reads it into the memfd (the pager's
page) and maps it.

The methods that change the map's life or its file go to the server
(:mod:`vnpager.server.protocol`), with the software MMU's semantics:
``flush()`` writes back and raises a write-back error once per map
(errseq), ``close()`` writes back a shared writable map and persists the
object, ``madvise()`` drives the pager's read-ahead, ``resize()`` changes
the file and the object under the object's size lock, ``size()`` is the
file's size as the pager sees it.  Failure semantics are the kernel's: a
read error or a page past the end of a truncated file is SIGBUS, and a
server that died gives SIGBUS on the next fault and :class:`ServerGone`
(an OSError) from these methods.

A map of an object of an object store (:meth:`HwMmap.of_url`, what
``vm.map(url)`` makes) is the same kind of map over the object's memfd:
the server looks the URL up instead of receiving a descriptor.

Anonymous maps (``fileno=-1``) are the host's anonymous memory: not
under the VM's budget, and not seen by the server at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import operator
import os
import stat
from typing import TYPE_CHECKING, Any, SupportsIndex

if TYPE_CHECKING:
    from vnpager.client.vm import HardwareVM

ACCESS_DEFAULT, ACCESS_READ, ACCESS_WRITE, ACCESS_COPY = (
    mmap.ACCESS_DEFAULT, mmap.ACCESS_READ, mmap.ACCESS_WRITE, mmap.ACCESS_COPY)
RW = mmap.PROT_READ | mmap.PROT_WRITE

#: The advice the pager takes (uvm_map_advice); other advice is EINVAL, as
#: on the software MMU.  Each is harmless to give the client's own mapping
#: too (CPython's madvise checks the arguments by doing so).
ADVICE = frozenset({mmap.MADV_NORMAL, mmap.MADV_RANDOM, mmap.MADV_SEQUENTIAL, mmap.MADV_WILLNEED,
                    mmap.MADV_DONTNEED})


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_mprotect = ctypes.CDLL(None, use_errno=True).mprotect
_mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def address(m: mmap.mmap) -> int:
    """The address of a mapping's first byte, read-only maps too (ctypes'
    from_buffer wants a writable one).  The buffer is released at once, so
    the map can still be closed or resized."""
    view = _PyBuffer()
    _get_buffer(m, ctypes.byref(view), 0)  # PyBUF_SIMPLE
    try:
        return int(view.buf or 0)
    finally:
        _release_buffer(ctypes.byref(view))


def effective(flags: int, prot: int, access: int) -> tuple[int, int, int]:
    """(flags, prot, access) as CPython resolves them: ``access`` sets the
    other two, else is derived from ``prot``.  => CPython accepted them."""
    if access == ACCESS_READ:
        return mmap.MAP_SHARED, mmap.PROT_READ, access
    if access == ACCESS_WRITE:
        return mmap.MAP_SHARED, RW, access
    if access == ACCESS_COPY:
        return mmap.MAP_PRIVATE, RW, access
    if prot & RW != RW:
        access = ACCESS_WRITE if prot & mmap.PROT_WRITE else ACCESS_READ
    return flags, prot, access


class HwMmap(mmap.mmap):
    """``mmap.mmap`` on the hardware MMU: see the module docstring.

    ``HwMmap(fileno, length, flags=MAP_SHARED, prot=PROT_WRITE|PROT_READ,
    access=ACCESS_DEFAULT, offset=0, *, trackfd=True, vm)``

    Fields, set once in ``__new__`` (``_addr`` changes in resize): the VM,
    the mapping's address in this process (the server's name for the map),
    the resolved access, flags and prot, the file's offset, whether the
    user's descriptor was read-only (resize is EINVAL then, as its
    ftruncate would be) and trackfd.
    """

    __slots__ = ("_access", "_addr", "_flags", "_offset", "_prot", "_rdonly", "_trackfd", "_vm")

    _vm: HardwareVM | None  # None: anonymous memory, the host's
    _addr: int
    _access: int
    _flags: int
    _prot: int
    _offset: int
    _rdonly: bool
    _trackfd: bool

    def __new__(cls, fileno: SupportsIndex, length: SupportsIndex, flags: SupportsIndex = mmap.MAP_SHARED,
                prot: SupportsIndex = RW, access: SupportsIndex = ACCESS_DEFAULT, offset: SupportsIndex = 0,
                *, trackfd: bool = True, vm: HardwareVM) -> HwMmap:
        # ints as CPython's argument parser takes them (the same TypeError);
        # CPython checks their ranges
        fd, n, fl, pr, ac, off = map(operator.index, (fileno, length, flags, prot, access, offset))
        if fd == -1 or fl & mmap.MAP_ANONYMOUS:
            self = super().__new__(cls, fd, n, fl, pr, ac, off)
            self._vm, self._rdonly, self._addr, self._offset, self._trackfd = None, False, 0, off, trackfd
            self._flags, self._prot, self._access = effective(fl, pr, ac)
            return self
        # The user's file itself checks every argument, its size and the
        # descriptor's access mode (the memfd is always read-write), with
        # CPython's errors: the kernel's mmap(2) of it, at once undone.
        mmap.mmap(fd, n, fl, pr, ac, off).close()
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        rdonly = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        return cls._granted(vm, fd, rdonly, n, fl, pr, ac, off, trackfd)

    @classmethod
    def of_url(cls, vm: HardwareVM, url: str, length: SupportsIndex = 0,
               flags: SupportsIndex = mmap.MAP_SHARED, prot: SupportsIndex = RW,
               access: SupportsIndex = ACCESS_DEFAULT, offset: SupportsIndex = 0) -> HwMmap:
        """A map of the object at *url* (``s3://bucket/key``, ``https://...``),
        which the server looks up on its VM's objfs mounts (close-to-open),
        with ``mmap.mmap``'s arguments after the descriptor.  There is no
        descriptor of the user's to check them on: the server checks the
        size and the store's access (a read-only store: PermissionError
        for a writable map), CPython the rest on the memfd."""
        n, fl, pr, ac, off = map(operator.index, (length, flags, prot, access, offset))
        return cls._granted(vm, url, False, n, fl, pr, ac, off, True)

    @classmethod
    def _granted(cls, vm: HardwareVM, target: int | str, rdonly: bool, n: int, fl: int, pr: int, ac: int,
                 off: int, trackfd: bool) -> HwMmap:
        """The map of the server's grant for *target* (a descriptor or a
        URL), made with the user's arguments over the object's memfd."""
        eflags, eprot, eaccess = effective(fl, pr, ac)
        grant, memfd = vm.grant(target, n, off, eprot, eflags)
        with vm.space_lock:  # our address is the server's name for the map: see close()
            try:
                self = super().__new__(cls, memfd, n, fl, pr, ac, off)
            except BaseException:
                vm.release(grant)
                raise
            finally:
                os.close(memfd)  # CPython holds its own duplicate
            self._vm, self._addr, self._trackfd, self._rdonly = vm, address(self), trackfd, rdonly
            self._flags, self._prot, self._access, self._offset = eflags, eprot, eaccess, off
            try:
                vm.request("mapped", grant, self._addr, len(self))
            except BaseException:
                mmap.mmap.close(self)
                vm.release(grant)
                raise
        vm.track(self)
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Everything is done in __new__, as CPython's type does."""

    # -------------------------------------------------------- life

    def _writes_back(self) -> bool:
        return self._vm is not None and self._flags & mmap.MAP_SHARED != 0 and self._access not in (
            ACCESS_READ, ACCESS_COPY)

    def close(self) -> None:
        """Write a shared writable map back, unmap, and let the server
        persist the object.  The map is closed even if the write-back fails
        (then its error is raised).  While exported buffers (a memoryview, a
        numpy array) exist, CPython's close raises BufferError: the map is
        then written back but stays open and mapped in the server."""
        vm = self._vm
        if self.closed or vm is None:
            super().close()
            return
        error: OSError | None = None
        if self._writes_back():
            try:
                vm.request("flush", self._addr, 0, len(self))
            except OSError as e:
                error = e
        # The server names a map by its address: from our munmap until the
        # server has forgotten the map, no other map of this VM may be made
        # (it could get the same address, and lose its entry to our unmap).
        with vm.space_lock:
            super().close()  # BufferError if exported: nothing more is undone
            try:
                vm.request("unmap", self._addr)
            except OSError as e:
                error = error or e
            finally:
                vm.untrack(self)
        if error is not None:
            raise error

    def revoke(self) -> None:
        """Make the map's memory inaccessible (PROT_NONE: a touch is
        SIGSEGV), for a map that outlives its VM because close() could not
        unmap it (exported buffers): once nobody serves its faults, its
        missing pages would read as zeros."""
        if self._vm is not None and not self.closed:
            _mprotect(self._addr, len(self), 0)  # PROT_NONE

    def __del__(self) -> None:
        if getattr(self, "_vm", None) is not None and not self.closed:
            with contextlib.suppress(OSError, BufferError):  # the server has the pages: it writes them back
                self.close()

    def __repr__(self) -> str:
        """CPython's, under the name the user asked for: ``mmap.mmap``."""
        text = super().__repr__()
        return "<mmap.mmap" + text[text.index(" "):]

    def __enter__(self) -> HwMmap:
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------- through the server

    def flush(self, offset: SupportsIndex = 0, size: SupportsIndex | None = None) -> None:
        """Write the dirty pages of [offset, offset+size) back to the file;
        OSError with the write-back's errno (once per map for an error that
        happened elsewhere), the pages staying dirty."""
        off = operator.index(offset)
        n = (len(self) if not self.closed else 0) if size is None else operator.index(size)  # as CPython
        super().flush(off, n)  # CPython's checks (and an msync of the memfd: nothing to write)
        if self._writes_back():
            assert self._vm is not None
            self._vm.request("flush", self._addr, off, n)

    def madvise(self, option: SupportsIndex, start: SupportsIndex = 0,
                length: SupportsIndex | None = None) -> None:
        """Advice for the pager's read-ahead (see ADVICE; other advice is
        EINVAL, as on the software MMU)."""
        opt = operator.index(option)
        rest = (start,) if length is None else (start, length)
        if self._vm is None:
            super().madvise(opt, *rest)  # the host's anonymous memory
            return
        # CPython checks the range by advising our own mapping; only advice
        # that cannot hurt it (MADV_REMOVE would punch the pager's memfd)
        super().madvise(opt if opt in ADVICE else mmap.MADV_NORMAL, *rest)
        if opt not in ADVICE:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        st = operator.index(start)
        n = len(self) - st if length is None else min(operator.index(length), len(self) - st)
        self._vm.request("madvise", self._addr, st, n, opt)

    def size(self) -> int:
        """The file's size, as the pager sees it; OSError EBADF for
        anonymous memory or trackfd=False, as CPython's."""
        if self._vm is None or not self._trackfd:
            if self.closed:
                return super().size()  # ValueError
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        super().__len__()  # ValueError if closed
        size: int = self._vm.request("size", self._addr)
        return size

    def resize(self, newsize: SupportsIndex) -> None:
        """Change the map's length, and the file's to offset + newsize
        (file, object and memfd together, in the server).

        TypeError for a read-only or copy-on-write map, ValueError with
        trackfd=False, OSError EINVAL for a file open read-only and (as
        Linux's mremap) for 0, after the file was truncated.  The mapping
        may move (mremap); it is registered again at its new address.
        """
        vm, new = self._vm, operator.index(newsize)
        if vm is None:
            super().resize(new)
            return
        len(self)  # ValueError if closed
        if self._access in (ACCESS_READ, ACCESS_COPY):
            raise TypeError("mmap can't resize a readonly or copy-on-write memory map.")
        if not self._trackfd:
            raise ValueError("mmap can't resize with trackfd=False.")
        if new < 0 or new > (1 << 63) - 1 - self._offset:
            raise ValueError("new size out of range")
        if self._rdonly:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))  # as ftruncate(2) of it
        vm.request("resize", self._addr, new)
        # CPython's ftruncate of the memfd is a no-op now; its mremap may
        # move the range, which loses its registration: the server enters
        # and registers it again where it is now.
        with vm.space_lock:  # a move frees the old address (see close())
            super().resize(new)
            old, self._addr = self._addr, address(self)
            vm.request("moved", old, self._addr, new)
