"""Read-ahead (as NetBSD's uvm_readahead.c, with Linux's on-demand sizing
and asynchronous read-ahead, mm/readahead.c).

A :class:`UvmRactx` follows one stream of accesses: a map entry's faults,
or UBC's reads of one object.  A miss at the page where the stream left off
is sequential and doubles the window, from RA_WINSIZE_INIT up to the
object's largest (uvm_ra_max); a miss anywhere else is random and resets
the stream.  The window is how many pages the pager reads at the miss, in
one I/O (uvn_get fills them from free memory only: see UVM_PGA_NORESERVE);
the caller then sets ``ra_next`` past the pages the access made resident or
mapped.  MADV_SEQUENTIAL always reads the largest window, MADV_RANDOM only
the page that missed.

Asynchronous read-ahead, for objects whose filesystem reads without the
vnode lock (objfs: every read a request, with a round trip to overlap;
see _ra_async_reads for why not the others): at a sequential miss the next
window (twice as large, up to the largest and an eighth of the VM) is
decided and handed to the VM's :class:`RaDaemon` before the miss's own
window is read (:func:`uvm_ra_start`), so that both are in flight; the
window then read is as above.  The first page of the window handed is the
stream's *mark* (``ra_mark``: Linux's PG_readahead page, with
``async_size`` the whole window): the access that reaches it, whether
the page is in or still being read, hands the next window in turn
(:func:`uvm_ra_hit`, :func:`uvm_ra_async`), before it sleeps on the page
if it must (:func:`uvm_ra_pagewait`).  So a steady sequential reader has
the window after the one it reads in flight, two when it reads faster
than the store answers, and no miss of its own; a fault maps the resident
pages of its stream up to the mark in one go (:func:`uvm_ra_span`), one
fault a window.  A window the daemon could not read (or only in part) is
what the reader misses next, and that miss starts the chain again; a miss
at the mark of a window not begun yet is that window, read by the reader.
MADV_RANDOM and a random miss end the stream (no mark).

The pages an asynchronous window reads are PG_READAHEAD until used
(mapped by a fault, or read through UBC: :func:`uvm_ra_used`), counted in
uvmexp (``ra_async``, ``ra_async_dropped``, ``ra_async_pages``,
``ra_async_used``).  The page daemon gives such a page, found unused on
the inactive queue, one more pass (as if referenced), so that the window
after the reader's is not freed to make room for the next one.

Both kinds of background read (WILLNEED's ranges and asynchronous windows)
go to the inactive queue, unmapped and unreferenced, and take free memory
only, never sleeping for it: an asynchronous window first has room made for
it as the reader's own window does (uvm_ra_reserve: clean pages the page
daemon would free, never a page in active use); what cannot be had is
dropped.

MADV_WILLNEED hands a range to the same daemon, whose threads read the
missing pages of queued ranges in the background, a window each; what it
reads waits on the inactive queue, unmapped: if nobody maps it, it goes
before any page in active use.

=> a context is updated by concurrent faults on one entry (the map lock is
   shared), and UBC's by concurrent readers of one object, under the
   object lock but for ``ra_async``'s handover: a race can only make the
   heuristic guess wrong (a window handed twice reads nothing the second
   time, as the daemon reads only missing pages), never touch a page.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vnpager.kern.lock import RW_WRITE, fork_gate
from vnpager.uvm.uvm_page import (
    PG_READAHEAD,
    VmPage,
    uvm_page_unbusy,
    uvm_pagedeactivate,
    uvm_pagelookup,
    uvm_pagewait,
)
from vnpager.uvm.uvm_pager import PGO_NOSLEEPALLOC, VM_PAGER_OK, PageSlot
from vnpager.uvm.uvm_param import MADV_RANDOM, MADV_SEQUENTIAL, MADV_WILLNEED, PROT_READ
from vnpager.uvm.uvm_pdaemon import uvmpd_reserve

if TYPE_CHECKING:
    from vnpager.kern.lock import RWLock
    from vnpager.uvm.uvm import VM
    from vnpager.uvm.uvm_object import UvmObject

RA_WINSIZE_INIT = 16 * 1024  # bytes: the first window of a sequential stream
RA_WINSIZE_MAX = 256 * 1024  # bytes: the largest, and MADV_SEQUENTIAL's
RA_QUEUE_MAX = 32  # WILLNEED ranges queued per VM; more are dropped (advice)
RA_THREADS = 4  # WILLNEED readers per VM: windows of a range in flight at once
RA_HANDOFF = 0.05  # seconds at most a reader waits for a free thread to take its window (see RaDaemon)


@dataclass(eq=False)
class UvmRactx:
    """The read-ahead state of one stream."""

    ra_next: int = -1  # object offset of the page a sequential stream touches next
    ra_winsize: int = 0  # pages of the window (0: not in a stream)
    ra_mark: int = -1  # object offset whose access hands the next window to the daemon (-1: none)
    ra_ahead: int = -1  # object offset where the last window handed to the daemon ends
    ra_async: tuple[int, int] | None = None  # a window decided, for uvm_ra_async to hand over


def uvm_ra_window(ra: UvmRactx, advice: int, off: int, page_size: int,
                  maxbytes: int = RA_WINSIZE_MAX) -> int:
    """How many pages to read for a miss at object offset *off*, the page
    that missed first, in a window of at most *maxbytes* (uvm_ra_max);
    records the miss in *ra*.  A miss at the mark is the window handed to
    the daemon, not begun yet (a reader faster than the daemon's start):
    the reader reads that window itself, and the daemon then finds it in."""
    maxwin = max(1, maxbytes // page_size)
    if advice == MADV_RANDOM:
        return 1
    if off == ra.ra_mark and ra.ra_ahead > off:
        return min(-(-(ra.ra_ahead - off) // page_size), maxwin)
    if advice == MADV_SEQUENTIAL:
        return maxwin
    if off == ra.ra_next:
        ra.ra_winsize = min(max(2 * ra.ra_winsize, RA_WINSIZE_INIT // page_size), maxwin)
    else:
        ra.ra_winsize, ra.ra_mark = 0, -1  # random: read what faulted, start again small
    return max(ra.ra_winsize, 1)


def uvm_ra_next(ra: UvmRactx, uobj: UvmObject, start: int, advice: int, limit: int) -> None:
    """Decide the next asynchronous window of *ra*, a stream of *uobj*:
    from *start*, twice its last window up to uvm_ra_max (the largest under
    MADV_SEQUENTIAL), cut at *limit* (the end of the mapping) and at the
    object's last page.  It becomes ``ra_async`` and its first page the
    mark.  None under MADV_RANDOM, out of a stream, or at the end.
    => caller holds *uobj*'s lock.
    """
    vm = uobj.vm
    page_size = vm.page_size
    # at most an eighth of the VM, whatever RA_WINSIZE_MAX: the reader's window,
    # this one and the next may all be resident at once, with the pages behind
    maxwin = max(1, min(uvm_ra_max(uobj) // page_size, vm.npages // 8))
    size = getattr(uobj, "u_size", None)  # a vnode's; an object without one ends at *limit*
    if size is not None:
        limit = min(limit, vm.round_page(size))
    if not _ra_async_reads(uobj):
        npages = 0
    elif advice == MADV_SEQUENTIAL:
        npages = maxwin
    elif advice == MADV_RANDOM or ra.ra_winsize == 0:
        npages = 0
    else:
        npages = ra.ra_winsize = min(2 * ra.ra_winsize, maxwin)
    if npages == 0:
        ra.ra_mark = -1
        return
    if start >= limit:  # the stream is at the end: a fault maps up to it (uvm_ra_span)
        ra.ra_mark = ra.ra_ahead = start
        return
    end = min(start + npages * page_size, limit)
    ra.ra_mark, ra.ra_ahead, ra.ra_async = start, end, (start, end)


def uvm_ra_hit(ra: UvmRactx, uobj: UvmObject, lo: int, hi: int, advice: int, limit: int) -> None:
    """An access found the pages [lo, hi) of *uobj* in, or being read: if
    the stream's mark is among them, the next window follows the last
    (uvm_ra_next).  => caller holds *uobj*'s lock."""
    if lo <= ra.ra_mark < hi:
        uvm_ra_next(ra, uobj, ra.ra_ahead, advice, limit)


def uvm_ra_span(ra: UvmRactx, off: int, page_size: int) -> int:
    """How many pages from *off* a fault there maps if they are resident:
    up to the stream's mark, if *off* is where the stream left off and the
    mark lies ahead (0 otherwise: the advice's fault-ahead alone).  A
    window read ahead is then mapped by one fault, and the next fault is
    at the mark."""
    if off != ra.ra_next or ra.ra_mark <= off:
        return 0
    return (ra.ra_mark - off) // page_size


def uvm_ra_async(uobj: UvmObject, ra: UvmRactx, handoff: bool = True) -> None:
    """Hand the window *ra* decided on (``ra_async``), if any, to the VM's
    read-ahead daemon, without waiting for its read: counted in
    ``uvmexp.ra_async``, and in ``ra_async_dropped`` too when the daemon's
    queue is full.  With *handoff*, wait (briefly) for a daemon thread to
    take it: the caller goes on with pages in memory, holding the GIL (see
    RaDaemon); without, it is about to sleep for I/O anyway.
    => caller holds a reference to *uobj* (the map lock, for an entry's)
       and no object lock.
    """
    window = ra.ra_async
    if window is None:
        return
    ra.ra_async = None
    exp = uobj.vm.uvmexp
    exp.ra_async += 1
    if not uobj.vm.readahead.request(uobj, window[0], window[1], window=True,
                                     handoff=RA_HANDOFF if handoff else 0.0):
        exp.ra_async_dropped += 1


def uvm_ra_pagewait(uobj: UvmObject, ra: UvmRactx, pg: VmPage, wmesg: str) -> None:
    """An access of stream *ra* found *pg* busy (a window in flight, say):
    hand over the window *ra* decided on, if any, and return at once (the
    caller looks again, and sleeps then: the handover may have slept); else
    sleep until *pg* is not busy (uvm_pagewait).
    => caller holds *uobj*'s lock; it is dropped on return."""
    if ra.ra_async is None:
        uvm_pagewait(pg, uobj.vmobjlock, wmesg)
        return
    uobj.vmobjlock.rw_exit()
    uvm_ra_async(uobj, ra, handoff=False)


def uvm_ra_used(pgs: list[VmPage]) -> None:
    """The pages *pgs* are being used (mapped by a fault, or read): those an
    asynchronous window read are no longer PG_READAHEAD, and are counted.
    => caller holds the object lock and owns the pages (busy)."""
    used = [pg for pg in pgs if pg.pg_flags & PG_READAHEAD]
    for pg in used:
        pg.pg_flags &= ~PG_READAHEAD
    if used:
        used[0].vm.uvmexp.ra_async_used += len(used)


def _ra_async_reads(uobj: UvmObject) -> bool:
    """Whether *uobj*'s streams read ahead asynchronously: those of a vnode
    whose filesystem reads without the vnode lock (``unlocked_read``:
    objfs, whose reads are requests, with a round trip to overlap).  A read
    that takes the lock meets the reader's own: the daemon's, which may
    not sleep for it (uvn_get's PGO_NOWAIT), fails, and with the GIL it
    could overlap little but a copy from the host's page cache anyway."""
    vp = getattr(uobj, "u_vnode", None)
    return vp is not None and bool(vp.v_op.unlocked_read)


def uvm_ra_max(uobj: UvmObject) -> int:
    """The largest window of *uobj*'s streams, in bytes: RA_WINSIZE_MAX, or
    what its vnode's filesystem asks for (``ra_winsize_max``: objfs, whose
    every read is a request, reads MiBs at once), at most an eighth of the
    VM's memory."""
    vp = getattr(uobj, "u_vnode", None)
    want = vp.v_op.ra_winsize_max if vp is not None else None
    if not want:
        return RA_WINSIZE_MAX
    vm = uobj.vm
    return max(RA_WINSIZE_MAX, min(want, vm.npages * vm.page_size // 8))


def uvm_ra_reserve(vm: VM, npages: int, lock: RWLock) -> None:
    """Make room for a read-ahead window of *npages* above vm.freemin (where
    uvn_get may take pages for it): the free target is raised by the
    window, and met now, in the reader's thread (uvmpd_reserve), with the
    object *lock* dropped meanwhile.

    The page daemon, woken when a window is cut short (uvm_pagewant_ra),
    runs only when the reader lets go of the GIL, and by then the reader
    has cut its next window short too: a scan of a file bigger than memory
    read 6 to 16 pages per call.  Only what the daemon would free is freed
    (clean pages unreferenced since its last pass), never a page in active
    use, so read-ahead still backs off when memory is short of such pages.
    A VM without a page daemon reclaims nothing on its own, and nothing
    here either.

    => caller holds *lock* (write), the lock of the object read, and no
       busy page: it is dropped and taken again.
    """
    short = _ra_shortage(vm, npages)
    if short <= 0:
        return
    lock.rw_exit()
    uvmpd_reserve(vm, short)
    lock.rw_enter(RW_WRITE)


def uvm_ra_start(ra: UvmRactx, uobj: UvmObject, off: int, npages: int, advice: int, limit: int) -> None:
    """A miss at *off* of stream *ra* is about to read *npages* (more than
    one: a stream's window): decide the window after them (uvm_ra_next)
    and hand it to the read-ahead daemon before this read, so that the two
    are in flight at once, then make room for this one (uvm_ra_reserve).

    A read larger than the stream's window (UBC's of the pages its caller
    asked for) is the window the next doubles, as Linux sizes its first
    window by the request: else a reader of 1 MiB at a time would read it
    with windows of 32 KiB, 64 KiB ... ahead.

    => caller holds *uobj*'s lock (write) and no busy page, and a
       reference to *uobj*: the lock is dropped and taken again.
    """
    if ra.ra_winsize:
        ra.ra_winsize = max(ra.ra_winsize, npages)
    uvm_ra_next(ra, uobj, off + npages * uobj.vm.page_size, advice, limit)
    if ra.ra_async is not None:
        uobj.vmobjlock.rw_exit()
        uvm_ra_async(uobj, ra, handoff=False)  # this read is about to sleep
        uobj.vmobjlock.rw_enter(RW_WRITE)
    uvm_ra_reserve(uobj.vm, npages, uobj.vmobjlock)


def _ra_shortage(vm: VM, npages: int) -> int:
    """The pages to free for a window of *npages* above vm.freemin (none
    without a page daemon: see uvm_ra_reserve)."""
    if vm.pagedaemon is None:
        return 0
    return vm.freemin + npages - len(vm.page_free)


@dataclass(eq=False)
class _RaStream:
    """One WILLNEED request, cut into windows that several threads read, or
    one asynchronous read-ahead window, read whole (*window*)."""

    window: bool = False
    stopped: bool = False  # a window could not be read: the rest is dropped
    begun: threading.Event | None = None  # set once its read has begun (or it is done), for a handoff


class RaDaemon:
    """The WILLNEED reader of one VM: RA_THREADS threads, started on first use.

    A queued WILLNEED range is read a window (RA_WINSIZE_MAX) at a time:
    the thread that takes a range puts the rest back at the head of the
    queue before it reads, so the next thread reads the next window
    meanwhile, and a store whose reads are requests (objfs) has several in
    flight.  The first window that cannot be read (no free memory, an error)
    stops its range.  An asynchronous read-ahead window (uvm_ra_async) is
    read whole, in one I/O, its pages marked PG_READAHEAD, after room is
    made for it (_ra_window_fill); a reader that hands one over and goes
    on with pages in memory waits (RA_HANDOFF at most, if a thread is
    free) until its read has begun, its pages busy, letting go of the GIL:
    else it keeps the GIL, and reaches the window before the read begins.
    Each queued range holds a reference to its object, dropped when the
    range is done (or dropped at stop).  The threads hold the VM weakly
    while idle, so a VM dropped without close() is still collected.

    => ``_cv`` guards the queue, ``_active``, ``_stop`` and ``_threads``.
    """

    def __init__(self, vm: VM) -> None:
        self._vm = weakref.ref(vm)
        self._cv = threading.Condition()
        self._q: deque[tuple[UvmObject, int, int, _RaStream]] = deque()
        self._active = 0  # ranges being read now
        self._stop = False
        self._threads: list[threading.Thread] = []

    def request(self, uobj: UvmObject, start: int, end: int, window: bool = False,
                handoff: float = 0.0) -> bool:
        """Queue [start, end) of *uobj* for reading (a WILLNEED range, or
        with *window* an asynchronous read-ahead window, then waiting up to
        *handoff* seconds for a thread to take it); False if the queue is
        full or the daemon stopped (the advice is then ignored).

        => caller holds a reference to *uobj* (the map lock, for an entry's)
           and no object lock.
        """
        stream = _RaStream(window, begun=threading.Event() if handoff else None)
        with self._cv:
            if self._stop or len(self._q) >= RA_QUEUE_MAX:
                return False
            uobj.pgops.pgo_reference(uobj)
            self._q.append((uobj, start, end, stream))
            while len(self._threads) < RA_THREADS:
                t = threading.Thread(target=self._run, name="readahead", daemon=True)
                self._threads.append(t)
                t.start()
            self._cv.notify()
            free = self._active < RA_THREADS  # a thread can take it now
        if stream.begun is not None and free:
            stream.begun.wait(handoff)
        return True

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every queued range is done; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._q and not self._active, timeout)

    def stop(self) -> None:
        """Stop the threads; ranges not started are dropped unread."""
        with self._cv:
            self._stop = True
            dropped = list(self._q)
            self._q.clear()
            self._cv.notify_all()
            threads = list(self._threads)
        for uobj, _, _, stream in dropped:
            if stream.begun is not None:
                stream.begun.set()  # its reader waits no longer
            uobj.pgops.pgo_detach(uobj)
        for t in threads:
            t.join(timeout=10)

    def after_fork_child(self) -> None:
        """In a forked child: the parent's threads are not here (fork drained
        the queue first); start ours on the next request."""
        self._cv = threading.Condition()
        self._active = 0
        self._threads = []

    def _run(self) -> None:
        with fork_gate.exempt():  # fork waits for threads that may wait for us
            self._serve()

    def _take(self) -> tuple[UvmObject, int, int, _RaStream] | None:
        """The next window to read (the rest of its range put back first),
        or None when the daemon stops or its VM is gone.  => _cv held."""
        while not self._q and not self._stop:
            if not self._cv.wait(timeout=1.0) and self._vm() is None:
                return None
        if self._stop:
            return None
        uobj, start, end, stream = self._q.popleft()
        cut = start - start % RA_WINSIZE_MAX + RA_WINSIZE_MAX
        if cut < end and not stream.stopped and not stream.window:
            uobj.pgops.pgo_reference(uobj)  # the rest holds a reference of its own
            self._q.appendleft((uobj, cut, end, stream))
            self._cv.notify()
            end = cut
        self._active += 1
        return uobj, start, end, stream

    def _serve(self) -> None:
        while True:
            with self._cv:
                work = self._take()
            if work is None:
                return
            uobj, start, end, stream = work
            try:
                if stream.window:
                    _ra_window_fill(uobj, start, end, stream.begun)
                elif not stream.stopped and not _ra_fill(uobj, start, end, RA_WINSIZE_MAX)[1]:
                    stream.stopped = True
            finally:
                if stream.begun is not None:
                    stream.begun.set()  # nothing to read, or done: no one waits for it
                uobj.pgops.pgo_detach(uobj)
                # else the idle wait keeps the VM alive, and so never finds it gone
                del uobj, work
                with self._cv:
                    self._active -= 1
                    self._cv.notify_all()


def uvm_ra_fill(uobj: UvmObject, start: int, end: int) -> int:
    """Read the missing pages of [start, end) of *uobj*, in runs of up to
    RA_WINSIZE_MAX, from free memory only; return how many were read.

    Stops at the first run that cannot be read: no memory free above
    vm.freemin, the end of the object, or an error (which the fault that
    needs the page will meet and report).  The pages read go to the
    inactive queue, unmapped and unreferenced.

    => caller holds a reference to *uobj* and no VM lock.
    """
    return _ra_fill(uobj, start, end, RA_WINSIZE_MAX)[0]


def _ra_window_fill(uobj: UvmObject, start: int, end: int, begun: threading.Event | None) -> None:
    """Read the missing pages of the asynchronous window [start, end) of
    *uobj* in one I/O, marked PG_READAHEAD, room made for them first as for
    the reader's own window (uvm_ra_reserve); counted in uvmexp.  *begun*
    is set once the read's pages are busy.
    => caller holds a reference to *uobj* and no VM lock."""
    vm = uobj.vm
    short = _ra_shortage(vm, -(-(end - start) // vm.page_size))
    if short > 0:
        uvmpd_reserve(vm, short)
    nread, whole = _ra_fill(uobj, start, end, end - start, PG_READAHEAD, begun)
    vm.uvmexp.ra_async_pages += nread
    if not whole:
        vm.uvmexp.ra_async_dropped += 1


def _ra_fill(uobj: UvmObject, start: int, end: int, runbytes: int, mark: int = 0,
             begun: threading.Event | None = None) -> tuple[int, bool]:
    """uvm_ra_fill in reads of up to *runbytes*, the pages read given the
    flags *mark*: (pages read, whether every missing page was read).
    *begun* is set under the object lock before the first read, which
    holds it until its pages are busy: whoever takes the lock next finds
    them so."""
    vm = uobj.vm
    ps = vm.page_size
    lock = uobj.vmobjlock
    maxwin = max(1, runbytes // ps)
    off, nread = vm.trunc_page(start), 0
    while off < end:
        lock.rw_enter(RW_WRITE)
        while off < end and uvm_pagelookup(uobj, off) is not None:
            off += ps
        if off >= end:
            lock.rw_exit()
            break
        n = min(maxwin, -(-(end - off) // ps))
        if begun is not None:
            begun.set()
        pps: list[PageSlot] = [None] * n
        result, _ = uobj.pgops.pgo_get(uobj, off, pps, n, 0, PROT_READ, MADV_WILLNEED, PGO_NOSLEEPALLOC)
        if result != VM_PAGER_OK:  # the object lock is released whatever the result
            return nread, False
        got = [pg for pg in pps if isinstance(pg, VmPage)]
        lock.rw_enter(RW_WRITE)
        for pg in got:
            pg.pg_flags |= mark
        with vm.pageqlock:
            for pg in got:
                uvm_pagedeactivate(pg)
        uvm_page_unbusy(got)
        lock.rw_exit()
        off += len(got) * ps
        nread += len(got)
    return nread, True
