"""The vnode pager (uvm_vnode.c): pages of files.

Every function of the seed is here under its own name, in the seed's order,
with the seed's flags and return codes; read the two side by side.  A
:class:`UvmVnode` is the VM object of one vnode (``vp.v_uvm``).  Its life:

    attach -> VALID (refs > 0) -> detach to 0 refs -> persisting (VALID,
    refs == 0, CANPERSIST, pages kept) -> attach finds the pages again
                                       -> terminate (recycling) frees them
    a vnode without CANPERSIST (uncached) dies on its last detach instead.

Where we differ from the seed, on purpose (the README keeps the same list):

Errors
* a page whose write-back fails is never freed or marked clean: it stays
  dirty and resident, and the errno is kept on the object (``u_error``,
  counted by ``u_errseq``) until the front ends report it, once to each
  mapping (``uvn_errseq_sample``/``uvn_errseq_check``, as Linux's errseq).
  An object whose last detach cannot write its pages persists (with its
  error) rather than dying; only terminate, which must make the vnode
  reusable, gives such pages up, and counts them in ``uvmexp.lostpages``.
* uvn_flush returns False whenever a write it waited for failed (the seed:
  only when it freed the page anyway); a write it only started reports its
  failure through errseq.  A failed cluster is not written again by the
  same flush: uvm_pager_put returns the dropped cluster, not its centre
  alone, so one failure costs one write and one errseq step (the seed
  wrote each later page again as the centre of a new cluster).
* a write that returns 0 with bytes left unwritten is EIO (the seed marked
  the pages clean).
* the errno of a failed pager call is left in ``curproc().p_errno`` (the
  seed has no way to report it); uvn_attach, uvn_get and uvn_put clear it
  on entry, so a failure's reader sees that call's errno, or 0.
* uvn_io panics if *npages* is not ``len(pps)``: a short read zero-fills
  every frame it was given.
* uvm_vnp_sync takes an object off the writeable list only if its flush
  wrote everything (the seed: whatever the outcome, so a failed object was
  never synced again); it flushes with PGO_SYNCIO, so a returned sync has
  written.

Cost
* flush, sync and the CLEANCHK pass visit the resident pages of the range in
  offset order, so their cost follows the pages resident, not the range.
* the last detach of a persisting object deactivates its active pages
  (``uo_active``), not every resident page with a PGO_DEACTIVATE flush: the
  others are inactive already and, the last map entry gone, unmapped, so
  the seed's flush changed nothing for them, and a ``vm.pread`` (attach,
  copy, detach) cost in proportion to the pages cached.
* uvn_get reads a run of missing pages in one read, not page by page, and
  fills the caller's read-ahead slots from free memory only; the run is
  allocated in one call (uvm_pagealloc_run) and a flush that only
  deactivates takes its range as one run (one pmap call, one hold of the
  page queue lock), as the page daemon and the last detach do.

Life and locks
* the legal ``u_flags`` states and moves are data (UVN_STATES,
  UVN_TRANSITIONS), and every change goes through uvn_set_flags, which
  checks it under VNPAGER_DEBUG.
* every flag change happens under the object lock: the seed leans on the
  kernel lock for uvn_attach and the writeable list, which we lock instead.
* IOSYNC is cleared after detach and terminate wait for I/O: the seed
  leaves it set on an object that outlives a forced unmount.
* a last detach whose flush slept while terminate took the object over
  leaves it to terminate (the seed sets RELKILL over terminate's state, or
  on the dead object), and drops its vnode reference either way (the seed
  leaks it when terminate took over).
* terminate's flush is synchronous (PGO_SYNCIO): it waits for the writes
  anyway, and a fault meanwhile then fails at once rather than behind
  IOSYNC.
* while terminate runs (VNISLOCKED), I/O from any thread but terminate's
  fails with EIO at once (the seed lets it skip the vnode lock and race
  the reclaim; locking it would wait on terminate, which waits for it).
* uvn_get drops the object lock while it waits for memory, so that the page
  daemon can clean this object's own pages.
* a PGO_CLEANIT|PGO_SYNCIO flush waits for every page it found busy, not
  only for the object's I/O, and after any wait for a page looks at that
  offset again, not at the page's (which may have been reused).
* shrinking a file keeps the bytes before the new end in its last, partial
  page and zeroes the rest of that page (the seed frees the whole page).

Object stores (issue 12)
* a filesystem whose ops say ``unlocked_read`` (objfs: its reads are
  network requests) is read through VOP_STRATEGY without the vnode lock, so
  that several reads of one vnode are in flight; the pages are busy, so
  terminate still waits for them.

Pageout without PGO_SYNCIO is asynchronous, as the seed's long comment
above uvn_flush designs it: uvn_io starts the write on the VM's aio daemon
and returns VM_PAGER_PEND, and :func:`uvn_aiodone` finishes the pages.
Such writes go through VOP_STRATEGY, without the vnode lock, as buffer
writes do.  uvm_vnp_sync asks for PGO_SYNCIO, so a returned sync means the
data reached the filesystem.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from sortedcontainers import SortedList

from vnpager.kern.debug import DEBUG, KASSERT, Panic, panic
from vnpager.kern.lock import (
    LK_EXCLUSIVE,
    LK_NOWAIT,
    LK_RECURSEFAIL,
    LK_RETRY,
    RW_WRITE,
    Mutex,
    gated,
    kernel_lock,
)
from vnpager.kern.proc import curproc
from vnpager.kern.synch import rwsleep, wakeup
from vnpager.kern.trace import traced
from vnpager.uvm.pmap import (
    PG_MOD,
    pmap_clear_modify,
    pmap_clear_modify_run,
    pmap_is_modified,
    pmap_page_protect,
    pmap_page_protect_run,
)
from vnpager.uvm.uvm_object import UvmObject
from vnpager.uvm.uvm_page import (
    PG_BUSY,
    PG_CLEAN,
    PG_CLEANCHK,
    PG_FAKE,
    PG_RELEASED,
    PQ_ACTIVE,
    UVM_PAGE_OWN,
    UVM_PGA_NORESERVE,
    VmPage,
    uvm_pagealloc,
    uvm_pagealloc_run,
    uvm_pageclean,
    uvm_pagedeactivate,
    uvm_pagedeactivate_run,
    uvm_pagefree,
    uvm_pagefree_run,
    uvm_pagelookup,
    uvm_pagewait,
    uvm_pagewant_ra,
    uvm_pglistfree,
    uvm_wait,
)
from vnpager.uvm.uvm_pager import (
    PGO_ALLPAGES,
    PGO_CLEANIT,
    PGO_DEACTIVATE,
    PGO_DOACTCLUST,
    PGO_DONTCARE,
    PGO_FREE,
    PGO_LOCKED,
    PGO_NOSLEEPALLOC,
    PGO_NOWAIT,
    PGO_PDFREECLUST,
    PGO_SYNCIO,
    UVMPAGER_MAPIN_READ,
    UVMPAGER_MAPIN_WAITOK,
    UVMPAGER_MAPIN_WRITE,
    VM_PAGER_AGAIN,
    VM_PAGER_BAD,
    VM_PAGER_ERROR,
    VM_PAGER_OK,
    VM_PAGER_PEND,
    VM_PAGER_UNLOCK,
    PageSlot,
    UvmAioDesc,
    UvmPagerOps,
    pager_unbusy,
    uvm_mk_pcluster,
    uvm_pager_put,
    uvm_pagermapin,
    uvm_pagermapout,
)
from vnpager.uvm.uvm_param import MAXBSIZE, PROT_NONE, PROT_READ, PROT_WRITE
from vnpager.uvm.uvm_readahead import UvmRactx
from vnpager.vfs.mount import vref, vrele
from vnpager.vfs.specfs import D_DISK
from vnpager.vfs.vnode import (
    DIOCGPART,
    IO_NOCACHE,
    UIO_READ,
    UIO_WRITE,
    VBLK,
    VOP_GETATTR,
    VOP_READ,
    VOP_STRATEGY,
    VOP_UNLOCK,
    VOP_WRITE,
    VTEXT,
    Uio,
    Vattr,
    Vnode,
    vn_lock,
)

if TYPE_CHECKING:
    from vnpager.uvm.uvm import VM

log = logging.getLogger("vnpager.uvm_vnode")

# u_flags (uvm_vnode.h)
UVM_VNODE_VALID: Final = 0x001  # attached to its vnode
UVM_VNODE_CANPERSIST: Final = 0x002  # may keep its pages at 0 references
UVM_VNODE_ALOCK: Final = 0x004  # an attach is reading the attributes
UVM_VNODE_DYING: Final = 0x008  # final detach or terminate under way
UVM_VNODE_RELKILL: Final = 0x010  # kill when the last I/O is done
UVM_VNODE_WANTED: Final = 0x020  # someone waits for ALOCK/DYING/RELKILL
UVM_VNODE_VNISLOCKED: Final = 0x040  # the vnode is locked by our caller
UVM_VNODE_IOSYNC: Final = 0x080  # someone waits for u_nio to reach 0
UVM_VNODE_IOSYNCWANTED: Final = 0x100  # someone waits for IOSYNC to clear
UVM_VNODE_WRITEABLE: Final = 0x200  # on the writeable list
UVM_VNODE_BLOCKED: Final = UVM_VNODE_ALOCK | UVM_VNODE_DYING | UVM_VNODE_RELKILL
_IOSYNC_BITS: Final = UVM_VNODE_IOSYNC | UVM_VNODE_IOSYNCWANTED


# The life of a vnode object as data (uvn_set_flags checks every change of
# u_flags against it under VNPAGER_DEBUG).  Each state names the flags it
# must have and those it may have; any other combination is a bug.
@dataclass(frozen=True)
class UvnState:
    """One state of ``u_flags``: *required* all set, nothing beyond *optional*."""

    name: str
    required: int
    optional: int

    def holds(self, flags: int) -> bool:
        return flags & self.required == self.required and not flags & ~(self.required | self.optional)


UVN_STATES: Final = (
    # no vnode attached: never attached, or dead; the next attach starts afresh
    UvnState("free", 0, 0),
    # uvn_attach reads the size; later attachers wait (WANTED)
    UvnState("attaching", UVM_VNODE_ALOCK, UVM_VNODE_WANTED),
    # attached, with references or persisting; IOSYNC while a flush waits for I/O
    UvnState("valid", UVM_VNODE_VALID,
             UVM_VNODE_CANPERSIST | UVM_VNODE_WRITEABLE | _IOSYNC_BITS),
    # the last detach of an uncached object: flushing, then (RELKILL) draining I/O
    UvnState("dying", UVM_VNODE_VALID | UVM_VNODE_DYING,
             UVM_VNODE_RELKILL | UVM_VNODE_WANTED | UVM_VNODE_WRITEABLE | _IOSYNC_BITS),
    # uvm_vnp_terminate, its caller holding the vnode lock; it may have taken
    # the object over from a dying detach (and cleared RELKILL)
    UvnState("terminating", UVM_VNODE_VALID | UVM_VNODE_DYING | UVM_VNODE_VNISLOCKED,
             UVM_VNODE_CANPERSIST | UVM_VNODE_WANTED | UVM_VNODE_WRITEABLE | _IOSYNC_BITS),
)

# the moves between states, each with the flags that must be clear when it
# is made: an object that lives on after dying keeps no IOSYNC (the seed left
# it set after a forced unmount, and the object's next I/O waited forever)
UVN_TRANSITIONS: Final[dict[str, dict[str, int]]] = {
    "free": {"free": 0, "attaching": 0},
    "attaching": {"attaching": 0, "free": 0, "valid": 0},
    "valid": {"valid": 0, "dying": 0, "terminating": 0},
    "dying": {"dying": 0, "terminating": 0, "valid": _IOSYNC_BITS, "free": 0},
    "terminating": {"terminating": 0, "valid": _IOSYNC_BITS, "free": 0},
}


def uvn_state(flags: int) -> UvnState:
    """The state *flags* are in; panic if none."""
    for state in UVN_STATES:
        if state.holds(flags):
            return state
    raise Panic(f"u_flags {flags:#x}: not a state of a vnode object")


def uvn_check_flags(uvn: UvmVnode, new: int) -> None:
    """Panic unless u_flags may go from their value to *new*: both states
    legal, the move in UVN_TRANSITIONS, IOSYNCWANTED only with IOSYNC, and
    IOSYNC set only while I/O is in flight (someone will wake its waiter).
    """
    old, name = uvn.u_flags, uvn.trace_name()
    KASSERT(uvn.vmobjlock.rw_write_held(), f"{name}: u_flags changed without the object lock")
    src, dst = uvn_state(old).name, uvn_state(new).name
    must_clear = UVN_TRANSITIONS[src].get(dst)
    if must_clear is None:
        panic(f"{name}: u_flags {old:#x} -> {new:#x}: no move from {src} to {dst}")
    elif new & must_clear:
        panic(f"{name}: u_flags {old:#x} -> {new:#x}: {src} -> {dst} keeps {new & must_clear:#x}")
    if new & UVM_VNODE_IOSYNCWANTED and not new & UVM_VNODE_IOSYNC:
        panic(f"{name}: u_flags {new:#x}: IOSYNCWANTED without IOSYNC")
    if new & ~old & UVM_VNODE_IOSYNC and uvn.u_nio == 0:
        panic(f"{name}: IOSYNC set with no I/O in flight: nothing would wake its waiter")


def uvn_set_flags(uvn: UvmVnode, new: int) -> None:
    """Set u_flags to *new*.  Every change of u_flags goes through here, so
    that VNPAGER_DEBUG checks each move (uvn_check_flags).

    => caller holds the object lock (write).
    """
    if DEBUG:
        uvn_check_flags(uvn, new)
    uvn.u_flags = new


class UvmVnode(UvmObject):
    """``struct uvm_vnode``: the VM object of a vnode.

    Every field is guarded by the object lock (``vmobjlock``, write), except
    ``u_vnode``, fixed when the vnode is made, and ``u_sizelock``, a lock
    itself (it serialises size changes, see uvm_bio):

    * ``u_flags``: the state (UVN_STATES), changed only by uvn_set_flags.
    * ``u_nio``: the I/Os in flight; IOSYNC waiters sleep on (uvn, "u_nio").
    * ``u_size``: the size the pager believes in; uvm_vnp_setsize's caller
      also holds the kernel lock.
    * ``u_error``, ``u_errseq``, ``u_errseen``: the last write-back error,
      how many there were, and whether a mapping was told (errseq).
    * ``u_mtime_ns``: the file's mtime as of our last look (close-to-open);
      uvm_vnp_revalidate reads it and ``u_size`` unlocked to decide whether
      to look closer, and takes the lock to act.
    * ``u_ubc_ra``: the read-ahead state of file I/O (uvm_bio).

    Membership of ``vm.uvn_wlist`` is guarded by ``vm.uvn_wlist_lock`` and
    follows UVM_VNODE_WRITEABLE (both change together, under both locks).
    """

    def __init__(self, vm: VM, vp: Vnode) -> None:
        super().__init__(vm, uvm_vnodeops)
        self.u_vnode = vp
        self.u_flags = 0
        self.u_nio = 0  # I/Os in progress
        self.u_size = 0  # the size the pager believes in
        self.u_error = 0  # errno of the last failed write-back
        self.u_errseq = 0  # how many write-backs have failed
        self.u_errseen = False  # a mapping was told of the last error (errseq)
        self.u_mtime_ns = 0  # the file's mtime when attached
        # serialises size changes (ubc_setsize, growth, revalidation); taken
        # before the vnode lock and the object lock, never under them
        self.u_sizelock = Mutex("uvn_size")
        self.u_ubc_ra = UvmRactx()  # read-ahead of file I/O (uvm_bio) (object lock)

    def trace_name(self) -> str:
        return f"uvn<{self.u_vnode.v_key}>"

    def __repr__(self) -> str:
        return (f"<UvmVnode {self.u_vnode.v_key!r} flags={self.u_flags:#x} refs={self.uo_refs} "
                f"npages={self.uo_npages} size={self.u_size}>")


def _uvn(uobj: UvmObject) -> UvmVnode:
    KASSERT(isinstance(uobj, UvmVnode), "not a vnode object")
    return uobj  # type: ignore[return-value]


def _wlist_insert(uvn: UvmVnode) -> None:
    """=> caller holds the object lock."""
    with uvn.vm.uvn_wlist_lock:
        uvn.vm.uvn_wlist[uvn] = None
    uvn_set_flags(uvn, uvn.u_flags | UVM_VNODE_WRITEABLE)


def _wlist_remove(uvn: UvmVnode) -> None:
    """=> caller holds the object lock."""
    with uvn.vm.uvn_wlist_lock:
        del uvn.vm.uvn_wlist[uvn]
    uvn_set_flags(uvn, uvn.u_flags & ~UVM_VNODE_WRITEABLE)


def uvn_record_error(uvn: UvmVnode, error: int) -> None:
    """Keep a write-back error on the object until the front ends see it.

    => caller holds the object lock.
    """
    uvn.u_error = error
    uvn.u_errseq += 1
    uvn.u_errseen = False
    uvn.vm.uvmexp.write_errors += 1


# errseq, as Linux's for file descriptions: each mapping keeps a cursor into
# u_errseq, so every mapping open when a write-back failed (whoever did the
# write: flush, sync or the page daemon) is told once, by its next check.

def uvn_errseq_sample(uvn: UvmVnode) -> int:
    """The cursor of a new mapping of *uvn*.

    It sees the errors recorded from now on, and also the last one already
    recorded if no mapping has seen it yet: an error of the page daemon on
    an object nobody mapped then is not lost.

    => caller holds no object lock.
    """
    with uvn.vmobjlock:
        return uvn.u_errseq - 1 if uvn.u_errseq and not uvn.u_errseen else uvn.u_errseq


def uvn_errseq_check(uvn: UvmVnode, cursor: int) -> tuple[int, int]:
    """``(errno, new cursor)``: the last write-back error if any was recorded
    since *cursor* (0 if none), and the cursor to keep for the next check.

    => caller holds no object lock.
    """
    with uvn.vmobjlock:
        if uvn.u_errseq == cursor:
            return 0, cursor
        uvn.u_errseen = True
        return uvn.u_error, uvn.u_errseq


@traced
def uvn_init(vm: VM) -> None:
    """Set up the pager's share of *vm*: the writeable list and sync lock."""
    vm.uvn_wlist.clear()


@gated
@traced
def uvn_attach(vp: Vnode, accessprot: int) -> UvmVnode | None:
    """Attach *vp* to its VM object, making it VALID if need be.

    Returns the object with one more reference, or None if *vp* cannot be
    mapped (a block device that is not a disk, or the size is unknowable:
    then ``curproc().p_errno`` is the errno that made it so, or 0).
    A persisting object is found with its pages, and regains its vnode
    reference.  *accessprot* with PROT_WRITE puts it on the writeable list.

    => caller holds no lock: we may sleep on another attach or a death.
    """
    curproc().p_errno = 0  # a failure reports its own errno, or none
    uvn: UvmVnode = vp.v_uvm
    lock = uvn.vmobjlock
    lock.rw_enter(RW_WRITE)
    while uvn.u_flags & UVM_VNODE_BLOCKED:
        uvn_set_flags(uvn, uvn.u_flags | UVM_VNODE_WANTED)
        rwsleep(uvn, lock, "uvn_attach")

    if vp.v_type == VBLK and (vp.v_rdev is None or vp.v_rdev.d_type != D_DISK):
        lock.rw_exit()
        return None

    if uvn.u_flags & UVM_VNODE_VALID:
        if uvn.uo_refs == 0:
            vref(vp)  # a persisting object regains its vnode reference
        uvn.uo_refs += 1
        if accessprot & PROT_WRITE and not uvn.u_flags & UVM_VNODE_WRITEABLE:
            _wlist_insert(uvn)
        lock.rw_exit()
        return uvn

    # the attributes may take I/O: keep other attachers out meanwhile
    uvn_set_flags(uvn, UVM_VNODE_ALOCK)
    lock.rw_exit()

    vattr = Vattr()
    if vp.v_type == VBLK:
        assert vp.v_rdev is not None
        pi: dict[str, int] = {}
        result = vp.v_rdev.d_ioctl(DIOCGPART, pi)
        used_vnode_size = pi["secsize"] * pi["psize"] if result == 0 else 0
    else:
        result = VOP_GETATTR(vp, vattr)
        used_vnode_size = vattr.va_size

    lock.rw_enter(RW_WRITE)
    if result != 0:
        if uvn.u_flags & UVM_VNODE_WANTED:
            wakeup(uvn)
        uvn_set_flags(uvn, 0)
        lock.rw_exit()
        curproc().p_errno = result
        return None

    KASSERT(uvn.uo_refs == 0, "uvn_attach: new object has references")
    uvn.uo_refs += 1
    oldflags = uvn.u_flags
    uvn_set_flags(uvn, UVM_VNODE_VALID | UVM_VNODE_CANPERSIST)
    uvn.u_nio = 0
    uvn.u_size = used_vnode_size
    uvn.u_mtime_ns = vattr.va_mtime_ns
    if accessprot & PROT_WRITE:
        _wlist_insert(uvn)
    vref(vp)  # held as long as the object has references
    if oldflags & UVM_VNODE_WANTED:
        wakeup(uvn)
    lock.rw_exit()
    return uvn


@traced
def uvn_reference(uobj: UvmObject) -> None:
    """Take another reference to a VALID object.

    => the caller already has a reference, and uses the same accessprot as
       at attach time.
    """
    uvn = _uvn(uobj)
    if DEBUG and not uvn.u_flags & UVM_VNODE_VALID:
        panic(f"uvn_reference: invalid state: refs={uobj.uo_refs} flags={uvn.u_flags:#x}")
    with uobj.vmobjlock:
        uobj.uo_refs += 1


@gated
@traced
def uvn_detach(uobj: UvmObject) -> None:
    """Drop a reference; at zero the object persists or dies.

    With CANPERSIST its pages are deactivated and kept for the next attach.
    Without it, dirty pages are written, all pages freed, in-flight I/O
    drained, and the object leaves the writeable list.  Either way the vnode
    reference taken at attach is dropped.  If dirty pages cannot be written,
    the object persists with them and its error instead of dying.

    => caller holds no object lock (the map lock may be held).
    """
    uvn = _uvn(uobj)
    lock = uobj.vmobjlock
    lock.rw_enter(RW_WRITE)
    uobj.uo_refs -= 1
    if uobj.uo_refs:
        lock.rw_exit()
        return

    vp = uvn.u_vnode
    vp.v_flag &= ~VTEXT  # no mapping is left to protect

    if uvn.u_flags & UVM_VNODE_CANPERSIST:
        _uvn_deactivate_active(uvn)  # the seed: uvn_flush(PGO_DEACTIVATE|PGO_ALLPAGES)
    else:
        _uvn_kill(uvn)
    lock.rw_exit()
    vrele(vp)  # the seed leaks it when terminate took the object over


def _uvn_kill(uvn: UvmVnode) -> None:
    """The last detach of an object that may not persist: write its dirty
    pages, free them all, drain the I/O in flight, and make the object free.
    Pages that cannot be written are kept, with the error, and the object
    with them (VALID again).  If terminate takes the object over while we
    sleep, it does the rest.

    => caller holds the object lock; it is dropped and retaken.
    """
    uobj = uvn
    lock = uvn.vmobjlock
    uvn_set_flags(uvn, uvn.u_flags | UVM_VNODE_DYING)
    # no one can attach until DYING clears, and no pgo_get can be running
    # (no references): the only busy pages are in pageout by others
    uvn_flush(uobj, 0, 0, PGO_CLEANIT | PGO_FREE | PGO_ALLPAGES)
    if not _terminate_has(uvn):  # the seed sets RELKILL over terminate's VNISLOCKED
        uvn_set_flags(uvn, uvn.u_flags | UVM_VNODE_RELKILL)
    while uobj.uo_npages and uvn.u_flags & UVM_VNODE_RELKILL:
        if not any(pg.pg_flags & PG_BUSY for pg in uobj.memt.values()):
            # no write is in flight, so what is left could not be written
            # (now or asynchronously): keep it, with its error
            _iosync_done(uvn)
            if uvn.u_flags & UVM_VNODE_WANTED:
                wakeup(uvn)
            uvn_set_flags(uvn, uvn.u_flags & ~(UVM_VNODE_DYING | UVM_VNODE_RELKILL | UVM_VNODE_WANTED))
            return
        uvn_set_flags(uvn, uvn.u_flags | UVM_VNODE_IOSYNC)
        rwsleep((uvn, "u_nio"), lock, "uvn_term")

    if _terminate_has(uvn):
        return  # terminate took the object over while we slept
    if uvn.u_flags & UVM_VNODE_WRITEABLE:
        _wlist_remove(uvn)
    KASSERT(not uobj.memt, "uvn_detach: pages left on a dead object")
    oldflags = uvn.u_flags
    uvn_set_flags(uvn, 0)
    if oldflags & UVM_VNODE_WANTED:
        wakeup(uvn)


def _uvn_deactivate_active(uvn: UvmVnode) -> None:
    """What the seed's PGO_DEACTIVATE|PGO_ALLPAGES flush does at the last
    detach, at the cost of the object's active pages (``uo_active``: those
    used since the last detach) rather than of every resident page: unmap
    them and move them to the inactive queue.  The flush would change
    nothing for the other pages: they are inactive already (or wired, and
    stay so), and unmapped, since the last map entry took its mappings with
    it.  => caller holds the object lock, not the page queue lock.
    """
    vm = uvn.vm
    with vm.pageqlock:
        active = list(uvn.uo_active)
    pmap_page_protect_run(active, PROT_NONE)
    with vm.pageqlock:
        uvm_pagedeactivate_run(active)


def _terminate_has(uvn: UvmVnode) -> bool:
    """Whether terminate took a dying object over from its last detach (or
    is done with it already).  => caller holds the object lock."""
    return uvn.u_flags & (UVM_VNODE_DYING | UVM_VNODE_VNISLOCKED) != UVM_VNODE_DYING


def _iosync_done(uvn: UvmVnode) -> None:
    """Clear IOSYNC after a wait for u_nio, letting held-back I/O start.

    => caller holds the object lock.
    """
    if uvn.u_flags & UVM_VNODE_IOSYNCWANTED:
        wakeup((uvn, "u_flags"))
    uvn_set_flags(uvn, uvn.u_flags & ~_IOSYNC_BITS)


@gated
@traced
def uvm_vnp_terminate(vp: Vnode) -> None:
    """Clean a vnode's VM object out so that the vnode can be reused.

    Called by vgone() in two cases: recycling a vnode whose object
    persists (refs == 0: the object is freed), and forced unmount of a
    vnode still mapped (refs > 0: the object lives on, dead, and every
    later I/O fails because the vnode is dead).  Dirty pages are written
    first; pages whose write fails are freed anyway here, since the vnode
    is going away, and counted in ``uvmexp.lostpages``.

    => caller has the vnode XLOCKed and locked: uvn_io must not lock it.
    """
    uvn: UvmVnode | None = vp.v_uvm
    if uvn is None:
        return
    uobj = uvn
    lock = uobj.vmobjlock
    lock.rw_enter(RW_WRITE)
    if not uvn.u_flags & UVM_VNODE_VALID:
        lock.rw_exit()
        return

    if DEBUG and uvn.uo_refs:
        log.debug("uvm_vnp_terminate(%r): terminating active vnode", uvn)

    # a detach waiting for its last I/O: take the object over from it
    uvn_set_flags(uvn, uvn.u_flags & ~UVM_VNODE_RELKILL | UVM_VNODE_DYING | UVM_VNODE_VNISLOCKED)

    # synchronous (the seed's flush is not): we wait for the writes anyway,
    # and a fault meanwhile then fails at once rather than behind IOSYNC
    uvn_flush(uobj, 0, 0, PGO_CLEANIT | PGO_FREE | PGO_ALLPAGES | PGO_SYNCIO)
    while True:
        # the seed panics on an unbusy page here; with write errors kept,
        # an unbusy page is one whose write failed (synchronously or not)
        _free_unwritten(uvn)
        if not uobj.uo_npages:
            break
        uvn_set_flags(uvn, uvn.u_flags | UVM_VNODE_IOSYNC)  # checks that I/O is in flight
        rwsleep((uvn, "u_nio"), lock, "uvn_term")

    oldflags = uvn.u_flags
    if uvn.uo_refs:
        # lives on with a dead vnode until its last reference goes; the seed
        # leaves IOSYNC set here, and the object's next I/O waits forever
        _iosync_done(uvn)
        uvn_set_flags(uvn, uvn.u_flags & ~(UVM_VNODE_DYING | UVM_VNODE_VNISLOCKED
                                           | UVM_VNODE_WANTED | UVM_VNODE_CANPERSIST))
    else:
        if uvn.u_flags & UVM_VNODE_IOSYNCWANTED:
            panic("uvm_vnp_terminate: io sync wanted bit set")
        if uvn.u_flags & UVM_VNODE_WRITEABLE:
            _wlist_remove(uvn)
        uvn_set_flags(uvn, 0)
        # the vnode may next hold another file: its errors are not that file's
        uvn.u_error, uvn.u_errseq, uvn.u_errseen = 0, 0, False
    if oldflags & UVM_VNODE_WANTED:
        wakeup(uvn)
    lock.rw_exit()


def _free_unwritten(uvn: UvmVnode) -> None:
    """Free the unbusy pages left after terminate's flush (terminate only).

    Dirty ones are those whose write failed: they are counted as lost.

    => caller holds the object lock.
    """
    dead = [pg for pg in uvn.memt.values() if not pg.pg_flags & PG_BUSY]
    lost = sum(1 for pg in dead if not pg.pg_flags & PG_CLEAN or pmap_is_modified(pg))
    with uvn.vm.pageqlock:
        for pg in dead:
            uvm_pagefree(pg)
    if lost:
        log.warning("%r: %d dirty pages lost: the vnode is being recycled and "
                    "write-back failed with errno %d", uvn, lost, uvn.u_error)
        uvn.vm.uvmexp.lostpages += lost


@gated
@traced
def uvn_flush(uobj: UvmObject, start: int, stop: int, flags: int) -> bool:
    """Clean, deactivate and/or free the pages of [start, stop).

    PGO_CLEANIT writes dirty pages (clustered, through uvm_pager_put) and
    may sleep; without it we never sleep but to wait for a busy page that
    PGO_FREE must free.  PGO_ALLPAGES means the whole object.  A page busy
    in someone else's hands is skipped; with PGO_CLEANIT|PGO_SYNCIO we then
    wait for all of the object's I/O to finish (IOSYNC), as the seed does,
    and go over the range again, waiting for each page still busy, so that
    every page dirty when we were called is written when we return True.

    Returns False if a write failed: those pages stay dirty and resident
    (even with PGO_FREE), the error is kept on the object, and this call
    does not write them again (one failed cluster costs one write).

    The steps are the seed's: the CLEANCHK pass (:func:`_flush_clearchk`),
    the main loop (:func:`_flush_pass`, the seed's "pp" loop, with the
    disposal of a page that needs no cleaning in :func:`_flush_page` and of
    a cluster after its put in :func:`_flush_cluster_done`), and the IOSYNC
    wait (:func:`_flush_iosync`); then our second pass over the busy pages.

    => caller holds the object lock (write); it may be dropped and retaken.
    => caller must not hold the page queue lock.
    """
    uvn = _uvn(uobj)
    vm = uobj.vm
    KASSERT(uobj.vmobjlock.rw_write_held(), "uvn_flush: object not locked")
    if flags & PGO_ALLPAGES:
        start, stop = 0, vm.round_page(uvn.u_size)
    else:
        start = vm.trunc_page(start)
        stop = min(vm.round_page(stop), vm.round_page(uvn.u_size))
    fl = _Flush(uvn, flags, start, stop)
    if flags & (PGO_CLEANIT | PGO_FREE | PGO_DEACTIVATE) == PGO_DEACTIVATE:
        _flush_deactivate(fl)  # nothing to write or wait for: the pages as one run
        return True
    if flags & PGO_CLEANIT:
        _flush_clearchk(fl)
    _flush_pass(fl, wait_busy=False)
    if fl.need_iosync:
        _flush_iosync(uvn)
        # the seed stops here, and misses a dirty page that a fault held busy
        # between its pgo_get passes (no I/O to wait for): it would report
        # that page written.  Wait for each page found busy, and clean it.
        _flush_pass(fl, wait_busy=True)
    uvm_pglistfree(fl.dead)
    return fl.retval


@dataclass
class _Flush:
    """What the steps of one uvn_flush share.  => the object lock guards it
    (only the flushing thread touches it)."""

    uvn: UvmVnode
    flags: int  # PGO_SYNCIO is added if an asynchronous put finds no pager map
    start: int
    stop: int
    retval: bool = True  # no write failed
    need_iosync: bool = False  # the first pass met a busy page under CLEANIT|SYNCIO
    was_busy: set[int] = field(default_factory=set)  # offsets of those pages
    failed: SortedList = field(default_factory=SortedList)  # offsets whose write failed here
    dead: list[VmPage] = field(default_factory=list)  # taken apart, freed at the end


def _flush_deactivate(fl: _Flush) -> None:
    """A flush that only deactivates (MADV_SEQUENTIAL behind a scan): what
    the main loop's disposal does to each page of the range, busy or not,
    in one pmap call and one hold of the page queue lock.

    => caller holds the object lock, not the page queue lock.
    """
    pgs = [pg for pg in fl.uvn.pages_in(fl.start, fl.stop) if pg.wire_count == 0]
    pmap_page_protect_run(pgs, PROT_NONE)
    with fl.uvn.vm.pageqlock:
        uvm_pagedeactivate_run(pgs)


def _flush_clearchk(fl: _Flush) -> None:
    """The seed's CLEANCHK pass: uvm_mk_pcluster trusts the PG_CLEAN of an
    active page only where PG_CLEANCHK says it was synced from the pmap."""
    for pg in fl.uvn.pages_in(fl.start, fl.stop):
        pg.pg_flags &= ~PG_CLEANCHK


def _flush_pass(fl: _Flush, wait_busy: bool) -> None:
    """The seed's main loop over the resident pages of the range, in offset
    order.  With *wait_busy* (the second pass) only the pages the first pass
    found busy are looked at, and a page still busy is waited for.  A page
    whose write failed in this call is not tried again.
    """
    curoff = fl.start
    while (pp := _next_page(fl.uvn, curoff, fl.stop)) is not None:
        curoff = pp.offset + fl.uvn.vm.page_size
        if (wait_busy and pp.offset not in fl.was_busy) or pp.offset in fl.failed:
            continue
        curoff = _flush_page(fl, pp, wait_busy)


def _flush_page(fl: _Flush, pp: VmPage, wait_busy: bool) -> int:
    """Deal with one page: dispose of it, wait for it, or write it with its
    cluster.  Returns the offset the loop looks at next.

    => caller holds the object lock; it may be dropped and retaken.
    """
    flags = fl.flags
    if not flags & PGO_CLEANIT or pp.pg_flags & PG_BUSY:
        if pp.pg_flags & PG_BUSY and flags & (PGO_CLEANIT | PGO_SYNCIO) == PGO_CLEANIT | PGO_SYNCIO:
            if wait_busy:
                return _flush_wait(fl, pp)
            fl.need_iosync = True
            fl.was_busy.add(pp.offset)
        needs_clean = False
    else:
        needs_clean = _flush_sync_clean(pp, flags)

    if not needs_clean:
        if flags & (PGO_FREE | PGO_DEACTIVATE) == PGO_FREE and pp.pg_flags & PG_BUSY:
            return _flush_wait(fl, pp)
        _flush_dispose(fl, pp, free=True)
        return pp.offset + fl.uvn.vm.page_size

    result, ppsp = _flush_put(fl, pp)
    # go on after the cluster's last page: a page of a pending write is
    # busy, and one whose write failed is not tried again by this call
    nextoff = ppsp[-1].offset + fl.uvn.vm.page_size
    _flush_cluster_done(fl, pp, result, ppsp)
    return nextoff


def _flush_sync_clean(pp: VmPage, flags: int) -> bool:
    """Sync the PG_CLEAN of an unbusy page from the pmap; True if it is dirty.

    => caller holds the object lock.
    """
    # freeing: unmap first, so that PG_CLEAN cannot go stale after
    if pp.pg_flags & PG_CLEAN and flags & PGO_FREE and pp.pg_flags & PQ_ACTIVE:
        pmap_page_protect(pp, PROT_NONE)
    if pp.pg_flags & PG_CLEAN and pmap_is_modified(pp):
        pp.pg_flags &= ~PG_CLEAN
    pp.pg_flags |= PG_CLEANCHK
    return not pp.pg_flags & PG_CLEAN


def _flush_wait(fl: _Flush, pp: VmPage) -> int:
    """Wait for a busy page; return its offset, for the loop to look at that
    offset again: not at pp.offset, for pp may be freed and reused elsewhere
    while we sleep.  => caller holds the object lock; dropped and retaken."""
    off = pp.offset
    uvm_pagewait(pp, fl.uvn.vmobjlock, "uvn_flsh")
    fl.uvn.vmobjlock.rw_enter(RW_WRITE)
    return off


def _flush_dispose(fl: _Flush, pg: VmPage, free: bool) -> None:
    """The seed's disposal of a page the flush is done with: PGO_DEACTIVATE
    deactivates it (busy or not: the seed allows it), else PGO_FREE with
    *free* frees it (onto ``fl.dead``; the page must not be busy).

    => caller holds the object lock, not the page queue lock.
    """
    vm = fl.uvn.vm
    if fl.flags & PGO_DEACTIVATE:
        if pg.wire_count == 0:
            pmap_page_protect(pg, PROT_NONE)
            with vm.pageqlock:
                uvm_pagedeactivate(pg)
    elif fl.flags & PGO_FREE and free:
        pmap_page_protect(pg, PROT_NONE)
        with vm.pageqlock:
            uvm_pageclean(pg)
        fl.dead.append(pg)


def _flush_put(fl: _Flush, pp: VmPage) -> tuple[int, list[VmPage]]:
    """Write the dirty page *pp* with its neighbours (uvm_pager_put), as
    the seed's ReTry loop does: an asynchronous put that finds no pager map
    is done synchronously, and so is the rest of the flush.

    The cluster stays inside the range and never takes a page whose write
    failed in this call.  => caller holds the object lock; *pp* is unbusy.
    """
    ps = fl.uvn.vm.page_size
    pp.pg_flags |= PG_BUSY
    UVM_PAGE_OWN(pp, "uvn_flush")
    pmap_page_protect(pp, PROT_READ)
    # PGO_DEACTIVATE wins over PGO_FREE (as in the disposal): a page that
    # will not be freed must not be left PG_RELEASED
    if fl.flags & (PGO_FREE | PGO_SYNCIO | PGO_DEACTIVATE) == PGO_FREE:
        pp.pg_flags |= PG_RELEASED
    below = next(fl.failed.irange(maximum=pp.offset, reverse=True), None)
    above = next(fl.failed.irange(minimum=pp.offset), None)
    lo = fl.start if below is None else below + ps
    hi = fl.stop if above is None else above
    while True:
        # [lo, hi) bounds the cluster: PGO_ALLPAGES would lift the bounds
        result, ppsp = uvm_pager_put(fl.uvn, pp, MAXBSIZE // ps,
                                     (fl.flags | PGO_DOACTCLUST) & ~PGO_ALLPAGES, lo, hi)
        if result != VM_PAGER_AGAIN:
            return result, ppsp
        KASSERT(not fl.flags & PGO_SYNCIO, "uvn_flush: PGO_SYNCIO returned AGAIN")
        fl.flags |= PGO_SYNCIO
        pp.pg_flags &= ~PG_RELEASED


def _flush_cluster_done(fl: _Flush, pp: VmPage, result: int, ppsp: list[VmPage]) -> None:
    """The seed's disposal of a cluster after its put.

    Pending: uvn_aiodone finishes the pages and frees the released ones (it
    needs the object lock we hold: none is done yet).  Written: the pages
    are unbusied and clean, then disposed of.  Failed: the seed marks *pp*
    clean and may free it; we keep it and the cluster dirty and resident
    (uvn_io recorded the error on the object) and remember their offsets,
    so that this call does not write them again; the put has dropped the
    pages but *pp*.

    => caller holds the object lock.
    """
    if result == VM_PAGER_PEND:
        for ptmp in ppsp:
            _flush_dispose(fl, ptmp, free=False)
            if fl.flags & (PGO_FREE | PGO_DEACTIVATE) == PGO_FREE:
                ptmp.pg_flags |= PG_RELEASED
        return
    ok = result == VM_PAGER_OK
    if not ok:
        fl.retval = False
        fl.failed.update(ptmp.offset for ptmp in ppsp)
        pp.pg_flags &= ~PG_RELEASED
    for ptmp in ppsp:
        if ptmp is pp or ok:
            pager_unbusy(ptmp)
        if ok:
            ptmp.pg_flags |= PG_CLEAN | PG_CLEANCHK
            if fl.flags & (PGO_FREE | PGO_DEACTIVATE) != PGO_FREE:  # it stays: clean
                pmap_clear_modify(ptmp)
        if ptmp.uobject is fl.uvn:  # a dropped page that was released is gone
            _flush_dispose(fl, ptmp, free=ok)


def _flush_iosync(uvn: UvmVnode) -> None:
    """The seed's IOSYNC wait: sleep until none of the object's I/O is in
    flight.  => caller holds the object lock; dropped while we sleep."""
    while uvn.u_nio != 0:
        uvn_set_flags(uvn, uvn.u_flags | UVM_VNODE_IOSYNC)
        rwsleep((uvn, "u_nio"), uvn.vmobjlock, "uvn_flush")
    _iosync_done(uvn)


def _next_page(uobj: UvmObject, curoff: int, stop: int) -> VmPage | None:
    """The resident page with the lowest offset in [curoff, stop)."""
    for off in uobj.memt.irange(curoff, stop):
        return uobj.memt[off]
    return None


@traced
def uvn_cluster(uobj: UvmObject, offset: int) -> tuple[int, int]:
    """The range [lo, hi) around *offset* that one I/O may cover.

    => *offset* lies inside the object: anything else is a bug (panic).
    """
    uvn = _uvn(uobj)
    if offset >= uvn.u_size:
        panic(f"uvn_cluster: offset {offset:#x} out of range (size {uvn.u_size:#x})")
    return offset, min(offset + MAXBSIZE, uobj.vm.round_page(uvn.u_size))


@traced
def uvn_put(uobj: UvmObject, pps: list[VmPage], npages: int, flags: int) -> int:
    """Write *pps* to the vnode: with PGO_SYNCIO, wait for it; without,
    start it and return VM_PAGER_PEND (or VM_PAGER_AGAIN: no pager map).

    => caller holds the object lock; the pages are busy and owned by the
       caller, who sets PG_CLEAN and clears the modified bits afterwards
       (uvn_aiodone does it for a pending write).
    """
    KASSERT(uobj.vmobjlock.rw_write_held(), "uvn_put: object not locked")
    curproc().p_errno = 0
    return uvn_io(_uvn(uobj), pps, npages, flags, UIO_WRITE)


@traced
def uvn_get(uobj: UvmObject, offset: int, pps: list[PageSlot], npages: int,
            centeridx: int, access_type: int, advice: int, flags: int) -> tuple[int, int]:
    """Get pages [offset, offset + npages pages) of the object into *pps*.

    With PGO_LOCKED (the fault's structures locked, so no sleeping): take
    only resident, unbusy pages, skipping PGO_DONTCARE slots; returns
    ``(VM_PAGER_OK, got)`` if the center page (or with PGO_ALLPAGES, every
    page) was found, else ``(VM_PAGER_UNLOCK, got)``: unlock and call again.

    Without PGO_LOCKED: the pages wanted are the center, or with
    PGO_ALLPAGES every slot not yet filled and not PGO_DONTCARE.  Wait for
    busy ones, allocate missing ones (waiting for memory if need be) and
    read them.  Where the seed reads one page at a time ("otherwise we'd
    chunk"), each missing wanted page is read in one vectored read with the
    missing pages after it (:func:`_uvn_getrun`): the None slots after the
    center are the caller's read-ahead window.  A run stops at a slot that
    is filled or DONTCARE, at a resident page, at the last page of u_size,
    after max(MAXBSIZE, the window) bytes, or where no page is free above
    vm.freemin: we never sleep for memory, nor reclaim, for a page nobody
    asked for.  Pages read ahead come back in their slots busy, like the
    center, and the caller unbusies them; slots not read stay None.

    With PGO_NOSLEEPALLOC (background read-ahead) the wanted pages too take
    only free pages above vm.freemin; ``(VM_PAGER_AGAIN, 0)`` if there are
    none.  A run whose read fails is freed and the error returned.

    Pages come back busy; the caller unbusies them and must check for
    PG_RELEASED.  => caller holds the object lock; in the unlocked pass it
    is released on return, whatever the result.
    """
    KASSERT(not flags & PGO_LOCKED or uobj.vmobjlock.rw_lock_held(), "uvn_get: not locked")
    curproc().p_errno = 0
    page_size = uobj.vm.page_size

    if flags & PGO_LOCKED:
        gotpages = 0
        done = True
        lookup = uobj.memt.get  # uvm_pagelookup, with no call per page
        for lcv in range(npages):
            if pps[lcv] is PGO_DONTCARE:
                continue
            ptmp = lookup(offset + lcv * page_size)
            if ptmp is None or ptmp.pg_flags & PG_BUSY:
                if lcv == centeridx or flags & PGO_ALLPAGES:
                    done = False
                continue
            ptmp.pg_flags |= PG_BUSY
            UVM_PAGE_OWN(ptmp, "uvn_get1")
            pps[lcv] = ptmp
            gotpages += 1
        return (VM_PAGER_OK if done else VM_PAGER_UNLOCK), gotpages

    lock = uobj.vmobjlock
    uvn = _uvn(uobj)
    maxrun = max(MAXBSIZE // page_size, npages - centeridx)
    pgaflags = UVM_PGA_NORESERVE if flags & PGO_NOSLEEPALLOC else 0
    lcv = 0
    while lcv < npages:
        if pps[lcv] is not None or (lcv != centeridx and not flags & PGO_ALLPAGES):
            lcv += 1
            continue
        current_offset = offset + lcv * page_size
        ptmp = None
        while pps[lcv] is None:
            ptmp = uvm_pagelookup(uobj, current_offset)
            if ptmp is None:
                ptmp = uvm_pagealloc(uobj.vm, uobj, current_offset, pgaflags)
                if ptmp is None:
                    lock.rw_exit()  # let the page daemon clean our pages too
                    if flags & PGO_NOSLEEPALLOC:
                        return VM_PAGER_AGAIN, 0
                    uvm_wait(uobj.vm, "uvn_getpage")
                    lock.rw_enter(RW_WRITE)
                    continue
                break  # a new page, busy and fake: read it below
            if ptmp.pg_flags & PG_BUSY:
                uvm_pagewait(ptmp, lock, "uvn_get")
                lock.rw_enter(RW_WRITE)
                continue
            ptmp.pg_flags |= PG_BUSY
            UVM_PAGE_OWN(ptmp, "uvn_get2")
            pps[lcv] = ptmp
        if pps[lcv] is not None:
            lcv += 1
            continue

        assert ptmp is not None
        run = _uvn_getrun(uvn, ptmp, pps, lcv + 1, min(npages, lcv + maxrun))
        result = uvn_io(uvn, run, len(run), PGO_SYNCIO | PGO_NOWAIT, UIO_READ)
        if result != VM_PAGER_OK:
            for pg in run:
                pager_unbusy(pg)
            uvm_pagefree_run(run)
            lock.rw_exit()
            return result, 0

        for pg in run:
            pg.pg_flags &= ~PG_FAKE
        # the seed's pmap_clear_modify, called where the bit is set (pg.attrs is
        # exact on every machine): for the new, unmapped pages of a read, none
        pmap_clear_modify_run([pg for pg in run if pg.attrs & PG_MOD])
        pps[lcv:lcv + len(run)] = run
        lcv += len(run)

    lock.rw_exit()
    return VM_PAGER_OK, npages


def _uvn_getrun(uvn: UvmVnode, first: VmPage, pps: list[PageSlot], lcv: int, stop: int) -> list[VmPage]:
    """The pages of one read: *first*, a new page, and a new page for each
    empty slot from *lcv* up to *stop* whose page is not resident, up to the
    last page of u_size and as long as pages are free above vm.freemin.

    => caller holds the object lock; the pages are busy and fake, owned by
       the caller, and in offset order.
    """
    vm = uvn.vm
    ps = vm.page_size
    stop = min(stop, lcv + (vm.round_page(uvn.u_size) - first.offset) // ps - 1)  # u_size's last page
    off = first.offset + ps
    n = 0  # the empty slots from lcv on
    while lcv + n < stop and pps[lcv + n] is None:
        n += 1
    n = uvn.memt.absent_run(off, n)
    if n == 0:
        return [first]
    # the whole run in one allocation (one hold of the page queue lock)
    more = uvm_pagealloc_run(vm, uvn, off, n, UVM_PGA_NORESERVE, owner="uvn_get3")
    if len(more) < n:  # memory is short: read what was asked for, not more
        uvm_pagewant_ra(vm, stop - lcv - len(more))
    return [first, *more]


@traced
def uvn_io(uvn: UvmVnode, pps: list[VmPage], npages: int, flags: int, rw: int) -> int:
    """Read or write *pps*, contiguous from pps[0].offset, with the vnode.

    Returns VM_PAGER_OK; VM_PAGER_BAD for an offset at or past the end;
    VM_PAGER_AGAIN where PGO_NOWAIT (or a missing PGO_SYNCIO) forbids the
    sleep it would need; VM_PAGER_ERROR otherwise, with the errno left in
    ``curproc().p_errno`` (and, for a write, recorded on the object).  A
    short read is zero-filled; a read of nothing, or a write that leaves
    bytes unwritten (the seed would mark them clean), is EIO.  A vnode the
    caller already holds locked gives EDEADLK.  *npages* is the seed's
    argument, kept: it must be ``len(pps)`` (anything else panics).

    => caller holds the object lock; it is dropped during the I/O and held
       again on return.  The pages are busy and owned by the caller.
    """
    if npages != len(pps):  # a read would zero-fill frames the caller did not ask for
        panic(f"uvn_io: npages {npages} for {len(pps)} pages")
    uobj = uvn
    vm = uvn.vm
    lock = uobj.vmobjlock
    KASSERT(lock.rw_write_held(), "uvn_io: object not locked")
    waitok = bool(flags & PGO_SYNCIO)
    vn = uvn.u_vnode
    file_offset = pps[0].offset

    while uvn.u_flags & UVM_VNODE_IOSYNC:
        if not waitok:
            return VM_PAGER_AGAIN
        uvn_set_flags(uvn, uvn.u_flags | UVM_VNODE_IOSYNCWANTED)
        rwsleep((uvn, "u_flags"), lock, "uvn_iosync")

    if file_offset >= uvn.u_size:
        return VM_PAGER_BAD

    mapinflags = UVMPAGER_MAPIN_READ if rw == UIO_READ else UVMPAGER_MAPIN_WRITE
    kva = uvm_pagermapin(vm.pager_map, pps, mapinflags)
    if kva is None and not waitok:
        return VM_PAGER_AGAIN
    # asynchronous write, unless terminate owns the vnode (see below)
    if (rw == UIO_WRITE and not waitok and vm.aiodaemon is not None
            and not uvn.u_flags & UVM_VNODE_VNISLOCKED):
        assert kva is not None
        return _uvn_io_start(uvn, pps, kva)

    uvn.u_nio += 1
    lock.rw_exit()
    if kva is None:
        kva = uvm_pagermapin(vm.pager_map, pps, mapinflags | UVMPAGER_MAPIN_WAITOK)
    assert kva is not None

    # the pages are busy: their offsets cannot change under us
    wanted = min(npages * vm.page_size, uvn.u_size - file_offset)
    uio = Uio(list(kva), file_offset, wanted, rw)

    result = 0
    with kernel_lock:
        # VNISLOCKED speaks for terminate's thread only, which holds the vnode
        # lock.  Any other thread would wait for that lock while terminate
        # waits for its busy pages (or, unlocked, race the reclaim): the
        # vnode is going dead, so its I/O fails now.
        vnislocked = bool(uvn.u_flags & UVM_VNODE_VNISLOCKED)
        # a filesystem whose reads are requests (objfs) reads unlocked, so
        # that several are in flight; terminate still waits for their pages
        unlocked = rw == UIO_READ and vn.v_op.unlocked_read
        if vnislocked and not vn.v_lock.held():
            result = errno.EIO
        elif not vnislocked and not unlocked:
            result = vn_lock(vn, LK_EXCLUSIVE | LK_RECURSEFAIL
                             | (LK_NOWAIT if flags & PGO_NOWAIT else 0))
        if result == 0:
            if unlocked:
                result = VOP_STRATEGY(vn, uio)
            elif rw == UIO_READ:
                result = VOP_READ(vn, uio, 0)
            else:
                result = VOP_WRITE(vn, uio, IO_NOCACHE if flags & PGO_PDFREECLUST else 0)
            if not vnislocked and not unlocked:
                VOP_UNLOCK(vn)

    if result == 0:
        got = wanted - uio.resid
        if wanted and got == 0:
            result = errno.EIO
        elif rw == UIO_WRITE and got < wanted:
            result = errno.EIO  # bytes left unwritten: the pages must stay dirty
        elif rw == UIO_READ and got < npages * vm.page_size:
            _zero_from(kva, got)
    if rw == UIO_READ:
        vm.uvmexp.read_ios += 1
        vm.uvmexp.pageins += npages
    else:
        vm.uvmexp.write_ios += 1
        vm.uvmexp.pageouts += npages

    uvm_pagermapout(vm.pager_map)
    mtime = _mtime_of(vn) if rw == UIO_WRITE and result == 0 else None

    lock.rw_enter(RW_WRITE)
    uvn.u_nio -= 1
    if uvn.u_flags & UVM_VNODE_IOSYNC and uvn.u_nio == 0:
        wakeup((uvn, "u_nio"))
    if mtime is not None:
        uvn.u_mtime_ns = mtime  # our write's, not another program's (uvm_vnp_wrote)

    if result == 0:
        return VM_PAGER_OK
    if result == errno.EBUSY:
        KASSERT(flags & PGO_NOWAIT, "uvn_io: EBUSY without PGO_NOWAIT")
        return VM_PAGER_AGAIN
    curproc().p_errno = result
    if rw == UIO_WRITE:
        # every write-back (flush, sync, the page daemon) comes through here
        uvn_record_error(uvn, result)
    return VM_PAGER_ERROR


def _zero_from(iov: list[memoryview], start: int) -> None:
    """Zero the frames of *iov* from byte *start* of the transfer on."""
    for frame in iov:
        if start < len(frame):
            frame[start:] = bytes(len(frame) - start)
        start = max(0, start - len(frame))


def _uvn_io_start(uvn: UvmVnode, pps: list[VmPage], kva: list[memoryview]) -> int:
    """Start writing *pps* on the aio daemon; uvn_aiodone finishes them.

    => caller holds the object lock (kept); the pages are busy and mapped in.
    """
    vn = uvn.u_vnode
    uvn.u_nio += 1
    # the pages are busy, so neither their offsets nor u_size's effect on
    # them change before the write runs
    wanted = min(len(pps) * uvn.vm.page_size, uvn.u_size - pps[0].offset)
    uio = Uio(list(kva), pps[0].offset, wanted, UIO_WRITE)

    def io() -> int:
        error = VOP_STRATEGY(vn, uio) or (errno.EIO if uio.resid else 0)
        if not error:
            uvm_vnp_wrote(vn)
        return error

    uvn.vm.aiodaemon.start(UvmAioDesc(uvn, pps, io, uvn_aiodone))  # type: ignore[union-attr]
    return VM_PAGER_PEND


@traced
def uvn_aiodone(desc: UvmAioDesc) -> None:
    """Finish an asynchronous write, as the seed's comment designs it.

    Drops u_nio (waking IOSYNC sleepers), unbusies the pages (waking their
    waiters), marks them clean, and frees those released meanwhile.  On an
    error the pages stay dirty and resident, released or not, and the error
    is recorded exactly as a synchronous write records it.

    => runs on the aio daemon; takes the object lock.
    """
    uvn = _uvn(desc.uobj)
    vm = uvn.vm
    uvm_pagermapout(vm.pager_map)
    vm.uvmexp.write_ios += 1
    vm.uvmexp.pageouts += len(desc.pps)
    dead: list[VmPage] = []
    with uvn.vmobjlock:
        if desc.error:
            uvn_record_error(uvn, desc.error)
        for pg in desc.pps:
            pager_unbusy(pg)
            if desc.error:
                pg.pg_flags &= ~PG_RELEASED
                continue
            # write-protected and busy while written: no store can have raced
            pg.pg_flags |= PG_CLEAN | PG_CLEANCHK
            pmap_clear_modify(pg)
            if pg.pg_flags & PG_RELEASED:
                pmap_page_protect(pg, PROT_NONE)
                with vm.pageqlock:
                    uvm_pageclean(pg)
                dead.append(pg)
        uvn.u_nio -= 1
        if uvn.u_flags & UVM_VNODE_IOSYNC and uvn.u_nio == 0:
            wakeup((uvn, "u_nio"))
    uvm_pglistfree(dead)
    if vm.npages_free_low():  # the daemon's pageouts are clean now: free them
        wakeup(vm.pagedaemon_chan)


@gated
@traced
def uvm_vnp_uncache(vp: Vnode) -> bool:
    """Stop *vp*'s object from persisting; kill it now if it persists.

    Returns True if no object is active any more (none was, or we killed
    it), False if it still has references (it dies on its last detach).

    => caller holds the vnode lock; we drop it while the object dies.
    """
    uvn: UvmVnode = vp.v_uvm
    lock = uvn.vmobjlock
    lock.rw_enter(RW_WRITE)
    if not uvn.u_flags & UVM_VNODE_VALID or uvn.u_flags & UVM_VNODE_BLOCKED:
        lock.rw_exit()
        return True

    uvn_set_flags(uvn, uvn.u_flags & ~UVM_VNODE_CANPERSIST)
    if uvn.uo_refs:
        lock.rw_exit()
        return False

    # persisting: take a reference so that uvn_detach can kill it
    vref(vp)
    uvn.uo_refs += 1
    lock.rw_exit()

    VOP_UNLOCK(vp)
    uvn_detach(uvn)
    vn_lock(vp, LK_EXCLUSIVE | LK_RETRY)
    return True


@gated
@traced
def uvm_vnp_setsize(vp: Vnode, newsize: int) -> None:
    """Tell the pager that *vp* is now *newsize* bytes long.

    Growing changes only the size.  Shrinking frees the pages wholly past
    the new end, dirty or not, and zeroes the tail of the page that holds
    the new end, keeping the bytes before it.

    => caller holds the kernel lock and a reference to *vp*.
    """
    KASSERT(kernel_lock.held(), "uvm_vnp_setsize: kernel lock not held")
    uvn: UvmVnode = vp.v_uvm
    lock = uvn.vmobjlock
    lock.rw_enter(RW_WRITE)
    if uvn.u_flags & UVM_VNODE_VALID:
        if uvn.u_size > newsize:
            vm = uvn.vm
            uvn_flush(uvn, vm.round_page(newsize), uvn.u_size, PGO_FREE)
            _zero_tail(uvn, newsize)
        uvn.u_size = newsize
        uvn.vm.frames.setsize(uvn, newsize)  # the uffd machine's memfd follows the object
    lock.rw_exit()


def _zero_tail(uvn: UvmVnode, newsize: int) -> None:
    """Zero the page holding *newsize* from there to its end.

    => caller holds the object lock; we may drop it to wait for the page.
    """
    vm = uvn.vm
    keep = newsize - vm.trunc_page(newsize)
    if keep == 0:
        return
    while True:
        pg = uvm_pagelookup(uvn, vm.trunc_page(newsize))
        if pg is None:
            return
        if not pg.pg_flags & PG_BUSY:
            break
        uvm_pagewait(pg, uvn.vmobjlock, "uvn_shrink")
        uvn.vmobjlock.rw_enter(RW_WRITE)
    with vm.pmap_lock:  # no store through a mapping may interleave
        pg.data[keep:] = bytes(vm.page_size - keep)


@gated
def uvm_vnp_revalidate(vp: Vnode, drop_stale: bool) -> int:
    """Bring the pager's idea of *vp*'s file up to date with the file itself.

    A size changed behind the pager's back (the file truncated or extended
    by someone else) goes through uvm_vnp_setsize, so the pages past a new
    end are tossed and touching them is a bus error.  With *drop_stale*
    (an attach that found a persisting object: close-to-open consistency),
    a size or mtime other than the recorded ones means the pages may be
    stale: dirty ones are written back, all are freed, and the new mtime is
    recorded.  Returns 0 or the errno of VOP_GETATTR.

    => caller holds a reference to the object and no VM lock.
    """
    uvn: UvmVnode = vp.v_uvm
    vattr = Vattr()
    error = VOP_GETATTR(vp, vattr)
    if error:
        return error
    if drop_stale and (vattr.va_size, vattr.va_mtime_ns) != (uvn.u_size, uvn.u_mtime_ns):
        with uvn.vmobjlock:
            uvn_flush(uvn, 0, 0, PGO_CLEANIT | PGO_FREE | PGO_SYNCIO | PGO_ALLPAGES)
            uvn.u_mtime_ns = vattr.va_mtime_ns
    if vattr.va_size != uvn.u_size:
        with kernel_lock:
            uvm_vnp_setsize(vp, vattr.va_size)
    return 0


def uvm_vnp_wrote(vp: Vnode) -> None:
    """Record the file's mtime after a write of ours.

    Our own writes change the mtime too; without this, the next attach of
    the persisting object would take them for someone else's and drop the
    pages.  Every write-back (uvn_io, and the asynchronous ones as they
    finish) records it; a front end that writes the file by other means
    calls this.  (A write by someone else in between goes unnoticed, as it
    does with NFS.)  => caller holds a reference to the object and no VM lock.
    """
    uvn: UvmVnode = vp.v_uvm
    mtime = _mtime_of(vp)
    if mtime is not None:
        with uvn.vmobjlock:
            uvn.u_mtime_ns = mtime


def _mtime_of(vp: Vnode) -> int | None:
    """The file's mtime, or None if its attributes cannot be had."""
    vattr = Vattr()
    return vattr.va_mtime_ns if VOP_GETATTR(vp, vattr) == 0 else None


@gated
@traced
def uvm_vnp_sync(vm: VM, mp: object = None) -> None:
    """Write every dirty page of the writeable objects back (sync(2)).

    With *mp*, only the objects of vnodes on that mount.  One sync runs at
    a time.  Objects that are blocked (dying) are skipped: they are being
    flushed already.  An object that is clean afterwards and used only by
    us leaves the writeable list, so later syncs skip it.

    => caller holds no VM lock.
    """
    vm.uvn_sync_lock.rw_enter(RW_WRITE)
    with vm.uvn_wlist_lock:
        candidates = list(vm.uvn_wlist)
    sync_q: list[UvmVnode] = []
    for uvn in candidates:
        vp = uvn.u_vnode
        if mp is not None and vp.v_mount is not mp:
            continue
        with uvn.vmobjlock:
            if uvn.u_flags & UVM_VNODE_BLOCKED or not uvn.u_flags & UVM_VNODE_WRITEABLE:
                continue
            if uvn.uo_refs == 0:
                vref(vp)  # persisting: regain the vnode reference
            uvn.uo_refs += 1
        sync_q.append(uvn)

    for uvn in sync_q:
        with uvn.vmobjlock:
            if DEBUG and uvn.u_flags & UVM_VNODE_DYING:
                log.debug("uvm_vnp_sync: dying vnode on sync list")
            # PGO_SYNCIO (not in the seed): a returned sync has written
            clean = uvn_flush(uvn, 0, 0, PGO_CLEANIT | PGO_ALLPAGES | PGO_DOACTCLUST | PGO_SYNCIO)
            if clean and uvn.uo_refs == 1 and uvn.u_flags & UVM_VNODE_WRITEABLE:
                _wlist_remove(uvn)
        uvn_detach(uvn)

    vm.uvn_sync_lock.rw_exit()


uvm_vnodeops: Final = UvmPagerOps(
    pgo_init=uvn_init,
    pgo_reference=uvn_reference,
    pgo_detach=uvn_detach,
    pgo_flush=uvn_flush,
    pgo_get=uvn_get,
    pgo_put=uvn_put,
    pgo_cluster=uvn_cluster,
    pgo_mk_pcluster=uvm_mk_pcluster,
)
