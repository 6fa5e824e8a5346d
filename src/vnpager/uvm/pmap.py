"""A software MMU (pmap.h).

Each address space has a :class:`Pmap`: virtual page number -> (page,
protection).  Each page keeps the reverse map (``pg.pv``) and two
attribute bits, referenced and modified, which :func:`pmap_access` sets the
way a real MMU does on each load and store.  The page daemon's second
chance and uvn_flush's dirty check read those bits.

All pmaps of one VM share ``vm.pmap_lock``: it makes a translation and the
copy through it atomic with respect to pmap_page_protect(), as a TLB
shootdown does in hardware.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vnpager.uvm.uvm_param import PROT_NONE, PROT_READ, PROT_WRITE

if TYPE_CHECKING:
    from vnpager.uvm.uvm import VM
    from vnpager.uvm.uvm_page import VmPage

PG_REF = 0x1
PG_MOD = 0x2


class Pmap:
    """The translations of one address space."""

    __slots__ = ("pm_pte", "vm")

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.pm_pte: dict[int, tuple[VmPage, int]] = {}


def pmap_enter(pmap: Pmap, va: int, pg: VmPage, prot: int, access_type: int = PROT_NONE) -> None:
    """Map *pg* at *va* with *prot*; *access_type* sets ref/mod at once."""
    with pg.vm.pmap_lock:
        old = pmap.pm_pte.get(va)
        if old is not None and old[0] is not pg:
            del old[0].pv[(pmap, va)]
        pmap.pm_pte[va] = (pg, prot)
        pg.pv[(pmap, va)] = None
        if access_type & PROT_WRITE:
            pg.attrs |= PG_REF | PG_MOD
        elif access_type:
            pg.attrs |= PG_REF


def pmap_remove(pmap: Pmap, sva: int, eva: int) -> None:
    """Remove the translations for [sva, eva)."""
    page_size = pmap.vm.page_size
    with pmap.vm.pmap_lock:
        if (eva - sva) // page_size < len(pmap.pm_pte):
            vas = [va for va in range(sva, eva, page_size) if va in pmap.pm_pte]
        else:
            vas = [va for va in pmap.pm_pte if sva <= va < eva]
        for va in vas:
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
                pmap.pm_pte[va] = (pg, old & prot)


def pmap_page_protect(pg: VmPage, prot: int) -> None:
    """Lower every mapping of *pg*: PROT_NONE removes them all."""
    with pg.vm.pmap_lock:
        if prot == PROT_NONE:
            for pmap, va in pg.pv:
                del pmap.pm_pte[va]
            pg.pv.clear()
        elif not prot & PROT_WRITE:
            for pmap, va in pg.pv:
                entry = pmap.pm_pte[va]
                pmap.pm_pte[va] = (pg, entry[1] & ~PROT_WRITE)


def pmap_extract(pmap: Pmap, va: int) -> tuple[VmPage, int] | None:
    return pmap.pm_pte.get(va)


def pmap_is_modified(pg: VmPage) -> bool:
    return bool(pg.attrs & PG_MOD)


def pmap_clear_modify(pg: VmPage) -> bool:
    was = bool(pg.attrs & PG_MOD)
    pg.attrs &= ~PG_MOD
    return was


def pmap_is_referenced(pg: VmPage) -> bool:
    return bool(pg.attrs & PG_REF)


def pmap_clear_reference(pg: VmPage) -> bool:
    was = bool(pg.attrs & PG_REF)
    pg.attrs &= ~PG_REF
    return was


def pmap_access(pmap: Pmap, va: int, access_type: int) -> VmPage | None:
    """What the MMU does on a load or store: translate *va*, set ref/mod.

    Returns the page, or None for a fault (no translation, or a store to a
    read-only one).  => caller holds ``vm.pmap_lock`` across this call and
    the copy through the page, so that the copy cannot race a protect.
    """
    entry = pmap.pm_pte.get(va)
    if entry is None:
        return None
    pg, prot = entry
    if access_type & PROT_WRITE:
        if not prot & PROT_WRITE:
            return None
        pg.attrs |= PG_REF | PG_MOD
    else:
        if not prot & PROT_READ:
            return None
        pg.attrs |= PG_REF
    return pg
