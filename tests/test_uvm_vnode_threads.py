"""Two threads meeting at each of the pager's waits.

Each test parks one thread at a known point (a Gate inside the filesystem,
or a page or lock the test holds), checks that the other thread sleeps
where the seed makes it sleep, then lets both finish.  Every wait is
bounded (helpers.WAIT) and every thread is joined with a timeout.
"""

from __future__ import annotations

import errno

from helpers import (
    PS,
    RW,
    Gate,
    ProgFS,
    Runner,
    contents,
    flush,
    get_busy,
    getpages,
    mkfile,
    pattern,
    progfs,
    start,
    store,
    unbusy,
    wait_blocked,
    wait_sleeping,
)
from vnpager import VM
from vnpager.kern.lock import LK_EXCLUSIVE, kernel_lock
from vnpager.kern.proc import curproc
from vnpager.uvm.pmap import Pmap
from vnpager.uvm.uvm_page import PG_CLEAN, VmPage
from vnpager.uvm.uvm_pager import (
    PGO_ALLPAGES,
    PGO_CLEANIT,
    PGO_FREE,
    PGO_SYNCIO,
    VM_PAGER_ERROR,
    VM_PAGER_OK,
)
from vnpager.uvm.uvm_param import PROT_READ
from vnpager.uvm.uvm_vnode import (
    UVM_VNODE_ALOCK,
    UVM_VNODE_CANPERSIST,
    UVM_VNODE_DYING,
    UVM_VNODE_IOSYNC,
    UVM_VNODE_VALID,
    UVM_VNODE_VNISLOCKED,
    UvmVnode,
    uvm_vnp_setsize,
    uvm_vnp_sync,
    uvm_vnp_uncache,
    uvn_attach,
    uvn_detach,
)
from vnpager.vfs.memfs import memfs_create
from vnpager.vfs.mount import MNT_FORCE
from vnpager.vfs.vnode import Vnode, vn_lock

SYNC_FLUSH = PGO_CLEANIT | PGO_SYNCIO | PGO_ALLPAGES


def gated(vm: VM, npages: int, op: str, offset: int | None = None,
          prot: int = RW) -> tuple[ProgFS, Vnode, UvmVnode, Gate, list[VmPage]]:
    """A progfs file with every page resident, and a gate on *op* at *offset*."""
    fs, mp = progfs(vm)
    vp, uvn = mkfile(vm, pattern(npages), mp=mp, prot=prot)
    pgs = getpages(uvn, 0, npages)
    gate = Gate(op, offset)
    fs.hooks.append(gate)
    return fs, vp, uvn, gate, pgs


def dying_in_write(vm: VM, data: bytes) -> tuple[Vnode, UvmVnode, Gate, Runner]:
    """An uncached object whose last detach is held in writing *data* (page 1)."""
    _, vp, uvn, gate, pgs = gated(vm, 2, "write")
    store(Pmap(vm), pgs[1], data)
    uvm_vnp_uncache(vp)
    dying = start(lambda: uvn_detach(uvn), "detach")
    gate.wait_entered()
    return vp, uvn, gate, dying


def test_uvn_attach_waits_while_another_attach_holds_alock(vm: VM) -> None:
    fs, mp = progfs(vm)
    vp = memfs_create(vm.vfs, mp, pattern(1))
    gate = Gate("getattr")
    fs.hooks.append(gate)
    first = start(lambda: uvn_attach(vp, PROT_READ), "first")
    gate.wait_entered()
    assert vp.v_uvm.u_flags == UVM_VNODE_ALOCK
    second = start(lambda: uvn_attach(vp, PROT_READ), "second")
    wait_sleeping("uvn_attach")
    gate.open()
    assert first.join_ok() is vp.v_uvm and second.join_ok() is vp.v_uvm
    assert vp.v_uvm.uo_refs == 2 and gate.passed == 1  # the second found it VALID


def test_uvn_attach_getattr_failure_wakes_waiters(vm: VM) -> None:
    fs, mp = progfs(vm)
    vp = memfs_create(vm.vfs, mp, pattern(1))
    gate = Gate("getattr")
    fails = [errno.EIO]
    fs.hooks += [gate, lambda op, _vp, _uio: fails.pop() if op == "getattr" and fails else 0]
    first = start(lambda: uvn_attach(vp, PROT_READ), "first")
    gate.wait_entered()
    second = start(lambda: uvn_attach(vp, PROT_READ), "second")
    wait_sleeping("uvn_attach")
    gate.open()
    assert first.join_ok() is None
    assert second.join_ok() is vp.v_uvm  # woken, it asked for the attributes itself
    assert vp.v_uvm.uo_refs == 1 and gate.passed == 2


def test_uvn_attach_waits_for_dying_object(vm: VM) -> None:
    vp, uvn, gate, dying = dying_in_write(vm, b"last")
    assert uvn.u_flags & UVM_VNODE_DYING
    attacher = start(lambda: uvn_attach(vp, PROT_READ), "attach")
    wait_sleeping("uvn_attach")
    gate.open()
    dying.join_ok()
    assert attacher.join_ok() is uvn
    # a new life: valid, persisting again, and the old pages were written and freed
    assert uvn.u_flags == UVM_VNODE_VALID | UVM_VNODE_CANPERSIST and uvn.uo_refs == 1
    assert uvn.uo_npages == 0 and contents(vp)[PS:PS + 4] == b"last"


def test_uvn_get_waits_for_busy_page(vm: VM) -> None:
    fs, mp = progfs(vm)
    _, uvn = mkfile(vm, pattern(1), mp=mp)
    gate = Gate("read")
    fs.hooks.append(gate)
    first = start(lambda: get_busy(uvn, 0, 1), "first")
    gate.wait_entered()
    second = start(lambda: get_busy(uvn, 0, 1), "second")
    wait_sleeping("uvn_get")
    gate.open()
    result, pps = first.join_ok()
    assert result == VM_PAGER_OK
    unbusy(uvn, pps)
    result2, pps2 = second.join_ok()
    assert result2 == VM_PAGER_OK and pps2 == pps
    unbusy(uvn, pps2)
    assert vm.uvmexp.read_ios == 1  # the second found the page read


def test_uvn_get_read_error_wakes_page_waiter(vm: VM) -> None:
    fs, mp = progfs(vm)
    _, uvn = mkfile(vm, pattern(1), mp=mp)
    gate = Gate("read")
    fs.hooks.append(gate)
    fs.fail["read"] = errno.EIO
    first = start(lambda: get_busy(uvn, 0, 1), "first")
    gate.wait_entered()
    second = start(lambda: get_busy(uvn, 0, 1), "second")
    wait_sleeping("uvn_get")
    gate.open()
    assert first.join_ok()[0] == VM_PAGER_ERROR
    assert second.join_ok()[0] == VM_PAGER_ERROR  # woken, it tried the read itself
    assert gate.passed == 2 and uvn.uo_npages == 0


def iosync_in_progress(vm: VM) -> tuple[ProgFS, UvmVnode, Gate, Runner, Runner]:
    """A write of page 0 held at the gate, and a SYNCIO flush waiting for it
    (so UVM_VNODE_IOSYNC is set)."""
    fs, _, uvn, gate, pgs = gated(vm, 3, "write", offset=0)
    pm = Pmap(vm)
    store(pm, pgs[0], b"zero")
    writer = start(lambda: flush(uvn, 0, PS, PGO_CLEANIT | PGO_SYNCIO), "writer")
    gate.wait_entered()
    syncer = start(lambda: flush(uvn, 0, PS, PGO_CLEANIT | PGO_SYNCIO), "syncer")
    wait_sleeping("uvn_flush")
    assert uvn.u_flags & UVM_VNODE_IOSYNC
    store(pm, pgs[1], b"one!")
    return fs, uvn, gate, writer, syncer


def test_uvn_io_iosync_makes_new_io_wait(vm: VM) -> None:
    fs, uvn, gate, writer, syncer = iosync_in_progress(vm)
    flush(uvn, 2 * PS, 3 * PS, PGO_FREE)  # page 2 must be read again
    before = len(fs.calls)
    reader = start(lambda: get_busy(uvn, 2 * PS, 1), "reader")
    wait_sleeping("uvn_iosync")
    assert fs.calls[before:] == []  # the read waits for the write to finish
    gate.open()
    assert writer.join_ok() and syncer.join_ok()
    result, pps = reader.join_ok()
    assert result == VM_PAGER_OK
    unbusy(uvn, pps)
    # the write's completion looks up the mtime it gave the file (getattr)
    assert [c for c in fs.calls[before:] if c[0] != "getattr"] == [("read", 2 * PS, PS)]
    assert not uvn.u_flags & UVM_VNODE_IOSYNC


def test_uvn_flush_again_under_iosync_retries_with_syncio(vm: VM) -> None:
    fs, uvn, gate, writer, syncer = iosync_in_progress(vm)
    # no PGO_SYNCIO: uvn_io says AGAIN, and the flush retries synchronously
    async_flush = start(lambda: flush(uvn, PS, 2 * PS, PGO_CLEANIT), "async")
    wait_sleeping("uvn_iosync")
    gate.open()
    assert writer.join_ok() and syncer.join_ok() and async_flush.join_ok() is True
    assert ("write", PS, PS) in fs.calls


def test_uvn_io_write_waits_for_vnode_lock(vm: VM) -> None:
    vp, uvn = mkfile(vm, pattern(1))
    store(Pmap(vm), getpages(uvn, 0, 1)[0], b"wait")
    assert vn_lock(vp, LK_EXCLUSIVE) == 0  # a read(2) in progress, say
    flusher = start(lambda: flush(uvn, 0, 0, SYNC_FLUSH), "flusher")
    wait_blocked(flusher, "lock")
    vp.v_lock.unlock()
    assert flusher.join_ok() is True and contents(vp)[:4] == b"wait"


def test_uvm_vnp_sync_one_syncer_at_a_time(vm: VM) -> None:
    fs, vp, _, gate, pgs = gated(vm, 2, "write")
    store(Pmap(vm), pgs[0], b"sync")
    first = start(lambda: uvm_vnp_sync(vm), "sync1")
    gate.wait_entered()
    second = start(lambda: uvm_vnp_sync(vm), "sync2")
    wait_blocked(second, "rw_enter")
    assert [c[0] for c in fs.calls].count("write") == 1
    gate.open()
    first.join_ok()
    second.join_ok()
    assert [c[0] for c in fs.calls].count("write") == 1  # the second found it clean
    assert contents(vp)[:4] == b"sync" and pgs[0].pg_flags & PG_CLEAN


def test_uvm_vnp_sync_skips_dying_object(vm: VM) -> None:
    vp, uvn, gate, dying = dying_in_write(vm, b"dies")
    syncer = start(lambda: uvm_vnp_sync(vm), "sync")
    syncer.join_ok()  # does not wait for the dying object, nor touch it
    assert uvn.uo_refs == 0 and uvn.u_flags & UVM_VNODE_DYING
    gate.open()
    dying.join_ok()
    assert uvn.u_flags == 0 and contents(vp)[PS:PS + 4] == b"dies"


def test_uvm_vnp_setsize_waits_for_busy_partial_page(vm: VM) -> None:
    vp, uvn = mkfile(vm, pattern(2))
    result, pps = get_busy(uvn, PS, 1)
    assert result == VM_PAGER_OK

    def shrink() -> None:
        with kernel_lock:
            uvm_vnp_setsize(vp, PS + 10)

    shrinker = start(shrink, "shrink")
    wait_sleeping("uvn_shrink")
    unbusy(uvn, pps)
    shrinker.join_ok()
    pg = pps[0]
    assert isinstance(pg, VmPage)
    assert bytes(pg.data[:10]) == b"\x02" * 10 and bytes(pg.data[10:]) == bytes(PS - 10)
    assert uvn.u_size == PS + 10


def forced_unmount_in_write(vm: VM, npages: int, dirty: tuple[int, ...]
                            ) -> tuple[Vnode, UvmVnode, Gate, Runner, list[VmPage]]:
    """A forced unmount stopped in terminate's write-back of page 1.

    The object is mapped read-only as far as sync knows (not on the
    writeable list), so the dirty page is first written by terminate.
    """
    fs, mp = progfs(vm)
    vp, uvn = mkfile(vm, pattern(npages), mp=mp, prot=PROT_READ)
    pgs = getpages(uvn, 0, npages)
    pm = Pmap(vm)
    for i in dirty:
        store(pm, pgs[i], b"page%d" % i)
    gate = Gate("write", offset=PS, when=lambda: uvn.u_flags & UVM_VNODE_VNISLOCKED)
    fs.hooks.append(gate)
    unmount = start(lambda: vm.vfs.dounmount(mp, MNT_FORCE), "umount -f")
    gate.wait_entered()
    return vp, uvn, gate, unmount, pgs


def test_uvm_vnp_terminate_concurrent_read_fails_without_touching_vnode(vm: VM) -> None:
    _, uvn, gate, unmount, _ = forced_unmount_in_write(vm, 2, dirty=(1,))
    with uvn.vmobjlock:  # page 0 went already; a fault wants it back
        assert uvn.uo_npages == 1
    result, pps = get_busy(uvn, 0, 1)
    assert result == VM_PAGER_ERROR and curproc().p_errno == errno.EIO and pps == [None]
    gate.open()
    assert unmount.join_ok() == 0
    assert uvn.uo_npages == 0 and uvn.u_flags & UVM_VNODE_VALID and uvn.uo_refs == 1


def test_uvm_vnp_terminate_concurrent_flush_fails_and_terminate_writes(vm: VM) -> None:
    vp, uvn, gate, unmount, pgs = forced_unmount_in_write(vm, 4, dirty=(1, 3))
    data = vp.v_data.data
    assert flush(uvn, 3 * PS, 4 * PS, PGO_CLEANIT) is False  # msync during umount -f
    assert not pgs[3].pg_flags & PG_CLEAN  # still dirty: terminate writes it
    gate.open()
    assert unmount.join_ok() == 0
    assert data.pread(PS, 5) == b"page1" and data.pread(3 * PS, 5) == b"page3"
    assert vm.uvmexp.lostpages == 0



def test_uvn_detach_keeping_unwritable_pages_wakes_attacher(vm: VM) -> None:
    fs, vp, uvn, gate, pgs = gated(vm, 1, "write")
    store(Pmap(vm), pgs[0], b"full")
    fs.fail["write"] = errno.ENOSPC
    uvm_vnp_uncache(vp)
    dying = start(lambda: uvn_detach(uvn), "detach")
    gate.wait_entered()
    attacher = start(lambda: uvn_attach(vp, PROT_READ), "attach")
    wait_sleeping("uvn_attach")
    gate.open()
    dying.join_ok()
    # the object kept its dirty page, so the attacher finds it, page and all
    assert attacher.join_ok() is uvn and list(uvn.memt.values()) == pgs
    assert uvn.uo_refs == 1 and uvn.u_error == errno.ENOSPC


def test_uvm_vnp_terminate_wakes_attacher_of_dead_object(vm: VM) -> None:
    vp, uvn, gate, unmount, _ = forced_unmount_in_write(vm, 2, dirty=(1,))
    attacher = start(lambda: uvn_attach(vp, PROT_READ), "attach")
    wait_sleeping("uvn_attach")
    gate.open()
    assert unmount.join_ok() == 0
    assert attacher.join_ok() is uvn and uvn.uo_refs == 2
    assert not uvn.u_flags & UVM_VNODE_CANPERSIST


def test_uvn_flush_wakes_waiter_on_page_it_wrote(vm: VM) -> None:
    _, vp, uvn, gate, pgs = gated(vm, 1, "write")
    store(Pmap(vm), pgs[0], b"wake")
    writer = start(lambda: flush(uvn, 0, 0, SYNC_FLUSH), "writer")
    gate.wait_entered()
    getter = start(lambda: get_busy(uvn, 0, 1), "getter")
    wait_sleeping("uvn_get")
    gate.open()
    assert writer.join_ok() is True
    result, pps = getter.join_ok()
    assert result == VM_PAGER_OK and pps == pgs
    unbusy(uvn, pgs)
    assert contents(vp)[:4] == b"wake"
