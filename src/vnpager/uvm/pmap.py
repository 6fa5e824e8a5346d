"""The pmap interface (pmap.h): what the MI code asks of a machine's MMU.

uvm_fault, uvm_map, uvm_page, uvm_pager, uvm_vnode and the page daemon
import these names from here and never learn which machine is under them;
each machine (``vnpager.arch.<machine>``) implements all of them.  Bound
today to the software machine, :mod:`vnpager.arch.soft`; the hardware one
(``arch/uffd``, issue 10) will be chosen per VM.

All pmaps of one VM share ``vm.pmap_lock``; an operation that changes a
translation or a page's ref/mod bits takes it itself.

Address spaces and translations:

* ``Pmap(vm)`` -- an empty pmap of *vm* (one per Vmspace).
* ``pmap_enter(pmap, va, pg, prot, access_type=PROT_NONE, *, replace=True)
  -> bool`` -- map *pg* at *va* with *prot*; *access_type* sets ref/mod at
  once; with ``replace=False`` an existing translation stays (False).
* ``pmap_remove(pmap, sva, eva)`` -- remove the translations of [sva, eva).
* ``pmap_protect(pmap, sva, eva, prot)`` -- lower those of [sva, eva) to
  *prot* (PROT_NONE removes them).
* ``pmap_page_protect(pg, prot)`` -- lower every mapping of *pg*;
  PROT_NONE removes them all (before the page is freed or reused).
* ``pmap_extract(pmap, va) -> (pg, prot) | None`` -- the translation at *va*.

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

The attribute bits, per page, as the MMU sets them on each access:

* ``pmap_is_modified(pg)``, ``pmap_clear_modify(pg) -> was`` -- PG_MOD;
  after a clear, the next store through any mapping sets it again before
  its bytes land (the flush and the page daemon rely on it: they
  write-protect, write back, then clear).
* ``pmap_is_referenced(pg)``, ``pmap_clear_reference(pg) -> was`` -- PG_REF;
  after a clear, the next load or store sets it again (the page daemon's
  second chance).

The page frames: ``Frames(npages, page_size)`` makes the machine's
physical memory when the VM is made; ``frames.frame(i)`` is the memoryview
a VmPage exposes as ``pg.data``, which I/O reads and writes in place and
whose bytes every mapping of the page sees.

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
"""

from __future__ import annotations

from vnpager.arch.soft.frames import Frames
from vnpager.arch.soft.pmap import (
    Pmap,
    Run,
    pmap_access,
    pmap_clear_modify,
    pmap_clear_modify_run,
    pmap_clear_reference,
    pmap_clear_reference_run,
    pmap_enter,
    pmap_enter_run,
    pmap_extract,
    pmap_is_modified,
    pmap_is_referenced,
    pmap_page_protect,
    pmap_page_protect_run,
    pmap_protect,
    pmap_remove,
    pmap_tlb_merge,
)

__all__ = [
    "Frames",
    "Pmap",
    "Run",
    "pmap_access",
    "pmap_clear_modify",
    "pmap_clear_modify_run",
    "pmap_clear_reference",
    "pmap_clear_reference_run",
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
]
