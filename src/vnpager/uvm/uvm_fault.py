"""Page faults and the MMU's side of memory access (uvm_fault.c).

:func:`uvm_load` and :func:`uvm_store` (and :func:`uvm_copyin`,
:func:`uvm_copyout`) touch a range of an address space the way a CPU does:
through the pmap's TLB, whose runs of resident pages make a warm access one
lookup and one copy, faulting on a missing or read-only translation.  :func:`uvm_fault` resolves one fault:

1. find the map entry (none: SegvError; protection: SegvError EACCES);
2. private entry with a page of its own in the amap: map that page;
3. otherwise ask the object's pager for the page and its resident
   neighbours with PGO_LOCKED (fault-ahead: the neighbours are mapped too,
   as many as the entry's advice says), then, if the page is not resident,
   without PGO_LOCKED, which may sleep and reads the page together with the
   entry's read-ahead window (uvm_readahead), mapped as fault-ahead;
4. a write to a private entry copies the page into the amap (copy on
   write); anything else maps the object's page.

The map lock is held (read) for the whole fault, so the entry cannot go
away while we sleep for I/O; munmap and mprotect wait for faults to finish.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from vnpager.kern.errors import BusError, SegvError
from vnpager.kern.lock import RW_READ, RW_WRITE, gated
from vnpager.kern.proc import curproc
from vnpager.kern.synch import tsleep
from vnpager.kern.trace import traced
from vnpager.uvm.pmap import (
    pmap_access,
    pmap_enter,
    pmap_enter_run,
    pmap_tlb_merge,
    pmap_update,
)
from vnpager.uvm.uvm_map import MADV_NORMAL, MADV_RANDOM, MADV_SEQUENTIAL, VmMapEntry, Vmspace
from vnpager.uvm.uvm_page import (
    PG_CLEAN,
    PG_FAKE,
    PG_RELEASED,
    VmPage,
    uvm_page_unbusy,
    uvm_pageactivate,
    uvm_pageactivate_run,
    uvm_pagealloc,
    uvm_wait,
)
from vnpager.uvm.uvm_pager import (
    PGO_DEACTIVATE,
    PGO_DONTCARE,
    PGO_LOCKED,
    VM_PAGER_AGAIN,
    VM_PAGER_BAD,
    VM_PAGER_OK,
    PageSlot,
)
from vnpager.uvm.uvm_param import PROT_READ, PROT_WRITE
from vnpager.uvm.uvm_readahead import RA_WINSIZE_MAX, uvm_ra_max, uvm_ra_reserve, uvm_ra_window

if TYPE_CHECKING:
    from vnpager.uvm.uvm_object import UvmObject

# pages mapped behind and ahead of the faulting page, by advice (as OpenBSD)
FAULT_AHEAD = {MADV_NORMAL: (3, 4), MADV_RANDOM: (0, 0), MADV_SEQUENTIAL: (8, 7)}

AGAIN_SLEEP = 0.001  # the vnode was busy (PGO_NOWAIT): try again shortly


class _Refault(Exception):
    """The fault must start over: memory was short or a page went away."""


@gated
@traced
def uvm_fault(space: Vmspace, vaddr: int, access_type: int) -> None:
    """Resolve a fault at *vaddr* for *access_type* (PROT_READ/PROT_WRITE).

    Raises SegvError (no mapping, or one that forbids the access), BusError
    (the page lies past the end of the object), or OSError with the
    backend's errno (the page could not be read).
    => caller holds no VM lock.
    """
    vm = space.vm
    va = vm.trunc_page(vaddr)
    vm.uvmexp.faults += 1
    while True:
        space.lock.rw_enter(RW_READ)
        try:
            entry = space.lookup(va)
            if entry is None:
                raise SegvError(f"no mapping at {vaddr:#x}")
            if access_type & ~entry.protection:
                raise SegvError(f"{vaddr:#x} is not mapped for that access", errno.EACCES)
            try:
                _fault_entry(space, entry, va, access_type)
                return
            except _Refault:
                pass
        finally:
            pmap_update(space.pmap)  # the machine maps what was entered (uffd: CONTINUE per run)
            space.lock.rw_exit()


def _fault_entry(space: Vmspace, entry: VmMapEntry, va: int, access_type: int) -> None:
    """=> caller holds the map lock (read); raises _Refault to start over."""
    amap = entry.amap
    slot = entry.amap_offset + (va - entry.start)
    if amap is not None and slot in amap.slots:
        anon = _getpage(space, entry, amap.obj, slot, va, access_type, ahead=False)
        _enter(space, va, anon, entry.protection, access_type)
        amap.obj.vmobjlock.rw_exit()
        return

    uobj = entry.object
    assert uobj is not None
    pg = _getpage(space, entry, uobj, entry.offset + (va - entry.start), va, access_type, ahead=True)
    if entry.shared:
        _enter(space, va, pg, entry.protection, access_type)
    elif access_type & PROT_WRITE:
        assert amap is not None
        _copy_on_write(space, entry, pg, slot, va, access_type)
    else:
        _enter(space, va, pg, entry.protection & ~PROT_WRITE, access_type)
    uobj.vmobjlock.rw_exit()


def _getpage(space: Vmspace, entry: VmMapEntry, uobj: UvmObject, off: int, va: int,
             access_type: int, ahead: bool) -> VmPage:
    """The page at *off* of *uobj*, busy, with the object locked.

    With *ahead*, the resident neighbours the advice asks for are mapped on
    the way and, if the page is not resident, the pager reads the entry's
    read-ahead window from it in the same I/O; the pages read ahead are
    mapped too (fault-ahead), and MADV_SEQUENTIAL deactivates the pages
    behind.  => caller holds the map lock; the object lock is held on
    return.  Raises _Refault, BusError or OSError.
    """
    vm = space.vm
    ps = vm.page_size
    nback, nforw = FAULT_AHEAD.get(entry.advice, (0, 0)) if ahead else (0, 0)
    lo = max(entry.start, va - nback * ps)
    hi = min(entry.end, va + (nforw + 1) * ps)
    npages, centeridx = (hi - lo) // ps, (va - lo) // ps
    pps = _ahead_slots(space, entry, lo, npages, centeridx)
    off0 = off - centeridx * ps
    uobj.vmobjlock.rw_enter(RW_WRITE)
    uobj.pgops.pgo_get(uobj, off0, pps, npages, centeridx, access_type, entry.advice, PGO_LOCKED)
    _map_ahead(space, entry, lo, pps, centeridx)
    center = pps[centeridx]
    if isinstance(center, VmPage):
        if ahead:
            _sequential_behind(entry, uobj, off)
            entry.ra.ra_next = off0 + _mapped_end(pps, centeridx) * ps
        return center

    window = 1
    if ahead:
        window = min(uvm_ra_window(entry.ra, entry.advice, off, ps, uvm_ra_max(uobj)), (entry.end - va) // ps)
        if window > 1:
            uvm_ra_reserve(vm, window, uobj.vmobjlock)
    slots = _ahead_slots(space, entry, va, window, 0)
    result, _ = uobj.pgops.pgo_get(uobj, off, slots, window, 0, access_type, entry.advice, 0)
    if result == VM_PAGER_AGAIN:
        tsleep((uobj, "fltagain"), "fltagain", AGAIN_SLEEP)
        raise _Refault
    if result == VM_PAGER_BAD:
        raise BusError(f"page at offset {off:#x} lies past the end of the file")
    if result != VM_PAGER_OK:
        err = curproc().p_errno or errno.EIO
        raise OSError(err, f"cannot read page at offset {off:#x}: {errno.errorcode.get(err, err)}")
    uobj.vmobjlock.rw_enter(RW_WRITE)
    # the pages read ahead are busy and ours: map them (or free the released)
    _map_ahead(space, entry, va, slots, 0)
    pg = slots[0]
    assert isinstance(pg, VmPage)
    if pg.pg_flags & PG_RELEASED:  # freed while we read it: start over
        uvm_page_unbusy([pg])
        uobj.vmobjlock.rw_exit()
        raise _Refault
    if ahead:
        _sequential_behind(entry, uobj, off)
        entry.ra.ra_next = off + _mapped_end(slots, 0) * ps
    return pg


def _ahead_slots(space: Vmspace, entry: VmMapEntry, lo: int, npages: int, centeridx: int) -> list[PageSlot]:
    """pgo_get slots for the pages at [lo, lo + npages pages): PGO_DONTCARE
    for those other than the center that are mapped or have an anon."""
    ps = space.vm.page_size
    vas = range(lo, lo + npages * ps, ps)
    # pmap_extract of each page: a lookup in pm_pte (see pmap), with no call per page
    pps: list[PageSlot] = [None if pte is None else PGO_DONTCARE for pte in map(space.pmap.pm_pte.get, vas)]
    if entry.amap is not None and entry.amap.slots:
        anons, slot0 = entry.amap.slots, entry.amap_offset - entry.start  # + va: the amap slot of va
        pps = [PGO_DONTCARE if slot0 + va in anons else pp for pp, va in zip(pps, vas, strict=True)]
    pps[centeridx] = None
    return pps


def _map_ahead(space: Vmspace, entry: VmMapEntry, lo: int, pps: list[PageSlot], centeridx: int) -> None:
    """Map the busy pages pgo_get gave besides the center, unreferenced,
    read-only in a private entry; unbusy them (a released page is freed).

    => caller holds the object lock.
    """
    prot = entry.protection if entry.shared else entry.protection & ~PROT_WRITE
    ps = space.vm.page_size
    runs: list[tuple[int, list[VmPage]]] = []  # (first index, consecutive pages): one pmap call each
    for i, pg in enumerate(pps):
        if i == centeridx or not isinstance(pg, VmPage):
            continue
        if pg.pg_flags & PG_RELEASED:
            uvm_page_unbusy([pg])
            pps[i] = None
        elif runs and runs[-1][0] + len(runs[-1][1]) == i:
            runs[-1][1].append(pg)
        else:
            runs.append((i, [pg]))
    mapped: list[VmPage] = []
    for i, run in runs:
        # another thread's fault may have mapped an address since the slots
        # were chosen (in a private entry, perhaps its own copy): keep that
        pmap_enter_run(space.pmap, lo + i * ps, run, prot, 0, replace=False)
        mapped += run
    uvm_pageactivate_run(mapped)
    uvm_page_unbusy(mapped)
    space.vm.uvmexp.faultahead += len(mapped)


def _mapped_end(pps: list[PageSlot], centeridx: int) -> int:
    """The index past the run of mapped slots that starts at the center."""
    end = centeridx + 1
    while end < len(pps) and pps[end] is not None:
        end += 1
    return end


def _sequential_behind(entry: VmMapEntry, uobj: UvmObject, off: int) -> None:
    """MADV_SEQUENTIAL: deactivate the entry's object pages behind *off*
    (one largest window's worth), so that a scan leaves behind it pages
    the page daemon reclaims before any other.

    => caller holds the object lock.
    """
    if entry.advice != MADV_SEQUENTIAL:
        return
    lo = max(entry.offset, off - RA_WINSIZE_MAX)
    if lo < off:
        uobj.pgops.pgo_flush(uobj, lo, off, PGO_DEACTIVATE)


def _enter(space: Vmspace, va: int, pg: VmPage, prot: int, access_type: int,
           replace: bool = True) -> None:
    """Map the busy page *pg* at *va* (unless mapped already and not
    *replace*), activate and unbusy it.

    => caller holds the page's object lock.
    """
    pmap_enter(space.pmap, va, pg, prot, access_type, replace=replace)
    with space.vm.pageqlock:
        uvm_pageactivate(pg)
    uvm_page_unbusy([pg])


def _copy_on_write(space: Vmspace, entry: VmMapEntry, pg: VmPage, slot: int, va: int,
                   access_type: int) -> None:
    """Give *entry* its own copy of *pg* at amap *slot*, mapped writable.

    => caller holds the map lock and *pg*'s object lock; *pg* is busy.  If
       memory is short, both are given up and we raise _Refault.
    """
    amap = entry.amap
    assert amap is not None
    aobj = amap.obj
    aobj.vmobjlock.rw_enter(RW_WRITE)
    anon = uvm_pagealloc(space.vm, aobj, slot)
    if anon is None:
        aobj.vmobjlock.rw_exit()
        with space.vm.pageqlock:
            uvm_pageactivate(pg)
        uvm_page_unbusy([pg])
        pg.uobject.vmobjlock.rw_exit()  # type: ignore[union-attr]
        uvm_wait(space.vm, "flt_noram")
        raise _Refault  # with both object locks dropped
    anon.data[:] = pg.data
    anon.pg_flags &= ~(PG_FAKE | PG_CLEAN)  # only the amap's backing store can have it now
    amap.slots.add(slot)
    with space.vm.pageqlock:
        uvm_pageactivate(pg)
    uvm_page_unbusy([pg])
    _enter(space, va, anon, entry.protection, access_type)
    aobj.vmobjlock.rw_exit()


COPY_SPAN = 1 << 20  # bytes copied per hold of vm.pmap_lock: bounds how long a protect waits


def _resident(space: Vmspace, pos: int, end: int, access_type: int) -> tuple[list[memoryview], int]:
    """The bytes of [pos, end) that can be loaded or stored without a fault
    (at most COPY_SPAN of them), as slices of TLB runs, and where they stop.

    => caller holds ``vm.pmap_lock``, and copies through the slices before
       dropping it (see pmap: a protect may invalidate them after).
    """
    pmap = space.pmap
    tlb = pmap.pm_wtlb if access_type & PROT_WRITE else pmap.pm_rtlb
    mask = pmap.pm_mask
    stop = min(end, pos + COPY_SPAN)
    touched = ((stop + ~mask) & mask) - (pos & mask)  # the bytes of the pages the access touches
    parts, runs = [], []
    while pos < stop:
        pva = pos & mask
        run = tlb.get(pva) or pmap_access(pmap, pva, stop, access_type)
        if run is None:
            break
        start, hi, frames, _ = run
        k = min(hi, stop)
        parts.append(frames[pos - start:k - start])
        runs.append(run)
        pos = k
    if len(runs) > 1:
        pmap_tlb_merge(pmap, runs, access_type, touched)
    return parts, pos


def uvm_load(space: Vmspace, va: int, n: int) -> bytes:
    """The *n* bytes at *va*, faulting as needed.

    The fast path: the bytes lie in one TLB run (a resident page, or pages
    on consecutive frames, already loaded through this mapping), and cost
    one lookup and one copy, with no lock (see pmap: a load racing an
    invalidation is retried).  Otherwise the runs are joined under the
    lock, one copy too, with a fault wherever a page is not mapped for
    reading.
    """
    pmap = space.pmap
    tlb = pmap.pm_rtlb
    pva = va & pmap.pm_mask
    run = tlb.get(pva)
    if run is not None and va + n <= run[1]:
        # no lock: a run dropped is never put back, so finding it still
        # there after the copy means it was valid all through the copy
        start = run[0]
        data = run[2][va - start:va + n - start].tobytes()
        if tlb.get(pva) is run:
            return data
    vm = space.vm
    out: list[bytes] = []
    pos, end = va, va + n
    while pos < end:
        lo = pos
        with vm.pmap_lock:
            parts, pos = _resident(space, pos, end, PROT_READ)
            out.append(b"".join(parts))
        if pos < min(end, lo + COPY_SPAN):  # a miss, not the span's end
            uvm_fault(space, vm.trunc_page(pos), PROT_READ)
    return out[0] if len(out) == 1 else b"".join(out)


def uvm_store(space: Vmspace, va: int, data: memoryview) -> None:
    """Store *data* at *va*, faulting as needed; a store within one TLB run
    (see uvm_load) is one lookup and one copy."""
    vm = space.vm
    pos, end = va, va + len(data)
    with vm.pmap_lock:
        run = space.pmap.pm_wtlb.get(va & space.pmap.pm_mask)
        if run is not None and end <= run[1]:
            run[2][va - run[0]:end - run[0]] = data
            return
    while pos < end:
        lo = at = pos
        with vm.pmap_lock:
            parts, pos = _resident(space, pos, end, PROT_WRITE)
            for part in parts:
                part[:] = data[at - va:at - va + len(part)]
                at += len(part)
        if pos < min(end, lo + COPY_SPAN):  # a miss, not the span's end
            uvm_fault(space, vm.trunc_page(pos), PROT_WRITE)


def uvm_copyin(space: Vmspace, va: int, buf: memoryview) -> None:
    """Load ``len(buf)`` bytes at *va* into *buf*, faulting as needed."""
    buf[:] = uvm_load(space, va, len(buf))


def uvm_copyout(space: Vmspace, buf: memoryview, va: int) -> None:
    """Store *buf* at *va*, faulting as needed."""
    uvm_store(space, va, buf)
