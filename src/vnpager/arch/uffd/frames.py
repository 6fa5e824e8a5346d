"""The uffd machine's page frames: a memfd per object (its uvm_page_physload).

Physical memory is not one arena here: an object's pages live in a memfd
of its own, page for page (memfd offset = object offset), because that is
what the clients map ``MAP_SHARED`` and what UFFDIO_CONTINUE maps a fault
onto.  A VmPage is a budget slot: while it is free its ``data`` is
``unbound`` (a read-only page of zeros: a store into a free page is a
bug, and raises TypeError); :meth:`Frames.bind`, called by uvm_pageinsert,
points it at the object's page through the server's own MAP_SHARED view
of the memfd, so that I/O reads and writes the client's memory in place;
:meth:`Frames.unbind`, called by uvm_pageremove, punches the page out of
the memfd (fallocate PUNCH_HOLE: it leaves every process's page tables,
and the next touch is a MISSING fault) and makes ``data`` unbound again.
So the resident pages of all memfds are never more than the VM's pages:
``physmem`` bounds them (:meth:`Frames.resident` counts them from the
memfds themselves, ``VmStats.frames_resident``).

The size of a memfd follows its object's (:meth:`Frames.setsize`, called
by uvm_vnp_setsize), so that a client's mmap of it is validated against
the file's size and a touch past the end is the kernel's own SIGBUS.  It
is never smaller than the end of a page still bound, though: the server's
view of a page past a memfd's end would be SIGBUS in the *server* (an
asynchronous write-back of a page a truncation is waiting for).  The view
is a reservation of address space larger than the memfd (``VIEW_MIN``, or
twice what is needed), replaced by a larger one when the object grows
past it; older views stay mapped while the object's frames live, since
bound pages hold memoryviews of them.

An object's frames are made on first use (a page bound, or a client
asking for the memfd: :meth:`Frames.memfd`) and dropped when its last
page leaves and nobody holds the object (``uo_refs`` 0: a client's map
holds a reference, so a memfd is never replaced under a client that maps
it).

Locks: ``Frames.lock`` (a leaf) guards ``objects`` (changes; an entry is
dropped only under its object's lock too, so that a binder finds it
unlocked), ``unpunched``, ``npending``, each object's ``pending`` and
the punches; an object's :class:`ObjectFrames` is changed under that
object's lock (bind, unbind, setsize and release are called with it held).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from typing import TYPE_CHECKING

from .libc import checked, libc
from .shm import PAGE_SIZE, MemFile

if TYPE_CHECKING:
    from vnpager.uvm.uvm_object import UvmObject
    from vnpager.uvm.uvm_page import VmPage

VIEW_MIN = 1 << 30  # bytes of address space reserved for an object's view at least

libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int64]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FAILED = ctypes.c_void_p(-1).value


class View:
    """A MAP_SHARED read-write mapping of [0, length) of a memfd, which may
    be longer than the memfd (pages past its end are SIGBUS: never touch
    them), and a memoryview of it.  Unmapped by :meth:`close`, which
    => no memoryview of it is in use."""

    __slots__ = ("address", "length", "mem")

    def __init__(self, fd: int, length: int) -> None:
        addr = libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == MAP_FAILED:
            checked(-1, f"mmap memfd {fd} for {length:#x} bytes")
        self.address: int = addr
        self.length = length
        self.mem = memoryview((ctypes.c_char * length).from_address(addr)).cast("B")

    def zap(self, offset: int, length: int) -> None:
        """Drop the server's own PTEs of [offset, offset+length) (the pages
        stay in the memfd): so that a client's PAGEOUT of a page finds it
        mapped once (the kernel skips pages mapped by more than one process)."""
        checked(libc.madvise(self.address + offset, length, mmap.MADV_DONTNEED), "madvise DONTNEED")

    def close(self) -> None:
        self.mem.release()
        checked(libc.munmap(self.address, self.length), "munmap")


class ObjectFrames:
    """One object's frames: its memfd, the server's views of it, and the
    offsets of the pages bound to it (=> the object's lock, see above)."""

    __slots__ = ("bound", "memfile", "memsize", "pending", "size", "views")

    def __init__(self, name: str, size: int) -> None:
        self.size = size  # the object's size, as setsize last said
        self.memfile = MemFile.create(name, size)
        self.memsize = size  # the memfd's (we alone change it: no fstat per page)
        self.views = [View(self.memfile.fd, max(VIEW_MIN, 2 * mmap_length(size)))]
        self.bound: set[int] = set()
        self.pending: list[int] = []  # offsets unbound and not yet punched (=> Frames.lock)

    @property
    def view(self) -> View:
        return self.views[-1]

    def page(self, offset: int) -> memoryview:
        """The server's view of the page at *offset* (growing the memfd to
        hold it if need be, see the module docstring)."""
        end = offset + PAGE_SIZE
        if end > self.view.length:
            self.views.append(View(self.memfile.fd, 2 * mmap_length(end)))
        if end > self.memsize:
            self._truncate(end)
        self.bound.add(offset)
        return self.view.mem[offset:end]

    def resize(self) -> None:
        """The memfd's size: the object's, but never below a bound page's end."""
        want = max(self.size, max(self.bound, default=-PAGE_SIZE) + PAGE_SIZE)
        if want != self.memsize:
            self._truncate(want)

    def _truncate(self, size: int) -> None:
        self.memfile.resize(size)
        self.memsize = size

    def close(self) -> None:
        for view in self.views:
            view.close()
        self.memfile.close()


def page_runs(offsets: list[int], page_size: int) -> list[tuple[int, int]]:
    """The runs [start, end) of the pages at the sorted *offsets*."""
    runs: list[tuple[int, int]] = []
    for off in offsets:
        if runs and runs[-1][1] == off:
            runs[-1] = (runs[-1][0], off + page_size)
        elif not runs or runs[-1][1] < off:
            runs.append((off, off + page_size))
    return runs


def mmap_length(size: int) -> int:
    """*size* rounded up to a page, and at least one page."""
    return max(PAGE_SIZE, -(-size // PAGE_SIZE) * PAGE_SIZE)


class Frames:
    """The frames of one uffd machine: *npages* budget slots of the host's
    page size, and the :class:`ObjectFrames` of each object with frames."""

    __slots__ = ("lock", "npages", "npending", "objects", "page_size", "unbound", "unpunched")

    def __init__(self, npages: int, page_size: int) -> None:
        if page_size != PAGE_SIZE:
            raise ValueError(f"the uffd machine's page_size is the host's ({PAGE_SIZE}), not {page_size}")
        self.npages = npages
        self.page_size = page_size
        self.unbound = memoryview(bytes(page_size))  # read-only: a free page's data
        self.objects: dict[UvmObject, ObjectFrames] = {}
        self.unpunched: dict[ObjectFrames, None] = {}  # those with pending punches
        self.npending = 0  # their pending pages
        self.lock = threading.Lock()

    def frame(self, i: int) -> memoryview:
        """A free page's ``data``: unbound (see the module docstring)."""
        return self.unbound

    def _of(self, uobj: UvmObject, punch: bool = False) -> ObjectFrames:
        """*uobj*'s frames, made on first use; with *punch*, the pending
        punches done first.  Found without the lock when there is nothing
        to punch: frames are dropped only under their object's lock (unbind,
        release), which a binder holds, and a memfd asker holds a reference."""
        if not (punch and self.npending):
            of = self.objects.get(uobj)
            if of is not None:
                return of
        with self.lock:
            if punch and self.npending:
                self._punch_pending()
            of = self.objects.get(uobj)
            if of is None:
                of = self.objects[uobj] = ObjectFrames(f"vnpager-{id(uobj):x}", _size_of(uobj))
            return of

    def memfd(self, uobj: UvmObject) -> int:
        """The fd of *uobj*'s memfd (owned by the frames: dup it to keep it).
        => caller holds a reference to *uobj*, so the memfd outlives its use."""
        return self._of(uobj).memfile.fd

    def object_frames(self, uobj: UvmObject) -> ObjectFrames | None:
        with self.lock:
            return self.objects.get(uobj)

    def bind(self, pg: VmPage) -> None:
        """*pg* entered its object: its data is the object's memfd page.
        The pages freed since the last bind are punched out first (see
        unbind).  => caller holds the object lock."""
        assert pg.uobject is not None
        pg.data = self._of(pg.uobject, punch=True).page(pg.offset)

    def unbind(self, pg: VmPage) -> None:
        """*pg* leaves its object: its page is to be punched out of the
        memfd, and the object's frames dropped if that was the last page of
        an object nobody holds.  => caller holds the object lock; the page
        is unmapped (write-protected where a client still has it).

        The punch waits for the next bind, so that the pages a pass of the
        page daemon frees go in one fallocate per run of them: until then
        the page stays in the memfd, clean, a client may still load it, and
        it counts among the resident pages -- never more of them than
        physmem all the same, as no freed slot is bound again before the
        punch."""
        uobj = pg.uobject
        assert uobj is not None
        pg.data = self.unbound
        with self.lock:
            of = self.objects[uobj]
            of.bound.discard(pg.offset)
            of.pending.append(pg.offset)
            self.npending += 1
            self.unpunched[of] = None
            idle = not of.bound and uobj.uo_refs == 0
            if idle or of.memsize > of.size:  # dropped, or shrunk below a page kept past a truncation
                self._punch_pending()
            if idle:
                del self.objects[uobj]
        if idle:
            of.close()
        elif of.memsize > of.size and pg.offset + PAGE_SIZE >= of.memsize:
            of.resize()  # the page kept past a truncation is gone: the memfd shrinks to the object

    def _punch_pending(self) -> None:
        """Punch out the pages unbound since the last time, one fallocate
        per run.  => self.lock held."""
        for of in self.unpunched:
            for start, end in page_runs(sorted(of.pending), PAGE_SIZE):
                of.memfile.punch(start, end - start)
            of.pending.clear()
        self.unpunched.clear()
        self.npending = 0

    def zap(self, uobj: UvmObject, offsets: list[int]) -> None:
        """Drop the server's own PTEs of *uobj*'s pages at *offsets* (see
        View.zap), if its frames still live (under the lock, so that they
        cannot be closed meanwhile: their views' addresses may be reused)."""
        with self.lock:
            of = self.objects.get(uobj)
            if of is None:
                return
            for start, end in page_runs(sorted(offsets), PAGE_SIZE):
                for view in of.views:
                    if start < view.length:
                        view.zap(start, min(end, view.length) - start)

    def release(self, uobj: UvmObject) -> None:
        """Drop *uobj*'s frames if no page of it is bound and nobody holds
        it (a map made and unmapped untouched: unbind never comes).
        => caller holds the object lock."""
        with self.lock:
            of = self.objects.get(uobj)
            if of is None or of.bound or uobj.uo_refs:
                return
            self._punch_pending()
            del self.objects[uobj]
        of.close()

    def setsize(self, uobj: UvmObject, size: int) -> None:
        """*uobj*'s size is now *size*: so is its memfd's (see above).
        => caller holds the object lock."""
        of = self.object_frames(uobj)
        if of is not None:
            of.size = size
            of.resize()

    def check(self, pages: list[VmPage]) -> str | None:
        """What is wrong with the frames of *pages* (None: nothing): a page
        is bound exactly while it is in an object, to its object's memfd at
        its offset, and the memfds hold no more pages than there are.
        => no page changes meanwhile (VM.check_invariants)."""
        with self.lock:
            bound = {(uobj, off) for uobj, of in self.objects.items() for off in of.bound}
            files = [of.memfile for of in self.objects.values()]
        tabled = {(pg.uobject, pg.offset) for pg in pages if pg.uobject is not None}
        if bound != tabled:
            return f"{len(bound - tabled)} pages bound out of their objects, {len(tabled - bound)} unbound in"
        for pg in pages:
            if (pg.uobject is None) != (pg.data is self.unbound):
                return f"page {pg!r}: its data and its object disagree"
        resident = sum(os.fstat(f.fd).st_blocks * 512 // self.page_size for f in files)
        if resident > self.npages:
            return f"{resident} pages resident in the memfds, more than the {self.npages} of the VM"
        return None

    def resident(self, npages_free: int) -> int:
        """The pages resident in all the memfds now (what the host holds)."""
        with self.lock:
            files = [of.memfile for of in self.objects.values()]
        return sum(os.fstat(f.fd).st_blocks * 512 // self.page_size for f in files)


def _size_of(uobj: UvmObject) -> int:
    """The size an object's memfd starts with: a vnode object's u_size
    (every object of this VM is one; anything else starts empty)."""
    size: int = getattr(uobj, "u_size", 0)
    return size
