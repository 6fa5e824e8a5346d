"""What the FUSE file system asks of the pager, one function per request.

Each of these may sleep (for pages, memory, the vnode lock, I/O), so the
file system runs them in worker threads, never on the event loop, except
:func:`read_nowait` and :func:`write_nowait`, which never sleep: they serve
what the resident pages can serve at once, with the object lock only
tried, and the file system runs them on the event loop first.
Files are named by host path or by hostfs vnode key ``(st_dev, st_ino)``.

The data path works on runs of pages, not a page at a time as UBC's
``ubc_read``/``ubc_write`` do (which remain the fallback for whatever a run
cannot do): one object lock and one page queue lock for the resident pages
of a request, one ``uvn_get`` (so one read call) for the missing pages of a
read, the memory for them freed in the caller's thread first
(``uvmpd_reserve``, as read-ahead does), fresh pages for the whole pages a
write covers (never read first).  A writer short of memory frees it itself
ahead of its writes (:func:`_make_room`): clean pages first, then its own
oldest pages, written in one synchronous flush and freed, instead of
sleeping until the page daemon has written back enough of a stream of
writes (its free target is a few hundred pages: less than two 1 MiB writes).
"""

from __future__ import annotations

import errno
import itertools
import os
from typing import TYPE_CHECKING

from vnpager.kern.lock import LK_EXCLUSIVE, RW_NOSLEEP, RW_WRITE, gated
from vnpager.kern.proc import curproc
from vnpager.uvm.uvm_bio import ubc_read, ubc_write
from vnpager.uvm.uvm_page import (
    PG_BUSY,
    PG_CLEAN,
    PG_FAKE,
    PQ_QUEUES,
    UVM_PAGE_OWN,
    VmPage,
    uvm_page_unbusy,
    uvm_pageactivate_run,
    uvm_pagealloc,
    uvm_pagedeactivate,
    uvm_pagedeactivate_run,
    uvm_pagelookup,
)
from vnpager.uvm.uvm_pager import (
    PGO_ALLPAGES,
    PGO_CLEANIT,
    PGO_FREE,
    PGO_LOCKED,
    PGO_NOSLEEPALLOC,
    PGO_SYNCIO,
    VM_PAGER_ERROR,
    VM_PAGER_OK,
    PageSlot,
)
from vnpager.uvm.uvm_param import MADV_NORMAL, PROT_READ, PROT_WRITE
from vnpager.uvm.uvm_pdaemon import uvmpd_reserve
from vnpager.uvm.uvm_vnode import (
    UVM_VNODE_VALID,
    UvmVnode,
    uvm_vnp_sync,
    uvm_vnp_uncache,
    uvm_vnp_wrote,
    uvn_flush,
    uvn_get,
)
from vnpager.vfs.hostfs import HostNode
from vnpager.vfs.mount import MNT_FORCE
from vnpager.vfs.vnode import VOP_FSYNC, VOP_UNLOCK, Vnode, vn_lock
from vnpager.vnmap import FileObject

if TYPE_CHECKING:
    from vnpager.uvm.uvm import VM

# pages a request short of memory frees at least: the requests after it find them free (and
# are served on the event loop), and small requests share one scan of the queues (each scan
# lists a whole queue) or one flush
FREE_AHEAD = 64


def open_object(vm: VM, path: str, write: bool) -> FileObject:
    """Attach the object of *path* for an open (PROT_WRITE if *write*;
    EACCES if the backing file is read-only)."""
    return FileObject.open(vm, path, PROT_READ | (PROT_WRITE if write else 0))


def truncate(vm: VM, path: str, size: int, f: FileObject | None) -> None:
    """Set the size of *path* (whose open object *f* may be given)."""
    if f is not None:
        f.setsize(size)
        return
    with open_object(vm, path, write=True) as f:
        f.setsize(size)


# --- reads -------------------------------------------------------------------------

def _span(uvn: UvmVnode, n: int, off: int) -> tuple[int, int, int]:
    """(end, first page, pages) of a read of *n* bytes at *off*, cut at the object's end."""
    vm = uvn.vm
    end = min(off + n, uvn.u_size)
    first = vm.trunc_page(off)
    return end, first, max(0, vm.round_page(end) - first) // vm.page_size


def _resident(uvn: UvmVnode, first: int, npages: int) -> list[VmPage] | None:
    """The pages [first, first + npages pages) if every one is resident and
    unbusy, else None.  => caller holds the object lock."""
    ps = uvn.vm.page_size
    pgs = []
    for i in range(npages):
        pg = uvm_pagelookup(uvn, first + i * ps)
        if pg is None or pg.pg_flags & PG_BUSY:
            return None
        pgs.append(pg)
    return pgs


def _copy_out(uvn: UvmVnode, pgs: list[VmPage], first: int, off: int, end: int) -> bytearray:
    """The bytes [off, end) of the pages *pgs* (from *first*).  A page found
    resident becomes the most recently used (active); one just read in goes
    to the tail of the inactive queue, so that a stream read once is freed
    before the pages used twice, and without a pass over the active queue.
    => caller holds the object lock."""
    ps = uvn.vm.page_size
    end = min(end, uvn.u_size)  # it may have shrunk while the lock was dropped
    buf = bytearray(max(0, end - off))
    for pg in pgs:
        lo, hi = max(off, pg.offset), min(end, pg.offset + ps)
        if hi > lo:
            buf[lo - off:hi - off] = pg.data[lo - pg.offset:hi - pg.offset]
    _requeue(pgs)
    uvn.u_ubc_ra.ra_next = first + len(pgs) * ps
    return buf


def _requeue(pgs: list[VmPage]) -> None:
    """Pages found resident (on a queue) to the tail of the active queue,
    used again; pages just brought in (on none) to the tail of the inactive
    one, used once, the first to go (as Linux's).  A run of each, under one
    hold of the page queue lock each.  => caller holds the pages' object lock."""
    if not pgs:
        return
    again = [pg for pg in pgs if pg.pg_flags & PQ_QUEUES]
    with pgs[0].vm.pageqlock:
        uvm_pagedeactivate_run([pg for pg in pgs if not pg.pg_flags & PQ_QUEUES])
    uvm_pageactivate_run(again)


@gated
def read_nowait(uvn: UvmVnode, n: int, off: int) -> bytearray | None:
    """Up to *n* bytes at *off*, or None (ask :func:`read`) rather than
    sleep: the object lock is only tried, the pages missing are read only
    from free memory (PGO_NOSLEEPALLOC, after freeing clean pages, which
    needs no sleep) and with the vnode lock free.  It may still wait as
    long as a host call for a lock held over one (the kernel lock, the
    object lock between two steps), as the event loop's host calls do.

    => caller holds a reference to the object (an open file) and no VM lock.
    """
    if not uvn.vmobjlock.rw_enter(RW_WRITE | RW_NOSLEEP):
        return None
    return _read(uvn, n, off, PGO_NOSLEEPALLOC)


@gated
def read(uvn: UvmVnode, n: int, off: int) -> bytearray | bytes:
    """Up to *n* bytes at *off*, fewer at the end of the object: the pages
    missing read in one ``uvn_get``, memory for them freed first.  Raises
    OSError with the backend's errno if the page-in fails.

    => caller holds a reference to the object and no VM lock.
    """
    uvn.vmobjlock.rw_enter(RW_WRITE)
    data = _read(uvn, n, off, 0)
    # None: truncated, or the vnode lock busy: UBC's page at a time copes
    return ubc_read(uvn, n, off) if data is None else data


def _read(uvn: UvmVnode, n: int, off: int, flags: int) -> bytearray | None:
    """The bytes of a read from the resident pages, or with those missing
    read in (:func:`_page_in` with *flags*); None if that could not be done.

    => caller holds the object lock; it is released on return.
    """
    end, first, npages = _span(uvn, n, off)
    pgs = _resident(uvn, first, npages)
    if pgs is not None:
        try:
            return _copy_out(uvn, pgs, first, off, end)
        finally:
            uvn.vmobjlock.rw_exit()
    pgs = _page_in(uvn, first, npages, flags)
    if pgs is None:
        return None
    try:
        return _copy_out(uvn, pgs, first, off, end)
    finally:
        uvm_page_unbusy(pgs)
        uvn.vmobjlock.rw_exit()


def _page_in(uvn: UvmVnode, first: int, npages: int, flags: int) -> list[VmPage] | None:
    """Every page of [first, first + npages pages), busy, those missing
    read in runs (one read call each; one for the lot when memory allows,
    and it is freed first, in our thread, as read-ahead does).  None if a
    page is past the end, the vnode lock was busy, or (with *flags*
    PGO_NOSLEEPALLOC) memory is short: nothing is then held.
    Raises OSError if a read failed.

    => caller holds the object lock; it is dropped and held again on return
       (but for an OSError, which returns it unlocked).
    """
    lock = uvn.vmobjlock
    vm = uvn.vm
    missing = sum(uvm_pagelookup(uvn, first + i * vm.page_size) is None for i in range(npages))
    _reserve(uvn, missing)
    pps: list[PageSlot] = [None] * npages
    result, _ = uvn_get(uvn, first, pps, npages, 0, PROT_READ, MADV_NORMAL, PGO_LOCKED | PGO_ALLPAGES)
    if result == VM_PAGER_OK:
        return pps  # type: ignore[return-value]
    # the unlocked pass: waits for busy pages, allocates and reads the rest
    result, _ = uvn_get(uvn, first, pps, npages, 0, PROT_READ, MADV_NORMAL, PGO_ALLPAGES | flags)
    lock.rw_enter(RW_WRITE)
    got = [p for p in pps if isinstance(p, VmPage)]
    if result == VM_PAGER_OK and len(got) == npages:
        return got
    with vm.pageqlock:  # read or found, but not all of them: back on a queue, for the daemon
        for pg in got:
            uvm_pagedeactivate(pg)
    uvm_page_unbusy(got)
    lock.rw_exit()
    if result == VM_PAGER_ERROR:
        raise OSError(curproc().p_errno or errno.EIO, "page-in failed")
    return None


def _reserve(uvn: UvmVnode, npages: int) -> int:
    """Free clean pages in our thread so that *npages* can be allocated
    above vm.freemin (uvmpd_reserve), and at least FREE_AHEAD of them if
    any are short; return how many are still short.

    => caller holds the object lock; it is dropped meanwhile.
    """
    vm = uvn.vm
    short = vm.freemin + npages - len(vm.page_free)
    if short <= 0 or vm.pagedaemon is None:
        return 0
    uvn.vmobjlock.rw_exit()
    try:
        return max(0, short - uvmpd_reserve(vm, max(short, FREE_AHEAD)))
    finally:
        uvn.vmobjlock.rw_enter(RW_WRITE)


# --- writes ------------------------------------------------------------------------

def _write_run(uvn: UvmVnode, src: memoryview, off: int, keep: int) -> int:
    """Copy *src* into the pages from *off* on for as long as that needs no
    sleep and no read: resident unbusy pages, and fresh pages for the whole
    pages not resident while more than *keep* pages are free.  Returns the
    bytes copied (up to a page boundary, or all), and stops at the end of the
    object (a truncation may have come since the caller grew it: UBC's
    ``ubc_write`` grows it again).  The pages are left dirty.

    => caller holds the object lock.
    """
    vm = uvn.vm
    ps = vm.page_size
    end = min(off + len(src), uvn.u_size)
    pgs: list[VmPage] = []
    pos = off
    while pos < end:
        pgoff = vm.trunc_page(pos)
        hi = min(end, pgoff + ps)
        pg = uvm_pagelookup(uvn, pgoff)
        if pg is None:
            if hi - pos < ps or len(vm.page_free) <= keep:
                break  # part of a page not resident must be read first: UBC does it
            pg = uvm_pagealloc(vm, uvn, pgoff)
            if pg is None:
                break
        elif pg.pg_flags & PG_BUSY:
            break
        else:
            pg.pg_flags |= PG_BUSY
            UVM_PAGE_OWN(pg, "fusewrite")
        pgs.append(pg)
        pos = hi
    with vm.pmap_lock:  # no pmap_page_protect or store may interleave
        for pg in pgs:
            lo, hi = max(off, pg.offset), min(end, pg.offset + ps)
            pg.data[lo - pg.offset:hi - pg.offset] = src[lo - off:hi - off]
    _requeue(pgs)  # before PG_CLEAN goes: deactivating syncs it from the pmap, and only clears it
    for pg in pgs:
        pg.pg_flags &= ~(PG_CLEAN | PG_FAKE)  # not written through a pmap: no modified bit
    uvm_page_unbusy(pgs)
    return pos - off


def _stamp(f: FileObject) -> None:
    """Stamp the host file's mtime and ctime now, as a kernel's write does
    (the write-back would, but only later), and record the stamp as ours
    (uvm_vnp_wrote) so that the next attach does not take it for a change
    from outside."""
    vp = f.uvn.u_vnode
    if isinstance(vp.v_data, HostNode):
        os.utime(vp.v_data.fd)
        uvm_vnp_wrote(vp)


@gated
def write_nowait(f: FileObject, buf: bytes | memoryview, off: int) -> int:
    """Copy what of *buf* the resident pages (and free pages above
    vm.freemin, for whole pages) take at once, without sleeping; return
    how many bytes, from the start (0: ask :func:`write`).  Writes that grow
    the file are left to :func:`write`.

    => caller holds a reference to the object (open for writing), no VM lock.
    """
    uvn = f.uvn
    if off + len(buf) > uvn.u_size or not uvn.vmobjlock.rw_enter(RW_WRITE | RW_NOSLEEP):
        return 0
    try:
        n = _write_run(uvn, memoryview(buf).cast("B"), off, uvn.vm.freemin)
    finally:
        uvn.vmobjlock.rw_exit()
    if n:
        _stamp(f)
    return n


@gated
def write(f: FileObject, buf: bytes | memoryview, off: int) -> int:
    """Copy *buf* into the object's pages at *off* (growing the file if it
    ends past the end), then stamp the host file's times (:func:`_stamp`).

    Runs of pages go through :func:`_write_run`, memory made for them
    first (:func:`_make_room`); a page the run cannot take (part of a page
    not resident, a busy page, no memory left) goes through UBC's
    ``ubc_write``, which reads, waits and grows as need be.
    """
    uvn = f.uvn
    vm = uvn.vm
    src = memoryview(buf).cast("B")
    end = off + len(src)
    if end > uvn.u_size:  # UBC grows the file with the last page, first
        last = max(off, vm.trunc_page(end - 1))
        ubc_write(uvn, src[last - off:], last)
        end = last
    lock = uvn.vmobjlock
    pos = off
    while pos < end:
        lock.rw_enter(RW_WRITE)
        try:
            _make_room(uvn, (vm.round_page(end) - vm.trunc_page(pos)) // vm.page_size)
            pos += _write_run(uvn, src[pos - off:end - off], pos, 0)
        finally:
            lock.rw_exit()
        if pos < end:
            step = min(end, vm.trunc_page(pos) + vm.page_size)
            ubc_write(uvn, src[pos - off:step - off], pos)
            pos = step
    _stamp(f)
    return len(src)


def _make_room(uvn: UvmVnode, npages: int) -> None:
    """Free memory for a write of up to *npages* new pages, in the writer's
    thread, so that it does not sleep for the page daemon.  If the page the
    VM would reclaim next is one of ours and dirty (a stream of writes),
    our oldest pages are written back in one synchronous flush and freed
    first; then clean pages are freed (uvmpd_reserve), and if that was not
    enough, our own oldest pages again.

    => caller holds the object lock; it may be dropped and taken again.
    """
    vm = uvn.vm
    short = vm.freemin + npages - len(vm.page_free)
    if short <= 0 or vm.pagedaemon is None:
        return
    with vm.pageqlock:
        victim = next(iter(vm.page_inactive or vm.page_active), None)
    if victim is not None and victim.uobject is uvn and not victim.pg_flags & PG_CLEAN:
        _clean_behind(uvn, victim.offset, max(short, FREE_AHEAD))
    short = _reserve(uvn, npages)
    if short > 0:
        oldest = _oldest(uvn)
        if oldest is not None:
            _clean_behind(uvn, oldest.offset, max(short, FREE_AHEAD))


def _oldest(uvn: UvmVnode) -> VmPage | None:
    """Our page nearest the head of the inactive queue (among its first
    FREE_AHEAD pages), else our oldest active page."""
    vm = uvn.vm
    with vm.pageqlock:
        for pg in itertools.islice(vm.page_inactive, FREE_AHEAD):
            if pg.uobject is uvn:
                return pg
        return next(iter(uvn.uo_active), None)


def _clean_behind(uvn: UvmVnode, start: int, want: int) -> None:
    """Write and free *want* pages of the object from offset *start* on
    (its oldest page): for a stream of writes, the run the page daemon
    would take next.  A write-back that fails leaves its pages dirty and
    the error on the object (errseq), for fsync to report.

    => caller holds the object lock; it may be dropped and taken again.
    """
    uvn_flush(uvn, start, start + want * uvn.vm.page_size, PGO_CLEANIT | PGO_SYNCIO | PGO_FREE)


def fsync(f: FileObject) -> None:
    """Write the object's dirty pages (uvn_flush, SYNCIO), then fsync the host file."""
    f.sync()
    error = VOP_FSYNC(f.uvn.u_vnode)
    if error:
        raise OSError(error, "fsync of the backing file failed")


def _cached_vnode(vm: VM, key: tuple[int, int]) -> Vnode | None:
    """The hostfs vnode of *key* if there is one, referenced."""
    return vm.vfs.lookup(vm.hostfs, key)


def flush_cached(vm: VM, key: tuple[int, int]) -> None:
    """Write the dirty pages of file *key*, if it has an object with any.

    Before its times are set: a later write-back would change its mtime.
    """
    vp = _cached_vnode(vm, key)
    if vp is None:
        return
    try:
        if vp.v_uvm.u_flags & UVM_VNODE_VALID:
            FileObject.attach(vp, PROT_READ).close(sync=True)
    finally:
        vm.vfs.vrele(vp)


def uncache(vm: VM, key: tuple[int, int]) -> None:
    """File *key* is losing a name (unlink, rename over): stop its object
    persisting, so that it dies now or at its last close."""
    vp = _cached_vnode(vm, key)
    if vp is None:
        return
    try:
        if vn_lock(vp, LK_EXCLUSIVE) == 0:
            uvm_vnp_uncache(vp)
            VOP_UNLOCK(vp)
    finally:
        vm.vfs.vrele(vp)


def cached_size(vm: VM, key: tuple[int, int]) -> int:
    """The pager's size of file *key*, or -1 if it has no object.

    Only reads: safe on the event loop (a stale answer is as good as a
    racing one)."""
    vp = vm.hostfs.mnt_vnodes.get(key)
    if vp is None or vp.v_uvm is None or not vp.v_uvm.u_flags & UVM_VNODE_VALID:
        return -1
    size: int = vp.v_uvm.u_size
    return size


def shutdown(vm: VM, objects: list[FileObject]) -> None:
    """Unmount time: detach what is still open, write every dirty page
    (uvm_vnp_sync), terminate every object (forced unmount), stop the VM."""
    for f in objects:
        f.close()
    uvm_vnp_sync(vm)
    vm.vfs.dounmount(vm.hostfs, MNT_FORCE)
    vm.close()
