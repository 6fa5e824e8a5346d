"""The software machine's MMU (its pmap.c): the pmap interface of
:mod:`vnpager.uvm.pmap`, emulated in Python.

Each address space has a :class:`Pmap`: virtual page number -> (page,
protection).  Each page keeps the reverse map (``pg.pv``) and two
attribute bits, referenced and modified, which :func:`pmap_access` sets the
way a real MMU does on each load and store.  The page daemon's second
chance and uvn_flush's dirty check read those bits.

All pmaps of one VM share ``vm.pmap_lock``: it makes a translation and the
copy through it atomic with respect to pmap_page_protect(), as a TLB
shootdown does in hardware.

**The TLB.**  Translating page by page costs more than copying the page, so
each pmap caches translations as *runs*: a range of virtual pages mapped
onto physically consecutive frames (frames are slices of one arena, see
:mod:`.frames`, so a run is one memoryview and a 1 MiB copy over one run is one slice copy).
``pm_rtlb`` holds the runs a load may use, ``pm_wtlb`` those a store may
use, each keyed by every virtual page of the run; the runs of one TLB are
disjoint.  :func:`pmap_access` fills them (only over the pages of the
access itself, so no bit is set for a page nobody touched), and
:func:`pmap_tlb_merge` joins neighbouring runs an access went through;
loads and stores through them take no other step, and in particular set no
bit.  Their cost follows the pages accessed, not the runs' lengths: a
load writes a key for each page it touches, the merges after an access
write at most two keys per page it touched, and a drop deletes keys once
written.
(Merging without that bound, a scan in small steps rewrote the whole run
behind it at each page it added: quadratic over a cold sequential pass.)
That is correct because of this invariant, kept under
``vm.pmap_lock``:

* a page of a ``pm_rtlb`` run is mapped at that address, readable, with
  PG_REF set; a page of a ``pm_wtlb`` run is mapped writable with PG_REF
  and PG_MOD set;
* whatever could falsify it drops the runs first, under the same lock:
  pmap_enter, pmap_remove, pmap_protect and pmap_page_protect (the mapping
  changes), pmap_clear_reference (both TLBs) and pmap_clear_modify (the
  store TLB) -- as a software-managed MMU emulates the ref/mod bits by
  invalidating the translation when it clears them.

So a store always finds PG_MOD set before its bytes land: the flush and
page daemon write-protect a page (pmap_page_protect PROT_READ, which drops
its store runs) before writing it and clear PG_MOD after, and the next
store misses the TLB, faults on the read-only mapping and sets PG_MOD
again in pmap_enter.  A page freed or reused has been unmapped first
(uvm_pagefree), which dropped its runs, so no load reads through a stale
run.  The page daemon's second chance still sees each reference: clearing
PG_REF drops the runs, and the next load sets it again.

Stores copy under ``vm.pmap_lock`` (a store must not land after the
protect that precedes a write-back).  A load within one run may copy
without it (uvm_load): it looks the run up, copies, and looks again; a run
dropped is never put back (a new run is a new object), so finding the same
run after the copy means no invalidation began before the copy ended, and
otherwise the load is done again the slow way.  The copy of one run is one
C-level memcpy under the GIL, so it does not interleave with a store's.
"""

from __future__ import annotations

from mmap import PROT_READ, PROT_WRITE  # sys/mman.h's, as uvm_param's are
from typing import TYPE_CHECKING

from .frames import Frames

if TYPE_CHECKING:
    from vnpager.uvm.uvm import VM
    from vnpager.uvm.uvm_page import VmPage

PROT_NONE = 0x0
PG_REF = 0x1
PG_MOD = 0x2

__all__ = ["Frames"]  # the machine's frames, beside its pmap (vm.machine.Frames)

Run = tuple[int, int, memoryview, int]  # start va, end va, the bytes of its frames, first frame
Tlb = dict[int, Run]  # every virtual page of each run -> the run


class Pmap:
    """The translations of one address space, and their TLBs (see above)."""

    __slots__ = ("frames", "pm_mask", "pm_pte", "pm_rtlb", "pm_wtlb", "vm")

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.pm_pte: dict[int, tuple[VmPage, int]] = {}
        self.pm_rtlb: Tlb = {}
        self.pm_wtlb: Tlb = {}
        self.pm_mask = ~(vm.page_size - 1)  # va & pm_mask: its page
        self.frames = vm.frames.view  # frame i is frames[i * page_size:(i + 1) * page_size]


def _tlb_load(tlb: Tlb, run: Run, page_size: int) -> None:
    for v in range(run[0], run[1], page_size):
        tlb[v] = run


def _tlb_drop(tlb: Tlb, va: int, page_size: int) -> None:
    """Drop the run holding *va*, if any.  => caller holds vm.pmap_lock."""
    run = tlb.get(va)
    if run is not None:
        for v in range(run[0], run[1], page_size):
            del tlb[v]


def _tlb_invalidate(pmap: Pmap, va: int) -> None:
    """Drop both TLBs' runs over *va*.  => caller holds vm.pmap_lock."""
    ps = pmap.vm.page_size
    _tlb_drop(pmap.pm_rtlb, va, ps)
    _tlb_drop(pmap.pm_wtlb, va, ps)


def _tlb_shootdown(pg: VmPage, loads: bool) -> None:
    """Drop the store runs (and with *loads* the load runs) over every
    mapping of *pg*.  => caller holds vm.pmap_lock."""
    _tlb_shootdown_run([pg], loads)


def _tlb_shootdown_run(pgs: list[VmPage], loads: bool) -> None:
    """_tlb_shootdown of each page of *pgs*, with no call per page or
    mapping (the cold path unmaps and clears whole clusters).
    => caller holds vm.pmap_lock."""
    if not pgs:
        return
    ps = pgs[0].vm.page_size
    for pg in pgs:
        for pmap, va in pg.pv:
            for tlb in (pmap.pm_wtlb, pmap.pm_rtlb) if loads else (pmap.pm_wtlb,):
                run = tlb.get(va)  # _tlb_drop, inline
                if run is not None:
                    for v in range(run[0], run[1], ps):
                        del tlb[v]


def pmap_enter(pmap: Pmap, va: int, pg: VmPage, prot: int, access_type: int = PROT_NONE, *,
               replace: bool = True) -> bool:
    """Map *pg* at *va* with *prot*; *access_type* sets ref/mod at once.

    With ``replace=False`` a translation already at *va* is left alone (and
    False returned): fault-ahead must not undo what a concurrent fault on
    that address mapped, such as a copy-on-write page.
    """
    return pmap_enter_run(pmap, va, [pg], prot, access_type, replace=replace) == 1


def pmap_enter_run(pmap: Pmap, va: int, pgs: list[VmPage], prot: int, access_type: int = PROT_NONE, *,
                   replace: bool = True) -> int:
    """pmap_enter of ``pgs[i]`` at ``va + i * page_size`` for each i, under
    one hold of the lock; returns how many were entered."""
    if not pgs:
        return 0
    ps = pmap.vm.page_size
    bits = PG_REF | PG_MOD if access_type & PROT_WRITE else PG_REF if access_type else 0
    pte = pmap.pm_pte
    n = 0
    with pmap.vm.pmap_lock:
        for pg in pgs:
            old = pte.get(va)
            if old is None or replace:
                if old is not None:
                    _tlb_invalidate(pmap, va)  # no run holds an address without a translation
                    if old[0] is not pg:
                        del old[0].pv[(pmap, va)]
                pte[va] = (pg, prot)
                pg.pv[(pmap, va)] = None
                pg.attrs |= bits
                n += 1
            va += ps
    return n


def pmap_remove(pmap: Pmap, sva: int, eva: int) -> None:
    """Remove the translations for [sva, eva)."""
    page_size = pmap.vm.page_size
    with pmap.vm.pmap_lock:
        if (eva - sva) // page_size < len(pmap.pm_pte):
            vas = [va for va in range(sva, eva, page_size) if va in pmap.pm_pte]
        else:
            vas = [va for va in pmap.pm_pte if sva <= va < eva]
        for va in vas:
            _tlb_invalidate(pmap, va)
            pg, _ = pmap.pm_pte.pop(va)
            del pg.pv[(pmap, va)]


def pmap_protect(pmap: Pmap, sva: int, eva: int, prot: int) -> None:
    """Lower the protection of the translations in [sva, eva) to *prot*."""
    if prot == PROT_NONE:
        pmap_remove(pmap, sva, eva)
        return
    with pmap.vm.pmap_lock:
        for va, (pg, old) in list(pmap.pm_pte.items()):
            if sva <= va < eva:
                _tlb_invalidate(pmap, va)
                pmap.pm_pte[va] = (pg, old & prot)


def pmap_page_protect(pg: VmPage, prot: int) -> None:
    """Lower every mapping of *pg*: PROT_NONE removes them all."""
    with pg.vm.pmap_lock:
        _page_protect(pg, prot)


def pmap_page_protect_run(pgs: list[VmPage], prot: int) -> None:
    """pmap_page_protect of each page of *pgs*, under one hold of the lock."""
    if not pgs:
        return
    with pgs[0].vm.pmap_lock:
        if prot != PROT_NONE:
            for pg in pgs:
                if pg.pv:
                    _page_protect(pg, prot)
            return
        mapped = [pg for pg in pgs if pg.pv]
        _tlb_shootdown_run(mapped, loads=True)
        for pg in mapped:  # the rest of _page_protect(pg, PROT_NONE)
            for pmap, va in pg.pv:
                del pmap.pm_pte[va]
            pg.pv.clear()


def _page_protect(pg: VmPage, prot: int) -> None:
    """=> caller holds vm.pmap_lock."""
    if prot == PROT_NONE:
        _tlb_shootdown(pg, loads=True)
        for pmap, va in pg.pv:
            del pmap.pm_pte[va]
        pg.pv.clear()
    elif not prot & PROT_WRITE:
        _tlb_shootdown(pg, loads=False)
        for pmap, va in pg.pv:
            entry = pmap.pm_pte[va]
            pmap.pm_pte[va] = (pg, entry[1] & ~PROT_WRITE)


def pmap_extract(pmap: Pmap, va: int) -> tuple[VmPage, int] | None:
    return pmap.pm_pte.get(va)


def pmap_update(pmap: Pmap) -> None:
    """Nothing is deferred on this machine: every operation is done at once."""


def pmap_is_modified(pg: VmPage) -> bool:
    return bool(pg.attrs & PG_MOD)


def pmap_clear_modify(pg: VmPage) -> bool:
    """Clear PG_MOD; the page's store runs go, so the next store sets it."""
    return _clear_attr_run([pg], PG_MOD)[0]


def pmap_clear_modify_run(pgs: list[VmPage]) -> list[bool]:
    """pmap_clear_modify of each page of *pgs*, under one hold of the lock."""
    return _clear_attr_run(pgs, PG_MOD)


def _clear_attr_run(pgs: list[VmPage], bit: int) -> list[bool]:
    """Clear PG_MOD or PG_REF on each page and drop the runs that rely on
    it (the store runs for PG_MOD, all for PG_REF); return whether each
    was set."""
    if not pgs:
        return []
    was = []
    with pgs[0].vm.pmap_lock:
        for pg in pgs:
            was.append(bool(pg.attrs & bit))
            pg.attrs &= ~bit
        _tlb_shootdown_run([pg for pg in pgs if pg.pv], loads=bit == PG_REF)
    return was


def pmap_is_referenced(pg: VmPage) -> bool:
    return bool(pg.attrs & PG_REF)


def pmap_clear_reference(pg: VmPage) -> bool:
    """Clear PG_REF; all the page's runs go, so the next access sets it."""
    return _clear_attr_run([pg], PG_REF)[0]


def pmap_clear_reference_run(pgs: list[VmPage]) -> list[bool]:
    """pmap_clear_reference of each page of *pgs*, under one hold of the lock."""
    return _clear_attr_run(pgs, PG_REF)


def pmap_access(pmap: Pmap, va: int, end: int, access_type: int) -> Run | None:
    """What the MMU does on a load or store that missed the TLB: translate
    the page at *va*, set ref/mod, and load the TLB with the run of the
    pages from *va* that this access touches (below *end*) and that sit on
    consecutive frames, are mapped for the access and are in no run yet.

    Returns the run, or None for a fault (no translation, or a store to a
    read-only one).  => caller holds ``vm.pmap_lock`` across this call and
    the copy through the run, so that the copy cannot race a protect.
    """
    write = access_type & PROT_WRITE
    need, bits, tlb = ((PROT_WRITE, PG_REF | PG_MOD, pmap.pm_wtlb) if write
                       else (PROT_READ, PG_REF, pmap.pm_rtlb))
    ps = pmap.vm.page_size
    pte = pmap.pm_pte
    first = pte.get(va)
    if first is None or not first[1] & need:
        return None
    pages = [first[0]]
    frame = first[0].frame
    v = va + ps
    while v < end and v not in tlb:
        nxt = pte.get(v)
        if nxt is None or not nxt[1] & need or nxt[0].frame != frame + len(pages):
            break
        pages.append(nxt[0])
        v += ps
    for pg in pages:
        pg.attrs |= bits
    run = (va, v, pmap.frames[frame * ps:frame * ps + (v - va)], frame)
    _tlb_load(tlb, run, ps)
    return run


def pmap_tlb_merge(pmap: Pmap, runs: list[Run], access_type: int, touched: int) -> None:
    """Merge the runs of *runs* (consecutive in the address space) that are
    also consecutive in physical memory, so that the next access over them
    is one copy.  The merged run's pages satisfy the invariant already.

    The access touched *touched* bytes of pages; the groups merged span at
    most twice that in all, so that merging writes at most two keys per page
    touched, whatever the length of the runs (see above).

    => caller holds ``vm.pmap_lock`` and found every run of *runs* in the
       TLB of *access_type* during this hold.
    """
    tlb = pmap.pm_wtlb if access_type & PROT_WRITE else pmap.pm_rtlb
    ps = pmap.vm.page_size
    most = 2 * touched  # the bytes of runs left to merge
    i = 0
    while i < len(runs):
        j = i + 1
        while (j < len(runs) and runs[j][0] == runs[j - 1][1]
               and runs[j][3] == runs[j - 1][3] + (runs[j - 1][1] - runs[j - 1][0]) // ps):
            j += 1
        start, end, frame = runs[i][0], runs[j - 1][1], runs[i][3]
        if j - i > 1 and end - start <= most:
            _tlb_load(tlb, (start, end, pmap.frames[frame * ps:frame * ps + (end - start)], frame), ps)
            most -= end - start
        i = j
