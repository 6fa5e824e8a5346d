"""The uffd machine's MMU (its pmap.c): the pmap interface of
:mod:`vnpager.uvm.pmap`, as the host's MMU does it for a client process.

A :class:`Pmap` is one client's address space, bound (:meth:`Pmap.attach`)
to that client's userfaultfd and pidfd; the ioctls name the client's
addresses, issued from the server.  Its translations (``pm_pte``: va ->
(page, how it is mapped)) are what the server has mapped in the client's
page tables, kept so that the page's reverse map (``pg.pv``) can
write-protect or zap every mapping of a page:

* ``HW_READ``: mapped from a range the client cannot write (a read-only
  or private map: the kernel copies a private page on write itself);
* ``HW_PROTECTED``: a writable shared range, mapped write-protected
  (CONTINUE_MODE_WP, UFFDIO_WRITEPROTECT): the first store is a
  synchronous write-protect fault that the server serves as a write fault;
* ``HW_WRITE``: mapped writable, which only a write fault does, so that the
  page's PG_MOD is set whenever a client may store to it.

That invariant (a page is HW_WRITE somewhere => PG_MOD) is kept under
``vm.pmap_lock``: pmap_page_protect(PROT_READ) and pmap_clear_modify
write-protect every HW_WRITE mapping of the page before they return, and a
store from then on blocks in the server, on the busy page a write-back
holds, as the software MMU's store does.  So pmap_is_modified is exact.

A write-protect fault needs no trip through uvm_fault when the page is
idle: :func:`pmap_emulate_modify` sets PG_MOD and un-protects it, as the
pmaps of machines without a hardware modified bit emulate it; the client
space's reader calls it as soon as it reads the fault.  A page being
written back is busy, so a store to it still waits in uvm_fault.  A
sequential writer (stores to the pages just behind) gets the pages ahead
made writable and modified with the one it stores to, as many as it wrote
behind, up to WRITE_AHEAD (and so are those a write fault served by
uvm_fault entered after its page, in pmap_update): a fault every 64 pages
instead of every page, at the cost of writing back unchanged the pages of
that window it never stores to.

pmap_enter records the translation and queues it; :func:`pmap_update`
(uvm_fault calls it once at the end of a fault) maps what was queued, one
UFFDIO_CONTINUE per run of contiguous pages mapped the same way (this also
wakes the faulting threads), and un-protects pages found mapped already.
PG_REF is set when a page is mapped (the client's later accesses are not
seen); :func:`pmap_clear_reference` write-protects the page, forgets
the translation and zaps the client's PTE with process_madvise(MADV_PAGEOUT)
(and the server's own first, so that the page is mapped once: the kernel
skips shared pages), so that a re-reference faults (MINOR) and sets PG_REF.
The PAGEOUTs of a pmap are batched: one call for PAGEOUT_BATCH pages, or
for those cleared before its next fault, whichever comes first (until
then the client may touch the page unseen).
Where PAGEOUT is refused (no CAP_SYS_NICE, another client maps the page)
the reference goes unseen and the page may be evicted while in use: it is
faulted in again (an approximation, counted in ``pageouts_refused``).

Errors of the ioctls: while the client's address space is changing (its
fork, before the server read the event) they are retried; a client that
is gone (ESRCH) or a range it unmapped (ENOENT) makes them no-ops.  A
fork's child holds copies of the parent's PTEs, writable ones too, until
its space write-protects them: a write-protect of the parent waits for
that (see :func:`_protect`).  Loads and stores through a pmap (uvm_load:
pmap_access) are refused: the memory of this machine is its clients'.

Locks: ``vm.pmap_lock`` guards ``pm_pte``, ``pending``, ``updated``,
``zaps``, the statistics, every page's ``pv`` and ``attrs``, and is held
across the ioctls that act on them; ``reader_busy`` is written by the
client space's reader alone and read unlocked (one load).  Nothing here
imports ``uvm`` at run time.
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Callable
from dataclasses import dataclass
from mmap import PROT_READ, PROT_WRITE
from operator import attrgetter
from typing import TYPE_CHECKING, cast

from .frames import Frames, page_runs
from .remote import MADV_PAGEOUT, Process
from .userfaultfd import Uffd

if TYPE_CHECKING:
    from vnpager.uvm.uvm import VM
    from vnpager.uvm.uvm_object import UvmObject
    from vnpager.uvm.uvm_page import VmPage

__all__ = ["Frames"]  # the machine's frames, beside its pmap (vm.machine.Frames)

PROT_NONE = 0x0
PG_REF = 0x1
PG_MOD = 0x2

HW_READ = PROT_READ
HW_PROTECTED = PROT_READ | 0x100
HW_WRITE = PROT_READ | PROT_WRITE

# uvm_page's flags that make a page not idle (the pmap may not change it on its own)
PG_BUSY = 0x1
PG_RELEASED = 0x20

EMULATE_WAIT = 0.002  # seconds pmap_emulate_modify waits for vm.pmap_lock (then uvm_fault serves it)
PROTECT_AROUND = 15  # writable pages each side a write-protect takes along (a cluster's, MAXBSIZE)
WRITE_AHEAD = 64  # pages a sequential writer's store makes writable with it, at most (pmap_emulate_modify)
PAGEOUT_BATCH = 32  # cleared references PAGEOUT'd in one process_madvise (else at the next fault)
IOV_MAX = 1024  # ranges per process_madvise
EAGAIN_SLEEP = 0.0005  # the client's address space is changing: retry shortly
EAGAIN_TIMEOUT = 30.0  # ... for this long at most (a fork event is read at once by the space's reader)
GONE = (errno.ESRCH, errno.ENOENT)  # the client died, or unmapped the range


@dataclass
class PmapStatistics:
    """What one client's pmap did (bumped under ``vm.pmap_lock``)."""

    entered: int = 0  # pages entered (pmap_enter)
    mapped: int = 0  # pages mapped by CONTINUE
    continues: int = 0  # runs mapped (one UFFDIO_CONTINUE each, or more where some were mapped)
    protects: int = 0  # UFFDIO_WRITEPROTECT calls (protect or un-protect)
    pageouts: int = 0  # pages whose client PTE process_madvise(MADV_PAGEOUT) zapped (cleared references)
    pageouts_refused: int = 0  # ... that it could not (not permitted, or the client gone)
    emulated: int = 0  # pages made writable by pmap_emulate_modify or write-ahead (not for a write fault)


class Pmap:
    """The translations of one client's address space (see above).

    ``pm_rtlb``/``pm_wtlb`` are always empty (the MI code's loads look there
    first): accesses are the client's.
    """

    __slots__ = ("pending", "pm_mask", "pm_pte", "pm_rtlb", "pm_wtlb", "process", "reader_busy", "stats",
                 "uffd", "updated", "vm", "zaps")

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.pm_pte: dict[int, tuple[VmPage, int]] = {}
        self.pm_rtlb: dict[int, object] = {}
        self.pm_wtlb: dict[int, object] = {}
        self.pm_mask = ~(vm.page_size - 1)
        self.pending: dict[int, int] = {}  # va -> how it was mapped before this fault (0: not)
        self.updated: list[tuple[int, int]] = []  # the runs pmap_update acted on (the caller clears it)
        # (va, object, offset) of the pages whose references were cleared, to PAGEOUT (_pageout_flush)
        self.zaps: list[tuple[int, UvmObject, int]] = []
        self.uffd: Uffd | None = None
        self.process: Process | None = None
        self.reader_busy = False  # the client's events are being read and a fork's child protected
        self.stats = PmapStatistics()

    def attach(self, uffd: Uffd, process: Process | None) -> None:
        """Bind this pmap to the client's *uffd* (and pidfd, for PAGEOUT;
        None: references are cleared without it).  Both stay the caller's."""
        self.uffd = uffd
        self.process = process

    def detach(self) -> None:
        """The client is gone: forget every translation (its page tables
        went with it)."""
        with self.vm.pmap_lock:
            for va, (pg, _) in self.pm_pte.items():
                del _pv(pg)[(self, va)]
            self.pm_pte.clear()
            self.pending.clear()
            self.zaps.clear()
            self.uffd = None
            self.process = None


if TYPE_CHECKING:
    def _pv(pg: VmPage) -> dict[tuple[Pmap, int], None]:
        """*pg*'s reverse map, as this machine fills it (the MI type names
        the software machine's Pmap)."""
        return cast("dict[tuple[Pmap, int], None]", pg.pv)
else:
    _pv = attrgetter("pv")  # the same, without a Python call per use


def uffd_call(fn: Callable[[], object]) -> object:
    """*fn*, an ioctl on a client's uffd: retried while the client's address
    space is changing (EAGAIN), None if the client or the range is gone."""
    deadline = time.monotonic() + EAGAIN_TIMEOUT
    while True:
        try:
            return fn()
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(EAGAIN_SLEEP)
        except OSError as e:
            if e.errno in GONE:
                return None
            raise


def _protect(pmap: Pmap, start: int, length: int, protect: bool) -> None:
    """Write-protect (or un-protect and wake) [start, start+length) of the
    client.  => caller holds vm.pmap_lock.

    A protect must not return while a fork of the client is being read:
    the child's copies of our writable PTEs are not protected until its
    space protects them (ClientSpace's reader, at once), and the caller may
    be a write-back about to read the page.  A fork in progress makes the
    ioctl EAGAIN until its event is read, and the reader sets
    ``reader_busy`` before it reads and clears it once the child's maps are
    protected; so a protect that succeeded waits while the reader is busy."""
    uffd = pmap.uffd
    if uffd is not None:
        pmap.stats.protects += 1
        uffd_call(lambda: uffd.writeprotect(start, length, protect))
        if protect:
            _wait_reader(pmap)


def _wait_reader(pmap: Pmap) -> None:
    """Wait (bounded) while the client's events are being read (see _protect)."""
    deadline = time.monotonic() + EAGAIN_TIMEOUT
    while pmap.reader_busy and time.monotonic() < deadline:
        time.sleep(EAGAIN_SLEEP)


def _lower(pmap: Pmap, va: int, pg: VmPage) -> None:
    """A HW_WRITE mapping of *pg* becomes HW_PROTECTED, and so do the
    writable mappings around it of the pages that follow it in its object
    (PROTECT_AROUND each way at most), in the same ioctl: the pager's
    write-back protects a cluster's pages one by one, and they then find
    theirs done.  Protecting more than asked is always safe: the pages stay
    modified, and a store to one is a write-protect fault the reader
    serves at once.  => vm.pmap_lock."""
    ps = pg.vm.page_size
    pte = pmap.pm_pte
    lo = hi = va
    for step in (-ps, ps):
        for k in range(1, PROTECT_AROUND + 1):
            e = pte.get(va + k * step)
            if e is None or e[1] != HW_WRITE or e[0].uobject is not pg.uobject or \
                    e[0].offset != pg.offset + k * step:
                break
            lo, hi = min(lo, va + k * step), max(hi, va + k * step)
    _protect(pmap, lo, hi + ps - lo, True)
    for a in range(lo, hi + ps, ps):
        pte[a] = (pte[a][0], HW_PROTECTED)


def pmap_enter(pmap: Pmap, va: int, pg: VmPage, prot: int, access_type: int = PROT_NONE, *,
               replace: bool = True) -> bool:
    """Enter *pg* at *va* for pmap_update to map: writable only for a write
    (or a page modified already), write-protected if *prot* allows writes,
    else read-only.  Sets PG_REF (a mapped page counts as referenced) and,
    for a write, PG_MOD.  With ``replace=False`` an existing translation
    stays (False)."""
    with pg.vm.pmap_lock:
        return _enter(pmap, va, pg, prot, access_type, replace)


def _enter(pmap: Pmap, va: int, pg: VmPage, prot: int, access_type: int, replace: bool) -> bool:
    """pmap_enter.  => vm.pmap_lock."""
    old = pmap.pm_pte.get(va)
    if old is not None and not replace:
        return False
    if not prot & PROT_WRITE:
        hw = HW_READ
    elif access_type & PROT_WRITE or pg.attrs & PG_MOD:
        hw = HW_WRITE
    else:
        hw = HW_PROTECTED
    if old is not None and old[0] is not pg:
        del _pv(old[0])[(pmap, va)]
        old = None
    pmap.pending.setdefault(va, 0 if old is None else old[1])
    pmap.pm_pte[va] = (pg, hw)
    _pv(pg)[(pmap, va)] = None
    pg.attrs |= PG_REF | PG_MOD if access_type & PROT_WRITE else PG_REF
    pmap.stats.entered += 1
    return True


def pmap_update(pmap: Pmap) -> list[tuple[int, int]]:
    """Map what pmap_enter queued: one CONTINUE per run of contiguous pages
    mapped the same way, an un-protect (or protect) for pages already
    mapped otherwise.  Returns the runs [start, end) acted on (their
    faulting threads are woken); a queued address not among them needs no
    change, and a thread waiting there must be woken by the caller."""
    if not pmap.pending and not pmap.zaps:
        return []
    ps = pmap.vm.page_size
    runs: list[tuple[int, int]] = []
    with pmap.vm.pmap_lock:
        _pageout_flush(pmap)  # before we map anything again
        pending, pmap.pending = pmap.pending, {}
        if pmap.uffd is None:
            return []
        vas = sorted(pending)
        _enter_write_ahead(pmap, pending, vas)
        changed = []
        for va in vas:
            cur = pmap.pm_pte.get(va)  # as it is now: a protect may have come since the enter
            if cur is not None and cur[1] != pending[va]:
                changed.append((va, (pending[va] == 0, cur[1])))
        # The last run first: each CONTINUE wakes the threads waiting in its
        # run, and a thread woken at the first page of a fault (the faulting
        # one, for a write fault: mapped writable, apart from its read-ahead)
        # would otherwise touch the next before it is mapped: a fault more.
        for start, end, key in reversed(_runs(changed, ps)):
            if _map_run(pmap, start, end, key):
                runs.append((start, end))
    pmap.updated.extend(runs)
    return runs


def _runs(items: list[tuple[int, tuple[bool, int]]], ps: int) -> list[tuple[int, int, tuple[bool, int]]]:
    """The runs (start, end, key) of contiguous pages of the same key in
    *items*, (va, key) in address order."""
    runs: list[tuple[int, int, tuple[bool, int]]] = []
    for va, key in items:
        if runs and runs[-1][1] == va and runs[-1][2] == key:
            runs[-1] = (runs[-1][0], va + ps, key)
        else:
            runs.append((va, va + ps, key))
    return runs


def _map_run(pmap: Pmap, start: int, end: int, key: tuple[bool, int]) -> bool:
    """Map [start, end) as *key* says: (new, how); False if the client or
    the range is gone (nobody was woken).  => vm.pmap_lock."""
    new, hw = key
    uffd = pmap.uffd
    assert uffd is not None
    if not new:  # mapped already, now more or less writable
        _protect(pmap, start, end - start, hw != HW_WRITE)
        return True
    pmap.stats.continues += 1
    mapped = uffd_call(lambda: uffd.resolve(start, end - start, wp=hw == HW_PROTECTED))
    if not isinstance(mapped, int):
        return False
    pmap.stats.mapped += mapped // pmap.vm.page_size
    if hw == HW_WRITE and mapped < end - start:
        _protect(pmap, start, end - start, False)  # some were mapped protected already
    return True


def pmap_remove(pmap: Pmap, sva: int, eva: int) -> None:
    """Forget the translations of [sva, eva): the client unmapped the range
    (were it still mapped, its writable pages are write-protected first)."""
    with pmap.vm.pmap_lock:
        vas = [va for va in pmap.pm_pte if sva <= va < eva]
        if any(pmap.pm_pte[va][1] == HW_WRITE for va in vas):
            _protect(pmap, sva, eva - sva, True)
        for va in vas:
            pg, _ = pmap.pm_pte.pop(va)
            del _pv(pg)[(pmap, va)]
            pmap.pending.pop(va, None)


def pmap_forget(pmap: Pmap, va: int) -> None:
    """The client faulted at *va* (not a write-protect fault): whatever we
    mapped there left its page tables (a PAGEOUT, its own madvise), so the
    translation goes.  Another fault may have mapped it again meanwhile:
    a writable one is write-protected first, so that it is not lost.
    Looked up first without the lock (one load): only the caller, the
    worker serving the client's faults in order, enters translations
    (others only change or remove them), so one absent stays absent."""
    if va not in pmap.pm_pte:
        return  # the common case, a missing page: no lock taken
    with pmap.vm.pmap_lock:
        entry = pmap.pm_pte.pop(va, None)
        if entry is not None:
            if entry[1] == HW_WRITE:
                _protect(pmap, va, pmap.vm.page_size, True)
            del _pv(entry[0])[(pmap, va)]


def pmap_protect(pmap: Pmap, sva: int, eva: int, prot: int) -> None:
    """Lower the translations of [sva, eva) to *prot*."""
    if prot == PROT_NONE:
        pmap_remove(pmap, sva, eva)
        return
    if prot & PROT_WRITE:
        return
    with pmap.vm.pmap_lock:
        for va, (pg, _) in list(pmap.pm_pte.items()):
            if sva <= va < eva and pmap.pm_pte[va][1] == HW_WRITE:  # not lowered with a neighbour
                _lower(pmap, va, pg)


def pmap_page_protect(pg: VmPage, prot: int) -> None:
    """Lower every mapping of *pg*: write-protect the writable ones;
    PROT_NONE also forgets them (the client may still load the page until
    it leaves its object and is punched out)."""
    if not prot & PROT_WRITE:
        with pg.vm.pmap_lock:
            _page_protect(pg, prot)


def _page_protect(pg: VmPage, prot: int) -> None:
    """pmap_page_protect to a *prot* without PROT_WRITE.  => vm.pmap_lock."""
    for pmap, va in _pv(pg):
        if pmap.pm_pte[va][1] == HW_WRITE:
            _lower(pmap, va, pg)
    if prot == PROT_NONE:
        for pmap, va in _pv(pg):
            del pmap.pm_pte[va]
            pmap.pending.pop(va, None)
        pg.pv.clear()


def pmap_extract(pmap: Pmap, va: int) -> tuple[VmPage, int] | None:
    return pmap.pm_pte.get(va)


def pmap_clear_modify(pg: VmPage) -> bool:
    """Clear PG_MOD, write-protecting the page wherever it is writable."""
    with pg.vm.pmap_lock:
        return _clear_modify(pg)


def _clear_modify(pg: VmPage) -> bool:
    """pmap_clear_modify.  => vm.pmap_lock."""
    was = bool(pg.attrs & PG_MOD)
    pg.attrs &= ~PG_MOD
    for pmap, va in _pv(pg):
        if pmap.pm_pte[va][1] == HW_WRITE:
            _lower(pmap, va, pg)
    return was


def pmap_clear_reference(pg: VmPage) -> bool:
    """Clear PG_REF and unmap the page from the clients (see above), so
    that the next access faults and sets it again."""
    with pg.vm.pmap_lock:
        return _clear_reference(pg)


def _clear_reference(pg: VmPage) -> bool:
    """pmap_clear_reference.  => vm.pmap_lock."""
    was = bool(pg.attrs & PG_REF)
    pg.attrs &= ~PG_REF
    uobj = pg.uobject
    for pmap, va in _pv(pg):
        assert uobj is not None  # a mapped page is an object's
        if pmap.pm_pte[va][1] == HW_WRITE:
            _protect(pmap, va, pg.vm.page_size, True)  # a PTE PAGEOUT leaves must not take stores
        del pmap.pm_pte[va]
        pmap.pending.pop(va, None)
        pmap.zaps.append((va, uobj, pg.offset))
        if len(pmap.zaps) >= PAGEOUT_BATCH:
            _pageout_flush(pmap)
    pg.pv.clear()
    return was


def _pageout_flush(pmap: Pmap) -> None:
    """process_madvise(MADV_PAGEOUT) of the client's pages whose references
    were cleared since the last flush, in one call (its iovec has a range
    per run of them).  => vm.pmap_lock."""
    zaps, pmap.zaps = pmap.zaps, []
    if not zaps:
        return
    frames: Frames = pmap.vm.frames
    by_object: dict[UvmObject, list[int]] = {}
    for _, uobj, offset in zaps:
        by_object.setdefault(uobj, []).append(offset)
    for uobj, offsets in by_object.items():
        frames.zap(uobj, offsets)  # the server's own PTEs first: PAGEOUT skips a page mapped twice
    vas = sorted(va for va, _, _ in zaps)
    runs = [(start, end - start) for start, end in page_runs(vas, pmap.vm.page_size)]
    proc = pmap.process
    if proc is None:
        pmap.stats.pageouts_refused += len(vas)
        return
    try:
        for i in range(0, len(runs), IOV_MAX):
            _pageout(proc, runs[i : i + IOV_MAX])
    except OSError as e:
        if e.errno not in (*GONE, errno.EPERM, errno.EINVAL):
            raise
        if e.errno in (errno.EPERM, errno.EINVAL):
            pmap.process = None  # not allowed here: do without from now on
        pmap.stats.pageouts_refused += len(vas)
        return
    pmap.stats.pageouts += len(vas)


def _pageout(proc: Process, runs: list[tuple[int, int]]) -> None:
    """PAGEOUT of *runs*.  The client may have unmapped some since their
    references were cleared (ENOMEM for the whole call): then each run
    alone, skipping the gone ones -- PAGEOUT is advice, and its failure
    must never reach a fault as a read error."""
    try:
        proc.madvise(runs, MADV_PAGEOUT)
    except OSError as e:
        if e.errno != errno.ENOMEM:
            raise
        for run in runs:
            with contextlib.suppress(OSError):
                proc.madvise([run], MADV_PAGEOUT)


def pmap_emulate_modify(pmap: Pmap, va: int, end: int) -> bool:
    """A store at *va* found its page write-protected (a synchronous WP
    fault): set the modified bit as the pmap of a machine without one does
    (NetBSD alpha's pmap_emulate_reference), without uvm_fault, if it can
    be done at once: *va*'s translation is HW_PROTECTED and its page idle
    (a write-back holds it busy and write-protected, and the store must
    wait for it in uvm_fault), or HW_WRITE already.  PG_MOD and PG_REF are
    set, the page un-protected (which wakes the store), and so are the
    pages ahead of it for a sequential writer (:func:`_write_ahead`, up to
    *end*, the map's end).  True if served (or the client or the range is
    gone); False: uvm_fault must serve it.  Never sleeps, so that the
    client space's reader may call it: an ioctl refused while the client's
    address space changes (EAGAIN) is undone, not retried, and the lock is
    waited for EMULATE_WAIT at most (its holder may be retrying an ioctl
    until the reader reads a fork event).
    => caller holds no VM lock."""
    lock = pmap.vm.pmap_lock
    if not lock.acquire(timeout=EMULATE_WAIT):
        return False
    try:
        entry = pmap.pm_pte.get(va)
        if entry is None or va in pmap.pending:
            return False
        pg, hw = entry
        if hw == HW_PROTECTED and pg.pg_flags & (PG_BUSY | PG_RELEASED):
            return False
        if hw not in (HW_PROTECTED, HW_WRITE):
            return False
        return _unprotect(pmap, [va, *_write_ahead(pmap, va, end)])
    finally:
        lock.release()


def _write_ahead(pmap: Pmap, va: int, end: int, queued: dict[int, int] | None = None) -> list[int]:
    """The pages after *va* (below *end*) to make writable with it: as many
    as there are writable pages just behind it, up to WRITE_AHEAD pages --
    so a sequential writer's window doubles with each of its faults --
    stopping at the first that is not an idle write-protected translation,
    mapped already (or, with *queued*, entered by this fault and queued
    there).  They are taken as modified though not written yet: a
    sequential writer's next stores are there, and a page taken so
    needlessly is only written back unchanged.  => vm.pmap_lock."""
    ps = pmap.vm.page_size
    pte = pmap.pm_pte
    behind = 0
    while behind < WRITE_AHEAD and (e := pte.get(va - (behind + 1) * ps)) is not None and e[1] == HW_WRITE:
        behind += 1
    ahead: list[int] = []
    for a in range(va + ps, min(end, va + (behind + 1) * ps), ps):
        e = pte.get(a)
        if (e is None or e[1] != HW_PROTECTED or e[0].pg_flags & (PG_BUSY | PG_RELEASED)
                or (a in pmap.pending if queued is None else a not in queued)):
            break
        ahead.append(a)
    return ahead


def _enter_write_ahead(pmap: Pmap, pending: dict[int, int], vas: list[int]) -> None:
    """A write fault's page is entered writable: so are the pages this fault
    entered after it, for a sequential writer (_write_ahead), so that one
    CONTINUE maps them all writable.  *vas*: the addresses of *pending* in
    order.  => vm.pmap_lock."""
    pte = pmap.pm_pte
    i = 0
    while i < len(vas):
        va = vas[i]
        i += 1
        e = pte.get(va)
        if e is not None and e[1] == HW_WRITE and pending[va] != HW_WRITE:
            ahead = _write_ahead(pmap, va, vas[-1] + 1, pending)
            for a in ahead:
                pg = pte[a][0]
                pte[a] = (pg, HW_WRITE)
                pg.attrs |= PG_MOD
            pmap.stats.emulated += len(ahead)
            i += len(ahead)  # queued, contiguous: the next addresses of vas, writable now


def _unprotect(pmap: Pmap, vas: list[int]) -> bool:
    """Make the translations at *vas* (contiguous) writable and their pages
    modified and referenced, then un-protect them in the client (waking
    its stores there), in one ioctl not retried.  Refused (EAGAIN: the
    client's address space is changing), it is undone: False.  The state
    changes first, so that if the ioctl fails part way the translations
    say writable (modified: the invariant holds) where the client's pages
    may be.  => vm.pmap_lock; each of *vas* is HW_PROTECTED or HW_WRITE."""
    uffd = pmap.uffd
    if uffd is None:
        return True
    ps = pmap.vm.page_size
    old = [(va, pmap.pm_pte[va]) for va in vas]
    attrs = [pg.attrs for _, (pg, _) in old]
    for va, (pg, _) in old:
        pmap.pm_pte[va] = (pg, HW_WRITE)
        pg.attrs |= PG_REF | PG_MOD
    pmap.stats.protects += 1
    pmap.stats.emulated += len(vas)  # before the ioctl wakes the client: it may look at once
    try:
        uffd.writeprotect(vas[0], len(vas) * ps, False)
    except BlockingIOError:
        for (va, entry), a in zip(old, attrs, strict=True):
            pmap.pm_pte[va] = entry
            entry[0].attrs = a
        pmap.stats.emulated -= len(vas)
        return False
    except OSError as e:
        if e.errno not in GONE:
            raise
    return True


def pmap_access(pmap: Pmap, va: int, end: int, access_type: int) -> None:
    """Refused: a load or store through the server's pmap of a client."""
    raise OSError(errno.EFAULT, f"{va:#x}: the uffd machine's memory is accessed by its clients, "
                                "not through the server (uvm_load/uvm_store)")


def pmap_tlb_merge(pmap: Pmap, runs: list[object], access_type: int, touched: int) -> None:
    """Nothing to merge: this machine's TLBs are the host's."""


# The run forms (see uvm/pmap.py): each page in turn, as the per-page call
# does it, under one hold of the lock.

def pmap_enter_run(pmap: Pmap, va: int, pgs: list[VmPage], prot: int, access_type: int = PROT_NONE, *,
                   replace: bool = True) -> int:
    ps = pmap.vm.page_size
    with pmap.vm.pmap_lock:
        return sum(_enter(pmap, va + i * ps, pg, prot, access_type, replace) for i, pg in enumerate(pgs))


def pmap_page_protect_run(pgs: list[VmPage], prot: int) -> None:
    if pgs and not prot & PROT_WRITE:
        with pgs[0].vm.pmap_lock:
            for pg in pgs:
                _page_protect(pg, prot)


def pmap_clear_modify_run(pgs: list[VmPage]) -> list[bool]:
    """Pages busy and mapped nowhere (those uvn_get just read) are cleared
    without vm.pmap_lock: only a busy page's owner sets its bits (it maps
    it), so a clear racing this one can only leave a bit set, never lose
    one set."""
    if not pgs:
        return []
    if all(not pg.pv and pg.pg_flags & PG_BUSY for pg in pgs):
        were = [bool(pg.attrs & PG_MOD) for pg in pgs]
        for pg in pgs:
            pg.attrs &= ~PG_MOD
        return were
    with pgs[0].vm.pmap_lock:
        return [_clear_modify(pg) for pg in pgs]


def pmap_clear_reference_run(pgs: list[VmPage]) -> list[bool]:
    if not pgs:
        return []
    with pgs[0].vm.pmap_lock:
        return [_clear_reference(pg) for pg in pgs]
