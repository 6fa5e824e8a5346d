"""The pmap interface (pmap.h): what the MI code asks of a machine's MMU.

uvm_fault, uvm_map, uvm_page, uvm_pager, uvm_vnode and the page daemon
import these names from here and never learn which machine is under them;
each machine (``vnpager.arch.<machine>``) implements all of them in its
``pmap`` module, and each VM is made on one (``uvm.VM(machine=...)``:
``vm.machine`` is that module).  The functions here dispatch on
``pmap.vm.machine`` or ``pg.vm.machine``, so the MI code is the same on
every machine:

* ``soft`` (:mod:`vnpager.arch.soft`, the default): the software MMU, whose
  loads and stores are calls into the pager (uvm_load, uvm_store);
* ``uffd`` (:mod:`vnpager.arch.uffd.pmap`): the host's MMU, driven through
  Linux userfaultfd for client processes of a pager server
  (``vnpager.server.space``); its differences are listed below.

All pmaps of one VM share ``vm.pmap_lock``; an operation that changes a
translation or a page's ref/mod bits takes it itself.

Address spaces and translations:

* ``pmap_create(vm)`` -- an empty pmap of *vm*'s machine (one per Vmspace);
  ``Pmap(vm)`` makes a software machine's one (the MI code's type for
  both: the uffd Pmap has the fields the MI code reads).
* ``pmap_enter(pmap, va, pg, prot, access_type=PROT_NONE, *, replace=True)
  -> bool`` -- map *pg* at *va* with *prot*; *access_type* sets ref/mod at
  once; with ``replace=False`` an existing translation stays (False).
* ``pmap_remove(pmap, sva, eva)`` -- remove the translations of [sva, eva).
* ``pmap_protect(pmap, sva, eva, prot)`` -- lower those of [sva, eva) to
  *prot* (PROT_NONE removes them).
* ``pmap_page_protect(pg, prot)`` -- lower every mapping of *pg*;
  PROT_NONE removes them all (before the page is freed or reused).
* ``pmap_extract(pmap, va) -> (pg, prot) | None`` -- the translation at *va*;
  every machine keeps its translations in ``pmap.pm_pte`` (va -> (pg, prot)),
  so that this is a lookup there, with no dispatch, and the fault's test of
  a window's pages is one lookup each.
* ``pmap_update(pmap)`` -- BSD's name: the operations the machine deferred
  are done now.  uvm_fault calls it once at the end of each fault (a no-op
  on the software machine; the uffd machine maps the fault's pages there,
  one UFFDIO_CONTINUE per run of contiguous pages).

Run forms, for the cold path, which works per cluster (a read's pages are
entered, protected and freed together): each does what the per-page call
does to each page of a list, in order, under one hold of ``vm.pmap_lock``,
so that a cluster costs the machine one call, not one per page.

* ``pmap_enter_run(pmap, va, pgs, prot, access_type=PROT_NONE, *,
  replace=True) -> int`` -- pmap_enter of ``pgs[i]`` at ``va + i *
  page_size``; returns how many were entered.
* ``pmap_page_protect_run(pgs, prot)``.
* ``pmap_clear_modify_run(pgs) -> list[bool]``,
  ``pmap_clear_reference_run(pgs) -> list[bool]``: what each bit was.

The attribute bits, per page, as the MMU sets them on each access (every
machine keeps them in ``pg.attrs``, PG_REF and PG_MOD, so that the two
tests read them without a dispatch):

* ``pmap_is_modified(pg)``, ``pmap_clear_modify(pg) -> was`` -- PG_MOD;
  after a clear, the next store through any mapping sets it again before
  its bytes land (the flush and the page daemon rely on it: they
  write-protect, write back, then clear).
* ``pmap_is_referenced(pg)``, ``pmap_clear_reference(pg) -> was`` -- PG_REF;
  after a clear, the next load or store sets it again (the page daemon's
  second chance).

The page frames: ``vm.machine.Frames(npages, page_size)`` makes the
machine's physical memory when the VM is made; ``frames.frame(i)`` is the
memoryview a VmPage exposes as ``pg.data`` while it is free, which I/O
reads and writes in place and whose bytes every mapping of the page sees.
``frames.bind(pg)`` (at uvm_pageinsert) and ``frames.unbind(pg)`` (at
uvm_pageremove) let a machine whose frames belong to objects move
``pg.data`` onto the object's own memory and back; ``frames.setsize(uobj,
size)`` follows an object's size (uvm_vnp_setsize); ``frames.resident()``
is the pages the frames hold now (``VmStats.frames_resident``).

Loads and stores through Python (uvm_load, uvm_store): a machine whose
accesses are calls into the pager keeps, per pmap, a TLB of *runs*
(``Run``: start va, end va, a memoryview of the frames, first frame) for
loads (``pm_rtlb``) and stores (``pm_wtlb``), keyed by every page of a
run (``va & pm_mask``).  ``pmap_access(pmap, va, end, access_type) -> Run |
None`` is the MMU's walk on a TLB miss (None: the access faults), and
``pmap_tlb_merge(pmap, runs, access_type, touched)`` joins runs an access
went through; both => caller holds ``vm.pmap_lock`` across them and the
copy.  A run found in a TLB is valid while it stays there, so that the
warm path is one lookup and one copy (see ``arch/soft/pmap.py``).  On the
hardware machine a client's accesses never reach the pager, so these
serve only the software machine's maps.

Where the uffd machine differs from the software one (the MI code keeps
the contracts above; what a client sees is in ``arch/uffd/pmap.py``):

* a VmPage is a budget slot: its ``data`` is bound, when it enters an
  object, to the page at that offset of the object's memfd (memfd offset =
  object offset) through the server's MAP_SHARED view, and punched out of
  the memfd (fallocate PUNCH_HOLE: gone from every process) when it leaves
  the object.  ``physmem`` bounds the resident pages of all the memfds.
* translations are the client's page tables: pmap_enter queues, and
  pmap_update maps (CONTINUE) what the fault entered; a page a store may
  reach is mapped writable only once PG_MOD is set (write faults), every
  other one write-protected, so PG_MOD is exact (synchronous write-protect
  faults, not WP_ASYNC).
* PG_REF is set when a page is mapped (the client's later accesses are
  not seen); pmap_clear_reference write-protects the page, drops the
  translation and zaps the client's PTE with process_madvise(MADV_PAGEOUT)
  where the kernel allows (it skips a page mapped by more than one
  process), in batches (32 pages, or at the client's next fault), so a
  re-reference is a (minor) fault.  An approximation: until the batch goes
  out, or where PAGEOUT is refused, a page may be evicted while in use,
  and is faulted in again.
* the frames of a freed page are punched out of its memfd when the next
  page is bound (one fallocate per run of the pages freed meanwhile), so
  the memfds' resident pages never exceed physmem.
* pmap_page_protect(pg, PROT_NONE) write-protects and drops the pv
  entries; the client may still load the page until it is punched out.
* pmap_remove forgets the translations (the client unmapped the range);
  loads and stores through the server's own pmaps (uvm_load, pmap_access)
  are refused: a hardware machine's memory is its clients'.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from vnpager.arch.soft.pmap import PG_MOD, PG_REF, PROT_NONE, Pmap, Run

if TYPE_CHECKING:
    from vnpager.uvm.uvm import VM
    from vnpager.uvm.uvm_page import VmPage

MACHINES = {"soft": "vnpager.arch.soft.pmap", "uffd": "vnpager.arch.uffd.pmap"}


def machine_module(name: str) -> ModuleType:
    """The pmap module of machine *name* (imported on first use, so that
    the software machine never loads the hardware one).  ValueError for a
    name not in MACHINES."""
    if name not in MACHINES:
        raise ValueError(f"machine must be one of {', '.join(MACHINES)}, not {name!r}")
    return importlib.import_module(MACHINES[name])


def pmap_create(vm: VM) -> Pmap:
    """An empty pmap of *vm*'s machine."""
    pmap: Pmap = vm.machine.Pmap(vm)
    return pmap


def pmap_enter(pmap: Pmap, va: int, pg: VmPage, prot: int, access_type: int = PROT_NONE, *,
               replace: bool = True) -> bool:
    entered: bool = pmap.vm.machine.pmap_enter(pmap, va, pg, prot, access_type, replace=replace)
    return entered


def pmap_remove(pmap: Pmap, sva: int, eva: int) -> None:
    pmap.vm.machine.pmap_remove(pmap, sva, eva)


def pmap_protect(pmap: Pmap, sva: int, eva: int, prot: int) -> None:
    pmap.vm.machine.pmap_protect(pmap, sva, eva, prot)


def pmap_enter_run(pmap: Pmap, va: int, pgs: list[VmPage], prot: int, access_type: int = PROT_NONE, *,
                   replace: bool = True) -> int:
    entered: int = pmap.vm.machine.pmap_enter_run(pmap, va, pgs, prot, access_type, replace=replace)
    return entered


def pmap_page_protect(pg: VmPage, prot: int) -> None:
    pg.vm.machine.pmap_page_protect(pg, prot)


def pmap_page_protect_run(pgs: list[VmPage], prot: int) -> None:
    if pgs:
        pgs[0].vm.machine.pmap_page_protect_run(pgs, prot)


def pmap_extract(pmap: Pmap, va: int) -> tuple[VmPage, int] | None:
    """A lookup in ``pm_pte``, which every machine keeps: no dispatch."""
    return pmap.pm_pte.get(va)


def pmap_update(pmap: Pmap) -> None:
    pmap.vm.machine.pmap_update(pmap)


def pmap_is_modified(pg: VmPage) -> bool:
    """PG_MOD, which every machine keeps in ``pg.attrs``: no dispatch."""
    return bool(pg.attrs & PG_MOD)


def pmap_clear_modify(pg: VmPage) -> bool:
    was: bool = pg.vm.machine.pmap_clear_modify(pg)
    return was


def pmap_clear_modify_run(pgs: list[VmPage]) -> list[bool]:
    were: list[bool] = pgs[0].vm.machine.pmap_clear_modify_run(pgs) if pgs else []
    return were


def pmap_is_referenced(pg: VmPage) -> bool:
    """PG_REF, which every machine keeps in ``pg.attrs``: no dispatch."""
    return bool(pg.attrs & PG_REF)


def pmap_clear_reference(pg: VmPage) -> bool:
    was: bool = pg.vm.machine.pmap_clear_reference(pg)
    return was


def pmap_clear_reference_run(pgs: list[VmPage]) -> list[bool]:
    were: list[bool] = pgs[0].vm.machine.pmap_clear_reference_run(pgs) if pgs else []
    return were


def pmap_access(pmap: Pmap, va: int, end: int, access_type: int) -> Run | None:
    run: Run | None = pmap.vm.machine.pmap_access(pmap, va, end, access_type)
    return run


def pmap_tlb_merge(pmap: Pmap, runs: list[Run], access_type: int, touched: int) -> None:
    pmap.vm.machine.pmap_tlb_merge(pmap, runs, access_type, touched)


__all__ = [
    "MACHINES",
    "Pmap",
    "Run",
    "machine_module",
    "pmap_access",
    "pmap_clear_modify",
    "pmap_clear_modify_run",
    "pmap_clear_reference",
    "pmap_clear_reference_run",
    "pmap_create",
    "pmap_enter",
    "pmap_enter_run",
    "pmap_extract",
    "pmap_is_modified",
    "pmap_is_referenced",
    "pmap_page_protect",
    "pmap_page_protect_run",
    "pmap_protect",
    "pmap_remove",
    "pmap_tlb_merge",
    "pmap_update",
]
