"""UBC: file reads and writes through the pages of a vnode's object.

NetBSD calls this the unified buffer cache: read() and write() copy to and
from the very pages that mappings of the file use, so file I/O and mappings
are coherent by construction and there is one cache, the pager's.

For each page of the range we take the object lock, find the page resident
(``uvn_get`` with PGO_LOCKED: a lookup) or fetch it (the unlocked pass, which
reads it from the vnode, with the rest of the read and the object's
read-ahead window in the same I/O), copy, and give it back active and unbusy.  A write
that covers every byte of the file in a page does not read it first: it
allocates a fresh page.  A write past the end grows the backing file and
then the pager's size (``uvm_vnp_setsize``); a read stops at the pager's end.

=> every function here takes an object the caller has attached (a
   reference from ``uvn_attach``), with PROT_WRITE for writes so that the
   object is on the writeable list and sync finds its dirty pages.
=> the caller holds no VM lock: we sleep for pages, memory and the vnode.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from vnpager.kern.lock import LK_EXCLUSIVE, LK_RETRY, RW_WRITE, gated, kernel_lock
from vnpager.kern.proc import curproc
from vnpager.uvm.uvm_page import (
    PG_CLEAN,
    PG_FAKE,
    UVM_PGA_ZERO,
    VmPage,
    uvm_page_unbusy,
    uvm_pageactivate_run,
    uvm_pagealloc,
    uvm_pagedeactivate,
    uvm_pagelookup,
    uvm_pagewait,
    uvm_wait,
)
from vnpager.uvm.uvm_pager import (
    PGO_LOCKED,
    VM_PAGER_AGAIN,
    VM_PAGER_BAD,
    VM_PAGER_OK,
    PageSlot,
)
from vnpager.uvm.uvm_param import MADV_NORMAL, PROT_READ
from vnpager.uvm.uvm_readahead import RA_WINSIZE_MAX, uvm_ra_max, uvm_ra_reserve, uvm_ra_window
from vnpager.uvm.uvm_vnode import UvmVnode, uvm_vnp_revalidate, uvm_vnp_setsize, uvn_get
from vnpager.vfs.vnode import VOP_UNLOCK, vn_lock

# how ubc_page() gets a page that is not resident
FETCH = 0  # read it from the vnode
FRESH = 1  # allocate it: the caller overwrites every byte of it
ZEROED = 2  # allocate it zero-filled: the caller overwrites part of it

def ubc_page(uvn: UvmVnode, pgoff: int, how: int, ahead: int = 0) -> VmPage | None:
    """The page at *pgoff*, busy and owned by the caller.

    FETCH reads a missing page with the object's read-ahead window, or the
    *ahead* pages the caller is about to read after it if that is more (up
    to RA_WINSIZE_MAX); the pages read besides *pgoff* are left unbusy on
    the inactive queue, for the caller's next calls to find.

    Returns None if *pgoff* is past the end of the object (FETCH only).
    Raises OSError with the backend's errno if the page-in fails.

    => caller holds no lock; the object lock is held on return (with a page).
    """
    lock = uvn.vmobjlock
    vm = uvn.vm
    ps = vm.page_size
    slot: list[PageSlot] = [None]
    while True:
        lock.rw_enter(RW_WRITE)
        result, _ = uvn_get(uvn, pgoff, slot, 1, 0, PROT_READ, 0, PGO_LOCKED)
        if result == VM_PAGER_OK:
            if how == FETCH:
                uvn.u_ubc_ra.ra_next = pgoff + ps
            return slot[0]  # type: ignore[return-value]
        if how == FETCH:
            ra = uvn.u_ubc_ra
            n = max(uvm_ra_window(ra, MADV_NORMAL, pgoff, ps, uvm_ra_max(uvn)),
                    min(1 + ahead, RA_WINSIZE_MAX // ps))
            if n > 1:  # room for the window, as a fault makes it
                uvm_ra_reserve(vm, n, lock)
            pps: list[PageSlot] = [None] * n
            # releases the object lock whatever the result
            result, _ = uvn_get(uvn, pgoff, pps, n, 0, PROT_READ, MADV_NORMAL, 0)
            if result == VM_PAGER_OK:
                lock.rw_enter(RW_WRITE)
                extra = [p for p in pps[1:] if isinstance(p, VmPage)]
                with vm.pageqlock:
                    for p in extra:
                        uvm_pagedeactivate(p)
                uvm_page_unbusy(extra)
                ra.ra_next = pgoff + (1 + len(extra)) * ps
                return pps[0]  # type: ignore[return-value]
            if result == VM_PAGER_BAD:
                return None
            if result == VM_PAGER_AGAIN:
                # the vnode lock was busy (uvn_get does not sleep for it):
                # wait until it is free, then try again
                vp = uvn.u_vnode
                vn_lock(vp, LK_EXCLUSIVE | LK_RETRY)
                VOP_UNLOCK(vp)
                continue
            raise OSError(curproc().p_errno or errno.EIO, "page-in failed")
        pg = uvm_pagelookup(uvn, pgoff)
        if pg is not None:  # resident but busy: wait for it (drops the lock)
            uvm_pagewait(pg, lock, "ubcwait")
            continue
        pg = uvm_pagealloc(vm, uvn, pgoff, UVM_PGA_ZERO if how == ZEROED else 0)
        if pg is not None:
            return pg  # PG_FAKE until the caller fills it
        lock.rw_exit()
        uvm_wait(vm, "ubcalloc")


def ubc_release(uvn: UvmVnode, pg: VmPage, dirty: bool) -> None:
    """Give back a page from :func:`ubc_page`: active, unbusy, unlocked.

    A page written by the caller becomes dirty: it is not mapped through a
    pmap here, so its modified bit would not tell; PG_CLEAN goes instead.

    => caller holds the object lock and owns *pg* (busy); lock released.
    """
    if dirty:
        pg.pg_flags &= ~(PG_CLEAN | PG_FAKE)
    ubc_release_run(uvn, [pg])


def ubc_release_run(uvn: UvmVnode, pgs: list[VmPage]) -> None:
    """Give back pages read (not written) by the caller: active (one hold
    of the page queue lock), unbusy, unlocked.

    => caller holds the object lock and owns *pgs* (busy); lock released.
    """
    uvm_pageactivate_run(pgs)
    uvm_page_unbusy(pgs)
    uvn.vmobjlock.rw_exit()


def _ubc_resident(uvn: UvmVnode, pgoff: int, npages: int) -> list[VmPage]:
    """The run of resident, unbusy pages from *pgoff* on (at most *npages*,
    none if *pgoff*'s page is not one), busy and owned by the caller: one
    uvn_get with PGO_LOCKED for the run.

    => caller holds the object lock.
    """
    pps: list[PageSlot] = [None] * npages
    uvn_get(uvn, pgoff, pps, npages, 0, PROT_READ, 0, PGO_LOCKED)
    run: list[VmPage] = []
    for pg in pps:
        if not isinstance(pg, VmPage):
            break
        run.append(pg)
    uvm_page_unbusy([pg for pg in pps[len(run):] if isinstance(pg, VmPage)])  # past a gap: not ours
    return run


def _each_page(uvn: UvmVnode, off: int, end: int,
               step: Callable[[int, int, int], bool]) -> None:
    """Call step(pgoff, lo, hi) for each page of [off, end), [lo, hi) being
    the bytes of it in range, until step returns False."""
    ps = uvn.vm.page_size
    pgoff = uvn.vm.trunc_page(off)
    while pgoff < end and step(pgoff, max(off, pgoff), min(end, pgoff + ps)):
        pgoff += ps


@gated
def ubc_readinto(uvn: UvmVnode, buf: memoryview, off: int) -> int:
    """Read up to len(buf) bytes at *off* into *buf*; return how many.

    Stops at the end of the object (0 at or past it).  Works a run of
    resident pages at a time (one lock hold, one uvn_get, one release for
    up to RA_WINSIZE_MAX of them); a page that is not resident is fetched
    with the pages after it that the read wants (ubc_page), and the next
    run finds them.
    """
    end = min(off + len(buf), uvn.u_size)
    ps = uvn.vm.page_size
    lock = uvn.vmobjlock
    done = 0
    pgoff = uvn.vm.trunc_page(off)
    while pgoff < end:
        lock.rw_enter(RW_WRITE)
        pgs = _ubc_resident(uvn, pgoff, min(-(-(end - pgoff) // ps), RA_WINSIZE_MAX // ps))
        if pgs:
            uvn.u_ubc_ra.ra_next = pgoff + len(pgs) * ps
        else:
            lock.rw_exit()
            pg = ubc_page(uvn, pgoff, FETCH, -(-(end - min(end, pgoff + ps)) // ps))
            if pg is None:  # truncated under us
                break
            pgs = [pg]
        size = uvn.u_size  # it may have shrunk since we looked
        for pg in pgs:
            lo, hi = max(off, pg.offset), min(end, pg.offset + ps, size)
            if hi <= lo:
                end = 0  # truncated: stop after this run
                break
            buf[lo - off:hi - off] = pg.data[lo - pg.offset:hi - pg.offset]
            done = hi - off
        ubc_release_run(uvn, pgs)
        pgoff += len(pgs) * ps
    return done


@gated
def ubc_read(uvn: UvmVnode, n: int, off: int) -> bytes:
    """Read up to *n* bytes at *off*; fewer at the end of the object."""
    buf = bytearray(max(0, min(n, uvn.u_size - off)))
    got = ubc_readinto(uvn, memoryview(buf), off)
    return bytes(buf[:got]) if got < len(buf) else bytes(buf)


@gated
def ubc_write(uvn: UvmVnode, data: bytes | bytearray | memoryview, off: int) -> int:
    """Write *data* at *off*, growing the object if it ends past the end.

    Returns len(data).  Raises OSError if the backing file cannot grow or a
    page that must be read first cannot be.  The pages are left dirty:
    they reach the vnode at the next flush, sync or pageout.
    """
    src = memoryview(data).cast("B")
    end = off + len(src)
    if not src:
        return 0
    old_size = _grow(uvn, end)
    ps = uvn.vm.page_size
    pmap_lock = uvn.vm.pmap_lock

    def step(pgoff: int, lo: int, hi: int) -> bool:
        # bytes of the file in this page that the write leaves as they are
        valid_end = min(pgoff + ps, old_size)
        if pgoff < valid_end and (lo > pgoff or hi < valid_end):
            how = FETCH
        else:
            how = FRESH if hi - lo == ps else ZEROED
        pg = ubc_page(uvn, pgoff, how)
        while pg is None:  # truncated under us: the write still lands
            _grow(uvn, end)
            pg = ubc_page(uvn, pgoff, how)
        with pmap_lock:  # no pmap_page_protect or store may interleave
            pg.data[lo - pgoff:hi - pgoff] = src[lo - off:hi - off]
        ubc_release(uvn, pg, dirty=True)
        return True

    _each_page(uvn, off, end, step)
    return len(src)


def _backing_setsize(uvn: UvmVnode, size: int) -> None:
    vp = uvn.u_vnode
    error = vn_lock(vp, LK_EXCLUSIVE)
    if error == 0:
        error = vp.v_op.setsize(vp, size)
        VOP_UNLOCK(vp)
    if error:
        raise OSError(error, "cannot resize the backing file")


def _setsize_locked(uvn: UvmVnode, size: int) -> None:
    """Set the size of the pager and the backing file, in the one order
    every front end uses.  Shrinking, the pager first: it frees the pages
    past the new end (dirty or not, waiting for those in pageout) before
    the backing file shrinks, so that no pageout writes them back beyond
    it.  Growing, the backing file first: a page-in past its end would fail.

    => caller holds u_sizelock.
    """
    if size < uvn.u_size:
        with kernel_lock:
            uvm_vnp_setsize(uvn.u_vnode, size)
        _backing_setsize(uvn, size)
    else:
        _backing_setsize(uvn, size)
        with kernel_lock:
            uvm_vnp_setsize(uvn.u_vnode, size)


def _grow(uvn: UvmVnode, end: int) -> int:
    """Make the object at least *end* bytes long; return the size before."""
    size = uvn.u_size
    if end <= size:
        return size
    with uvn.u_sizelock:
        size = uvn.u_size
        if end > size:
            _setsize_locked(uvn, end)
    return size


@gated
def ubc_setsize(uvn: UvmVnode, size: int) -> None:
    """Truncate or extend the object and its backing file to *size*
    (see _setsize_locked for the order).  Raises OSError if the backing
    file cannot change size.

    => caller holds no VM lock.
    """
    with uvn.u_sizelock:
        _setsize_locked(uvn, size)


def ubc_revalidate(uvn: UvmVnode, drop_stale: bool) -> int:
    """uvm_vnp_revalidate under the size lock, so that a size read from the
    file while ubc_setsize is between its two steps is not taken for a
    change from outside.  Returns 0 or the errno of VOP_GETATTR.

    => caller holds no VM lock.
    """
    with uvn.u_sizelock:
        return uvm_vnp_revalidate(uvn.u_vnode, drop_stale)
