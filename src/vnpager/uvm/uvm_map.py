"""Address spaces (uvm_map.c, uvm_mmap.c).

A :class:`Vmspace` is one address space: a :class:`~vnpager.uvm.pmap.Pmap`
and a sorted set of :class:`VmMapEntry`, each mapping a range of virtual
addresses onto an object at an offset, with a protection, a maximum
protection and the advice it was given.

A private (copy-on-write) entry has an :class:`Amap` on top of its object:
pages written through the entry are copied into the amap's own anonymous
object, and never reach the file.  The anonymous object is a swapfs file
paged by the vnode pager, so the page daemon can push anonymous pages out
exactly as it does file pages (swapfs plays the part of swap, on disk).

=> ``space.lock`` (write) guards the entries; faults take it for read.
   ``space.timestamp`` changes with every change to the entries, so that a
   fault that dropped the lock for I/O can tell whether its entry survived.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from sortedcontainers import SortedDict

from vnpager.kern.lock import LK_EXCLUSIVE, LK_RETRY, RW_READ, RW_WRITE, RWLock, gated, kernel_lock
from vnpager.uvm.pmap import pmap_create, pmap_is_modified, pmap_page_protect, pmap_protect, pmap_remove
from vnpager.uvm.uvm_page import PG_BUSY, PG_CLEAN, uvm_pagedeactivate, uvm_pagefree
from vnpager.uvm.uvm_pager import PGO_CLEANIT, PGO_FREE, PGO_SYNCIO
from vnpager.uvm.uvm_param import (
    MADV_DONTNEED,
    MADV_NORMAL,
    MADV_RANDOM,
    MADV_SEQUENTIAL,
    MADV_WILLNEED,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)
from vnpager.uvm.uvm_readahead import UvmRactx
from vnpager.uvm.uvm_vnode import UvmVnode, uvm_vnp_setsize, uvm_vnp_uncache, uvn_attach
from vnpager.vfs.swapfs import swapfs_create
from vnpager.vfs.vnode import VOP_UNLOCK, vn_lock

if TYPE_CHECKING:
    from vnpager.uvm.uvm import VM
    from vnpager.uvm.uvm_object import UvmObject

MAP_SHARED = 0x01
MAP_PRIVATE = 0x02

MS_ASYNC = 0x1
MS_INVALIDATE = 0x2
MS_SYNC = 0x4

VM_MIN_ADDRESS = 1 << 32  # leave low addresses unmapped, as a real process does


@dataclass(eq=False)
class Amap:
    """The anonymous layer of private entries: written pages by offset.

    ``slots`` are the amap offsets that hold a page of their own (resident
    in ``obj`` or paged out to its swap file).  Entries split from one
    another share the amap, each holding a reference to ``obj``.
    """

    obj: UvmVnode
    slots: set[int] = field(default_factory=set)


@dataclass(eq=False)
class VmMapEntry:
    start: int
    end: int
    object: UvmObject | None
    offset: int  # object offset of ``start``
    protection: int
    max_protection: int
    advice: int = MADV_NORMAL
    shared: bool = True
    amap: Amap | None = None
    amap_offset: int = 0  # amap offset of ``start``
    ra: UvmRactx = field(default_factory=UvmRactx)  # the read-ahead of its faults

    def __repr__(self) -> str:
        kind = "shared" if self.shared else "private"
        return f"<VmMapEntry {self.start:#x}-{self.end:#x} {kind} prot={self.protection}>"


class Vmspace:
    """One address space (``struct vmspace``)."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.pmap = pmap_create(vm)
        self.lock = RWLock("vm_map")
        self.entries: SortedDict[int, VmMapEntry] = SortedDict()
        self.timestamp = 0
        self._next_va = VM_MIN_ADDRESS

    def lookup(self, va: int) -> VmMapEntry | None:
        """The entry holding *va*.  => caller holds ``lock``."""
        i = self.entries.bisect_right(va) - 1
        if i < 0:
            return None
        entry: VmMapEntry = self.entries.peekitem(i)[1]
        return entry if va < entry.end else None

    def entries_in(self, start: int, end: int) -> list[VmMapEntry]:
        """The entries overlapping [start, end), in order."""
        first = self.entries.bisect_right(start) - 1
        out = []
        for k in self.entries.islice(max(first, 0)):
            e: VmMapEntry = self.entries[k]
            if e.start >= end:
                break
            if e.end > start:
                out.append(e)
        return out

    def _clip(self, entry: VmMapEntry, at: int) -> VmMapEntry:
        """Split *entry* at *at*; return the upper half.  => lock held (write)."""
        delta = at - entry.start
        upper = replace(entry, start=at, offset=entry.offset + delta,
                        amap_offset=entry.amap_offset + delta, ra=UvmRactx())
        entry.end = at
        if entry.object is not None:
            entry.object.pgops.pgo_reference(entry.object)
        if entry.amap is not None:
            entry.amap.obj.pgops.pgo_reference(entry.amap.obj)
        self.entries[at] = upper
        return upper

    def _range(self, start: int, end: int) -> list[VmMapEntry]:
        """The entries of [start, end), clipped to it.  => lock held (write)."""
        out = []
        for e in self.entries_in(start, end):
            if e.start < start:
                e = self._clip(e, start)
            if e.end > end:
                self._clip(e, end)
            out.append(e)
        return out


@gated
def uvm_map(space: Vmspace, size: int, uobj: UvmObject | None, uoffset: int, prot: int,
            maxprot: int, flags: int, advice: int = MADV_NORMAL, *, va: int | None = None) -> int:
    """Map *size* bytes of *uobj* from *uoffset*; return the address.

    The entry takes over the caller's reference to *uobj*.  A MAP_PRIVATE
    entry gets an amap whose anonymous object the caller need not know of.
    With *va* the entry goes at that address (a page boundary; the uffd
    machine's clients choose their addresses), and a range overlapping an
    entry is refused (EEXIST, as MAP_FIXED_NOREPLACE): unmap it first.
    """
    vm = space.vm
    size = vm.round_page(size)
    if size <= 0:
        raise ValueError("cannot map zero bytes")
    if uoffset < 0 or uoffset % vm.page_size:
        # the pages of an object sit at page boundaries: anything else would
        # table a second copy of the bytes at an offset no one else uses
        raise OSError(errno.EINVAL, f"object offset {uoffset:#x} is not a page boundary")
    if prot & ~maxprot:
        raise PermissionError(errno.EACCES, "protection exceeds the maximum protection")
    if va is not None and (va < 0 or va % vm.page_size):
        raise OSError(errno.EINVAL, f"address {va:#x} is not a page boundary")
    amap = None
    if flags & MAP_PRIVATE:
        amap = Amap(uvm_anon_object(vm, size))
    space.lock.rw_enter(RW_WRITE)
    try:
        if va is None:
            va = space._next_va
            space._next_va += size + vm.page_size  # a guard page between mappings
        overlaps = bool(space.entries_in(va, va + size))
        if not overlaps:
            space.entries[va] = VmMapEntry(va, va + size, uobj, uoffset, prot, maxprot, advice,
                                           shared=not flags & MAP_PRIVATE, amap=amap)
            space.timestamp += 1
    finally:
        space.lock.rw_exit()
    if overlaps:
        if amap is not None:  # not under the map lock: detach may sleep
            amap.obj.pgops.pgo_detach(amap.obj)
        raise FileExistsError(errno.EEXIST, f"[{va:#x}, {va + size:#x}) overlaps a mapping")
    return va


@gated
def uvm_anon_object(vm: VM, size: int) -> UvmVnode:
    """A fresh anonymous object of *size* bytes, zero-filled, paged out to
    the VM's swap (swapfs: a file on disk, made at the first page-out),
    referenced once.

    Nobody can attach it again, so it does not persist: it dies with its
    last reference (see :func:`uvm_anon_discard` to spare it the writes).
    """
    vp = swapfs_create(vm.vfs, vm.swapfs, size)
    uobj = uvn_attach(vp, PROT_READ | PROT_WRITE)
    vm.vfs.vrele(vp)
    assert uobj is not None
    vn_lock(vp, LK_EXCLUSIVE | LK_RETRY)
    uvm_vnp_uncache(vp)
    VOP_UNLOCK(vp)
    return uobj


@gated
def uvm_anon_discard(uobj: UvmVnode) -> None:
    """Throw away the contents of an anonymous object whose last user is
    done with them: its pages are freed unwritten, its swap given back.

    => caller holds a reference and no VM lock.
    """
    vp = uobj.u_vnode
    with kernel_lock:
        vp.v_op.setsize(vp, 0)
        uvm_vnp_setsize(vp, 0)


@gated
def uvm_unmap(space: Vmspace, start: int, end: int) -> None:
    """Remove the mappings of [start, end), dropping their references.

    Dirty pages of shared mappings stay in their objects (they are written
    back by msync, sync, or when the object dies); pages of private
    mappings go with their amap.
    """
    space.lock.rw_enter(RW_WRITE)
    try:
        gone = space._range(start, end)
        for e in gone:
            del space.entries[e.start]
        if gone:
            space.timestamp += 1
            pmap_remove(space.pmap, start, end)
    finally:
        space.lock.rw_exit()
    for e in gone:  # detach may sleep (I/O): not under the map lock
        if e.object is not None:
            e.object.pgops.pgo_detach(e.object)
        if e.amap is not None:
            aobj = e.amap.obj
            if aobj.uo_refs == 1:  # the last entry of the amap: its pages need no write
                uvm_anon_discard(aobj)
            aobj.pgops.pgo_detach(aobj)


@gated
def uvm_map_protect(space: Vmspace, start: int, end: int, prot: int) -> None:
    """Change the protection of [start, end); EACCES beyond the maximum."""
    space.lock.rw_enter(RW_WRITE)
    try:
        entries = space.entries_in(start, end)
        if any(prot & ~e.max_protection for e in entries):
            raise PermissionError(errno.EACCES, "protection exceeds the maximum protection")
        for e in space._range(start, end):
            e.protection = prot
        space.timestamp += 1
        pmap_protect(space.pmap, start, end, prot)
    finally:
        space.lock.rw_exit()


@gated
def uvm_map_advice(space: Vmspace, start: int, end: int, advice: int) -> None:
    """Record NORMAL/RANDOM/SEQUENTIAL advice, or act on WILLNEED/DONTNEED.

    The recorded advice sizes the read-ahead of the entry's faults (see
    uvm_readahead).  MADV_WILLNEED queues the range's object pages for the
    VM's read-ahead daemon, which reads them in the background from free
    memory.  MADV_DONTNEED frees the clean resident object pages of the
    range (dirty ones are deactivated: the page daemon writes them first);
    the private pages of a MAP_PRIVATE range are kept.
    """
    if advice not in (MADV_NORMAL, MADV_RANDOM, MADV_SEQUENTIAL, MADV_WILLNEED, MADV_DONTNEED):
        raise OSError(errno.EINVAL, f"bad advice {advice}")
    space.lock.rw_enter(RW_WRITE if advice <= MADV_SEQUENTIAL else RW_READ)
    try:
        if advice <= MADV_SEQUENTIAL:
            for e in space._range(start, end):
                e.advice = advice
                e.ra = UvmRactx()
            space.timestamp += 1
            return
        for e in space.entries_in(start, end):
            if e.object is None:
                continue
            lo = e.offset + max(start, e.start) - e.start
            hi = e.offset + min(end, e.end) - e.start
            if advice == MADV_WILLNEED:
                space.vm.readahead.request(e.object, lo, hi)
            else:
                _dontneed(e.object, lo, hi)
    finally:
        space.lock.rw_exit()


def _dontneed(uobj: UvmObject, lo: int, hi: int) -> None:
    """Free the clean pages of [lo, hi) of *uobj*, deactivate the dirty ones.

    Busy and wired pages are left alone.  => caller holds no object lock.
    """
    vm = uobj.vm
    with uobj.vmobjlock:
        for pg in uobj.pages_in(lo, hi):
            if pg.pg_flags & PG_BUSY or pg.wire_count:
                continue
            pmap_page_protect(pg, PROT_NONE)  # unmapped first: it cannot be dirtied after the check
            if pg.pg_flags & PG_CLEAN and pmap_is_modified(pg):
                pg.pg_flags &= ~PG_CLEAN
            with vm.pageqlock:
                if pg.pg_flags & PG_CLEAN:
                    uvm_pagefree(pg)
                else:
                    uvm_pagedeactivate(pg)


@gated
def uvm_msync(space: Vmspace, start: int, end: int, flags: int) -> int:
    """Write back the dirty pages of shared mappings in [start, end).

    MS_SYNC waits for the writes; MS_INVALIDATE also frees the clean pages,
    so the next access reads the file again.  Returns 0 or the errno of a
    failed write-back (the pages stay dirty, for a later msync to retry).
    """
    space.lock.rw_enter(RW_READ)
    try:
        work = [(e.object, e.offset + max(start, e.start) - e.start,
                 e.offset + min(end, e.end) - e.start)
                for e in space.entries_in(start, end) if e.shared and e.object is not None]
        for uobj, _, _ in work:
            uobj.pgops.pgo_reference(uobj)  # keep it while we flush unlocked
    finally:
        space.lock.rw_exit()
    pgoflags = PGO_CLEANIT | (PGO_SYNCIO if flags & MS_SYNC else 0)
    if flags & MS_INVALIDATE:
        pgoflags |= PGO_FREE | PGO_SYNCIO
    error = 0
    for uobj, lo, hi in work:
        with uobj.vmobjlock:
            if not uobj.pgops.pgo_flush(uobj, lo, hi, pgoflags):
                error = error or getattr(uobj, "u_error", 0) or errno.EIO
        uobj.pgops.pgo_detach(uobj)
    return error

