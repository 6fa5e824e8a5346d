"""Read-ahead (as NetBSD's uvm_readahead.c, with Linux's on-demand sizing).

A :class:`UvmRactx` follows one stream of accesses: a map entry's faults,
or UBC's reads of one object.  A miss at the page where the stream left off
is sequential and doubles the window, from RA_WINSIZE_INIT up to
RA_WINSIZE_MAX; a miss anywhere else is random and resets it.  The window
is how many pages the pager reads at the miss, in one I/O (uvn_get fills
them from free memory only: see UVM_PGA_NORESERVE); the caller then sets
``ra_next`` past the pages the access made resident or mapped.
MADV_SEQUENTIAL always reads the largest window, MADV_RANDOM only the page
that missed.

MADV_WILLNEED hands a range to the VM's :class:`RaDaemon`, whose threads
read the missing pages of queued ranges in the background, a window each, from free
memory only and never sleeping for it; what it reads waits on the inactive
queue, unmapped: if nobody maps it, it goes before any page in active use.

=> a context is updated by concurrent faults on one entry (the map lock is
   shared) with no lock of its own: a race can only make the heuristic
   guess wrong, never touch a page.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vnpager.kern.lock import RW_WRITE, fork_gate
from vnpager.uvm.uvm_page import VmPage, uvm_page_unbusy, uvm_pagedeactivate, uvm_pagelookup
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


@dataclass(eq=False)
class UvmRactx:
    """The read-ahead state of one stream."""

    ra_next: int = -1  # object offset of the page a sequential stream touches next
    ra_winsize: int = 0  # pages of the window (0: not in a stream)


def uvm_ra_window(ra: UvmRactx, advice: int, off: int, page_size: int,
                  maxbytes: int = RA_WINSIZE_MAX) -> int:
    """How many pages to read for a miss at object offset *off*, the page
    that missed first, in a window of at most *maxbytes* (uvm_ra_max);
    records the miss in *ra*."""
    maxwin = max(1, maxbytes // page_size)
    if advice == MADV_RANDOM:
        return 1
    if advice == MADV_SEQUENTIAL:
        return maxwin
    if off == ra.ra_next:
        ra.ra_winsize = min(max(2 * ra.ra_winsize, RA_WINSIZE_INIT // page_size), maxwin)
    else:
        ra.ra_winsize = 0  # random: read what faulted, start again small
    return max(ra.ra_winsize, 1)


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
    short = vm.freemin + npages - len(vm.page_free)
    if short <= 0 or vm.pagedaemon is None:
        return
    lock.rw_exit()
    uvmpd_reserve(vm, short)
    lock.rw_enter(RW_WRITE)


@dataclass(eq=False)
class _RaStream:
    """One WILLNEED request, cut into windows that several threads read."""

    stopped: bool = False  # a window could not be read: the rest is dropped


class RaDaemon:
    """The WILLNEED reader of one VM: RA_THREADS threads, started on first use.

    A queued range is read a window (RA_WINSIZE_MAX) at a time: the thread
    that takes a range puts the rest back at the head of the queue before it
    reads, so the next thread reads the next window meanwhile, and a store
    whose reads are requests (objfs) has several in flight.  The first
    window that cannot be read (no free memory, an error) stops its range.
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

    def request(self, uobj: UvmObject, start: int, end: int) -> bool:
        """Queue [start, end) of *uobj* for reading; False if the queue is
        full or the daemon stopped (the advice is then ignored).

        => caller holds a reference to *uobj* (the map lock, for an entry's).
        """
        with self._cv:
            if self._stop or len(self._q) >= RA_QUEUE_MAX:
                return False
            uobj.pgops.pgo_reference(uobj)
            self._q.append((uobj, start, end, _RaStream()))
            while len(self._threads) < RA_THREADS:
                t = threading.Thread(target=self._run, name="readahead", daemon=True)
                self._threads.append(t)
                t.start()
            self._cv.notify()
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
        for uobj, _, _, _ in dropped:
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
        if cut < end and not stream.stopped:
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
                if not stream.stopped and not _ra_fill(uobj, start, end)[1]:
                    stream.stopped = True
            finally:
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
    return _ra_fill(uobj, start, end)[0]


def _ra_fill(uobj: UvmObject, start: int, end: int) -> tuple[int, bool]:
    """uvm_ra_fill: (pages read, whether every missing page was read)."""
    vm = uobj.vm
    ps = vm.page_size
    lock = uobj.vmobjlock
    maxwin = RA_WINSIZE_MAX // ps
    off, nread = vm.trunc_page(start), 0
    while off < end:
        lock.rw_enter(RW_WRITE)
        while off < end and uvm_pagelookup(uobj, off) is not None:
            off += ps
        if off >= end:
            lock.rw_exit()
            break
        n = min(maxwin, -(-(end - off) // ps))
        pps: list[PageSlot] = [None] * n
        result, _ = uobj.pgops.pgo_get(uobj, off, pps, n, 0, PROT_READ, MADV_WILLNEED, PGO_NOSLEEPALLOC)
        if result != VM_PAGER_OK:  # the object lock is released whatever the result
            return nread, False
        got = [pg for pg in pps if isinstance(pg, VmPage)]
        lock.rw_enter(RW_WRITE)
        with vm.pageqlock:
            for pg in got:
                uvm_pagedeactivate(pg)
        uvm_page_unbusy(got)
        lock.rw_exit()
        off += len(got) * ps
        nread += len(got)
    return nread, True
