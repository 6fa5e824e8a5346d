"""One virtual machine: what the kernel keeps global (uvm.h, uvmexp.h).

A :class:`VM` owns its physical memory, page queues, writeable-object list,
sync lock, pager map and vnode state, so several VMs live in one process
without sharing anything but the scheduler.

The locks, and the order in which they are taken (written once, here; each
field says which of them guards it, at its class):

0. the fork gate (``kern.lock.fork_gate``), held shared by every VM entry
   point (``@gated``) and by the holder of any kern lock, and taken
   exclusively by os.fork()'s hooks: before every lock below.
1. ``vm.uvn_sync_lock`` (rwlock): one uvm_vnp_sync at a time; taken before
   any object lock.  A vnode object's size lock (``u_sizelock``: size
   changes, uvm_bio) is at the same level: before the vnode lock and the
   object lock, never under them.
2. the vnode lock (``vp.v_lock``, vn_lock): before the object lock, never
   under it.  uvn_io drops the object lock before it locks the vnode;
   terminate and uncache are called with the vnode locked and then take the
   object lock.
3. the object lock (``uobj.vmobjlock``, rwlock): one object's pages, its
   flags and counters.  Never two at once but for a fault's copy-on-write,
   which takes the amap's object lock under the file's.  The page daemon
   only tries object locks (RW_NOSLEEP), as it takes them in page order.
4. ``vm.pageqlock`` (mutex): the page queues (``page_free``,
   ``page_active``, ``page_inactive``, an object's ``uo_active``), the PQ_*
   bits of ``pg_flags`` and ``vm.ra_wanted``; under the object lock, never
   the other way round.
5. ``vm.pmap_lock``: every pmap, a page's ``pv`` and ref/mod attributes,
   and a copy through a translation; under the object lock or the page
   queue lock, and nothing is taken under it.

Leaves, under which nothing else is taken: ``vm.uvn_wlist_lock`` (the
writeable list; taken under the object lock), the pager map's lock (taken
under the object lock for a non-waiting mapin, alone for a waiting one),
the aio daemon's condition and the wait channels' own locks.  The kernel
lock (``kernel_lock``, a big lock that sleeping on another lock drops) is
held around vnode I/O and by uvm_vnp_setsize's caller, above the object
lock.

Where the code leans on the GIL: a single attribute read or store is
atomic, and some fields are read unlocked for a check that is repeated
under the lock (the page daemon's ``pg.uobject``, a flag test before
locking).  A read-modify-write such as ``pg.pg_flags |= PG_BUSY`` is NOT
atomic: its writers must share a lock, and every writer of ``pg_flags``
holds the page's object lock (the page daemon tries it before it moves a
page between queues), or owns a free page under the page queue lock.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import warnings
import weakref
from dataclasses import asdict, dataclass
from typing import Annotated, Self

from vnpager.kern.debug import panic
from vnpager.kern.lock import Mutex, RWLock, fork_gate, gated, locks_after_fork_child
from vnpager.kern.synch import (
    WaitChannel,
    synch_fork_child,
    synch_fork_parent,
    synch_fork_prepare,
    tsleep,
)
from vnpager.uvm.pmap import machine_module, pmap_clear_modify, pmap_is_modified
from vnpager.uvm.uvm_map import Vmspace
from vnpager.uvm.uvm_page import PG_BUSY, PG_CLEAN, PG_TABLED, PQ_ACTIVE, PQ_FREE, PQ_INACTIVE, VmPage
from vnpager.uvm.uvm_pager import AioDaemon, PagerMap
from vnpager.uvm.uvm_param import MAXBSIZE, PAGE_SIZE, parse_size, round_page, trunc_page
from vnpager.uvm.uvm_pdaemon import PageDaemon
from vnpager.uvm.uvm_readahead import RaDaemon
from vnpager.uvm.uvm_vnode import (
    UVM_VNODE_VALID,
    UvmVnode,
    uvm_vnodeops,
    uvm_vnp_sync,
    uvm_vnp_terminate,
)
from vnpager.vfs.hostfs import HostFS
from vnpager.vfs.memfs import MemFS
from vnpager.vfs.mount import Mount, Vfs
from vnpager.vfs.specfs import SpecFS
from vnpager.vfs.swapfs import SwapFS, swapfs_fork_child, swapfs_fork_parent, swapfs_fork_prepare
from vnpager.vfs.vnode import Vnode

log = logging.getLogger("vnpager.uvm")

DEFAULT_PHYSMEM = 256 << 20  # of a VM made without physmem, unless VNPAGER_PHYSMEM says otherwise
FORK_QUIET_TIMEOUT = 60.0  # seconds fork waits for the VM calls under way to finish


def physmem_bytes(physmem: int | str | None) -> int:
    """The bytes a VM is asked for: *physmem* as given (an int, or a size
    string such as "4M"), else ``VNPAGER_PHYSMEM``, else DEFAULT_PHYSMEM."""
    if physmem is None:
        env = os.environ.get("VNPAGER_PHYSMEM")
        if not env:
            return DEFAULT_PHYSMEM
        try:
            return parse_size(env)
        except ValueError as e:
            raise ValueError(f"VNPAGER_PHYSMEM: {e}") from None
    return parse_size(physmem) if isinstance(physmem, str) else physmem


@dataclass
class Uvmexp:
    """Counters (``struct uvmexp``), each with its meaning: ``vnpager demo``
    prints them (``Annotated`` keeps the text where the CLI can read it).
    Bumped without a lock: two threads bumping one field at once may lose
    a count (``+=`` is a load and a store, even under the GIL), which
    statistics can afford and no invariant relies on."""

    faults: Annotated[int, "page faults taken (uvm_fault calls that found no usable mapping)"] = 0
    faultahead: Annotated[int, "resident neighbours mapped by fault-ahead, saving a fault each"] = 0
    pageins: Annotated[int, "pages read from the backend (uvn_io reads, failed ones included)"] = 0
    pageouts: Annotated[int, "pages written to the backend (uvn_io writes, failed ones included)"] = 0
    read_ios: Annotated[int, "read calls to the backend (one per cluster)"] = 0
    write_ios: Annotated[int, "write calls to the backend (one per cluster, async ones included)"] = 0
    allocfail: Annotated[int, "page allocations that found no free frame"] = 0
    waits: Annotated[int, "sleeps in uvm_wait for free memory"] = 0
    frees: Annotated[int, "pages returned to the free list"] = 0
    write_errors: Annotated[int, "failed write-backs: errors recorded on an object (pages kept dirty)"] = 0
    lostpages: Annotated[int, "dirty pages given up by terminate after a write error (vnode recycled)"] = 0
    pdwoke: Annotated[int, "page daemon wakeups that scanned"] = 0
    pdfreed: Annotated[int, "pages freed by the page daemon"] = 0
    pdpageouts: Annotated[int, "pageouts started by the page daemon (clusters)"] = 0


@dataclass
class VmStats(Uvmexp):
    """``vm.stats()``: a copy of the counters and the state of memory, in
    pages, taken without stopping the machine (the numbers need not add up
    exactly while it runs)."""

    frames_resident: Annotated[int, "pages the machine's frames hold (uffd: resident in all the memfds)"] = 0
    resident: Annotated[int, "pages holding data now (all but the free ones)"] = 0
    free: Annotated[int, "free page frames"] = 0
    active: Annotated[int, "pages on the active queue"] = 0
    inactive: Annotated[int, "pages on the inactive queue"] = 0
    persisting: Annotated[int, "objects without references kept with their pages for the next attach"] = 0

    def __getitem__(self, name: str) -> int:
        """``stats["faults"]``, as when stats() returned a dict."""
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        value: int = getattr(self, name)
        return value


class VM:
    """A machine with *physmem* bytes of page frames of *page_size* bytes
    (*physmem* as :func:`physmem_bytes` reads it: bytes, "4M", or None).

    Anonymous memory pages out to files in *swapdir* (``VNPAGER_SWAPDIR``,
    else the system's temporary directory; see ``vfs/swapfs.py``).  After a
    fork, the child has a VM of its own (see :func:`_fork_prepare`).

    *machine* is the MMU and frames under the MI code (``vm.machine``, see
    ``uvm/pmap.py``): "soft", the software MMU, or "uffd", the host's MMU
    for the client processes of a pager server (``vnpager.server``; Linux
    userfaultfd, page_size must be the host's; not usable across a fork).
    """

    @gated  # a VM half made when fork comes would have no daemons in the child
    def __init__(self, physmem: int | str | None = None, page_size: int = PAGE_SIZE, *,
                 desiredvnodes: int = 4096, pager_map_slots: int = 16,
                 pagedaemon: bool = True, async_pageout: bool = True,
                 swapdir: str | None = None, machine: str = "soft") -> None:
        if page_size < 512 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 512, not {page_size}")
        if MAXBSIZE % page_size:
            raise ValueError(f"page_size must divide MAXBSIZE ({MAXBSIZE})")
        physmem = physmem_bytes(physmem)
        npages = physmem // page_size
        if npages < MAXBSIZE // page_size:
            raise ValueError(f"physmem of {physmem} bytes cannot hold one cluster "
                             f"({MAXBSIZE} bytes)")
        self.page_size = page_size
        self.npages = npages
        self.physmem = npages * page_size
        self.zero_page = bytes(page_size)
        self.machine = machine_module(machine)
        self.frames = self.machine.Frames(npages, page_size)  # soft: private, a forked child's are its own
        self.pages = [VmPage(self, i, self.frames.frame(i)) for i in range(npages)]
        self.page_free: list[VmPage] = self.pages[::-1]  # pop() takes frame 0 first
        self.page_active: dict[VmPage, None] = {}
        self.page_inactive: dict[VmPage, None] = {}
        self.pageqlock = Mutex("pageq")
        self.pmap_lock = threading.Lock()
        self.free_chan = WaitChannel("free")
        self.pagedaemon_chan = WaitChannel("pagedaemon")
        self.freemin = max(2, npages // 32)
        self.ra_wanted = 0  # pages read-ahead asks the page daemon to free (uvm_pagewant_ra)
        self.uvmexp = Uvmexp()
        # the vnode pager's globals
        self.uvn_wlist: dict[UvmVnode, None] = {}
        self.uvn_wlist_lock = Mutex("uvn_wlist")
        self.uvn_sync_lock = RWLock("uvnsync")
        self.pager_map = PagerMap(pager_map_slots)
        self.aiodaemon = AioDaemon() if async_pageout else None
        uvm_vnodeops.pgo_init(self)
        # the filesystems
        self.vfs = Vfs(desiredvnodes, self._vnode_init, uvm_vnp_terminate,
                       lambda mp: uvm_vnp_sync(self, mp))
        self.hostfs: Mount = self.vfs.mount(HostFS(), "host")
        self.memfs: Mount = self.vfs.mount(MemFS(), "memfs")
        self.specfs: Mount = self.vfs.mount(SpecFS(), "specfs")
        swapdir = swapdir or os.environ.get("VNPAGER_SWAPDIR") or tempfile.gettempdir()
        self.swapfs: Mount = self.vfs.mount(SwapFS(swapdir), "swap")  # anonymous memory's
        self._vmspace: Vmspace | None = None
        self.pagedaemon = PageDaemon(self) if pagedaemon else None
        self.readahead = RaDaemon(self)  # MADV_WILLNEED's reader; a thread once used
        self.closed = False
        with _vms_lock:
            _vms.add(self)

    @property
    def vmspace(self) -> Vmspace:
        """The address space of this machine's one process (made on demand)."""
        if self._vmspace is None:
            self._vmspace = Vmspace(self)
        return self._vmspace

    @gated
    def close(self) -> None:
        """Write back every dirty page, then stop the page daemon, and
        commit what the filesystems that commit staged (objfs publishes it;
        a failure is logged: nobody is left to tell).

        Mappings still open keep working; only the daemon stops, so memory
        pressure then waits for pages freed by their users.
        """
        if self.closed:
            return
        self.closed = True
        self.readahead.stop()
        uvm_vnp_sync(self)
        if self.pagedaemon is not None:
            self.pagedaemon.stop()
        if self.aiodaemon is not None:
            self.aiodaemon.drain()
        for vp, err in self.vfs.commit_all():
            log.warning("%r: not committed at close: %s", vp, os.strerror(err))

    def quiesce(self, timeout: float = 10.0) -> None:
        """Wait until the page daemon has nothing to do (not scanning, memory
        not low, no pages asked for by read-ahead) and no asynchronous write
        is in flight, so that counters read next change only by what
        the caller does (the demo and benchmarks measure steps this way).
        Raises TimeoutError if the VM stays busy for *timeout* seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self.aiodaemon is not None:
                self.aiodaemon.drain()
            with self.pageqlock:
                daemon_busy = self.pagedaemon is not None and (
                    self.pagedaemon.scanning or self.npages_free_low() or self.ra_wanted > 0)
            if not daemon_busy and (self.aiodaemon is None or not self.aiodaemon.pending):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("the VM did not become quiet")
            tsleep(self.free_chan, "quiesce", 0.001)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # fork (see _fork_prepare)

    def _fork_quiesce(self) -> None:
        """Park the daemons, write the dirty file pages back and copy the
        swap files for the child.  => fork_gate is closed: no VM call runs."""
        if self.pagedaemon is not None:
            self.pagedaemon.park()
        self.readahead.drain()
        if self.aiodaemon is not None:
            self.aiodaemon.wait_idle()
        for mp in list(self.vfs.mountlist):
            if mp is not self.swapfs:  # anonymous memory is each process's own
                uvm_vnp_sync(self, mp)
        # objfs: publish, so that parent and child start from one version
        # (else the child could publish the parent's writes under it)
        for vp, err in self.vfs.commit_all():
            log.warning("%r: not committed before fork: %s", vp, os.strerror(err))
        swapfs_fork_prepare(self.swapfs)

    def _fork_parent(self) -> None:
        swapfs_fork_parent(self.swapfs)
        if self.pagedaemon is not None:
            self.pagedaemon.unpark()

    def _fork_child(self) -> None:
        """The child's VM: its own swap, clean file pages, daemons of its own."""
        swapfs_fork_child(self.swapfs)
        for pg in self.pages:
            uobj = pg.uobject
            if (uobj is not None and (not pg.pg_flags & PG_CLEAN or pmap_is_modified(pg))
                    and uobj.u_vnode.v_mount is not self.swapfs):  # type: ignore[attr-defined]
                # a file page still dirty after the sync: its write-back
                # failed, and the parent keeps it to retry; were we to write
                # it too, we might put it over what the parent writes later
                pg.pg_flags |= PG_CLEAN
                pmap_clear_modify(pg)
        if self.aiodaemon is not None:
            self.aiodaemon.after_fork_child()
        self.readahead.after_fork_child()
        if self.pagedaemon is not None:
            self.pagedaemon.after_fork_child()

    def _vnode_init(self, vp: Vnode) -> None:
        if vp.v_uvm is None:
            vp.v_uvm = UvmVnode(self, vp)

    def round_page(self, x: int) -> int:
        return round_page(x, self.page_size)

    def trunc_page(self, x: int) -> int:
        return trunc_page(x, self.page_size)

    def npages_free_low(self) -> bool:
        return len(self.page_free) < self.freemin

    def counters(self) -> dict[str, int]:
        return asdict(self.uvmexp)

    def stats(self) -> VmStats:
        """The counters of ``uvmexp`` and the state of memory (see VmStats)."""
        with self.vfs.lock:
            vnodes = [vp for mp in self.vfs.mountlist for vp in mp.mnt_vnodes.values()]
        persisting = sum(1 for vp in vnodes
                         if isinstance(vp.v_uvm, UvmVnode) and vp.v_uvm.u_flags & UVM_VNODE_VALID
                         and vp.v_uvm.uo_refs == 0)
        free = len(self.page_free)
        return VmStats(**self.counters(), resident=self.npages - free, free=free,
                       active=len(self.page_active), inactive=len(self.page_inactive),
                       persisting=persisting, frames_resident=self.frames.resident(free))

    def check_invariants(self) -> None:
        """Panic unless the page accounting of this VM is consistent.

        => no thread may be changing pages: call it on a quiet VM.  The
           read-ahead daemon is drained first.
        """
        self.readahead.drain()
        with self.pageqlock:
            free = set(map(id, self.page_free))
            for pg in self.pages:
                q = pg.pg_flags & (PQ_FREE | PQ_ACTIVE | PQ_INACTIVE)
                if (id(pg) in free) != (q == PQ_FREE):
                    panic(f"page {pg!r}: free list and PQ_FREE disagree")
                if q not in (0, PQ_FREE, PQ_ACTIVE, PQ_INACTIVE):
                    panic(f"page {pg!r}: on several queues")
                if (pg in self.page_active) != (q == PQ_ACTIVE):
                    panic(f"page {pg!r}: active queue and PQ_ACTIVE disagree")
                if (pg in self.page_inactive) != (q == PQ_INACTIVE):
                    panic(f"page {pg!r}: inactive queue and PQ_INACTIVE disagree")
                tabled = bool(pg.pg_flags & PG_TABLED)
                if tabled != (pg.uobject is not None):
                    panic(f"page {pg!r}: PG_TABLED and uobject disagree")
                if tabled:
                    assert pg.uobject is not None
                    if pg.uobject.memt.get(pg.offset) is not pg:
                        panic(f"page {pg!r}: not in its object's tree")
                    if (pg in pg.uobject.uo_active) != (q == PQ_ACTIVE):
                        panic(f"page {pg!r}: its object's uo_active and PQ_ACTIVE disagree")
                if q == PQ_FREE and (tabled or pg.pv or pg.pg_flags & PG_BUSY):
                    panic(f"page {pg!r}: free but in use")
            problem = self.frames.check(self.pages)
            if problem:
                panic(f"frames: {problem}")


# ---------------------------------------------------------------- fork
#
# Fork is a sync point.  Before it, the process is made quiet (fork_gate:
# every VM call under way finishes, new ones wait; then each VM's daemons
# park and its asynchronous writes drain), every VM writes its dirty file
# pages back and copies its swap files, and the locks that a warm store or
# the sleep queue take without the gate are held across the fork.  After
# it, each process has a VM of its own: its own frames (the software
# machine's arena is private memory, copied on write), its own swap,
# and, in the child, its own daemon threads and new locks.  Neither inherits a dirty file page,
# so each writes back only what it dirtied itself, and never a stale copy
# of a page the other wrote.

_vms: weakref.WeakSet[VM] = weakref.WeakSet()  # every live VM (=> _vms_lock)
_vms_lock = threading.Lock()
_forking: list[VM] = []  # the VMs a fork under way prepared, until its after hooks


def _fork_prepare() -> None:
    quiet = fork_gate.close(FORK_QUIET_TIMEOUT)
    with _vms_lock:
        _forking[:] = list(_vms)
    if quiet:
        for vm in _forking:
            vm._fork_quiesce()
    else:  # a thread inside may hold what quiescing needs: do without
        warnings.warn("fork: the VM could not be made quiet (a fork from inside a VM call, or a "
                      "call that did not finish); the child's VM may hang, and its swap is lost",
                      RuntimeWarning, stacklevel=2)
    for vm in _forking:
        vm.pmap_lock.acquire()  # a warm store takes only this
    synch_fork_prepare()


def _fork_parent() -> None:
    synch_fork_parent()
    for vm in _forking:
        vm.pmap_lock.release()
        vm._fork_parent()
    _forking.clear()
    fork_gate.open()


def _fork_child() -> None:
    global _vms_lock
    synch_fork_child()
    locks_after_fork_child()
    fork_gate.after_fork_child()
    _vms_lock = threading.Lock()
    for vm in _forking:
        vm.pmap_lock.release()
        vm._fork_child()
    _forking.clear()


os.register_at_fork(before=_fork_prepare, after_in_parent=_fork_parent, after_in_child=_fork_child)
