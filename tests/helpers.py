"""Set-up shared by the pager tests: files, pages, a scriptable filesystem
and bounded thread helpers."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from vnpager import VM
from vnpager.kern.lock import RW_WRITE
from vnpager.kern.synch import sleepers
from vnpager.uvm.pmap import Pmap, pmap_enter
from vnpager.uvm.uvm_page import VmPage, uvm_page_unbusy, uvm_pageactivate
from vnpager.uvm.uvm_pager import PGO_ALLPAGES, VM_PAGER_OK, PageSlot
from vnpager.uvm.uvm_param import PROT_READ, PROT_WRITE
from vnpager.uvm.uvm_vnode import UvmVnode, uvn_attach, uvn_flush, uvn_get
from vnpager.vfs.memfs import MemFS, memfs_create
from vnpager.vfs.mount import Mount
from vnpager.vfs.vnode import Uio, Vnode

PS = 4096
RW = PROT_READ | PROT_WRITE
WAIT = 30.0  # seconds: a bound on every wait, never a measure of anything

IoHook = Callable[[str, Vnode, Uio | None], int]


def pattern(npages: int, tail: int = 0) -> bytes:
    """File contents where each page is recognisable: page i is full of i+1."""
    return b"".join(bytes([i + 1]) * PS for i in range(npages)) + bytes([0xEE]) * tail


# ---------------------------------------------------------------- filesystems

class ProgFS(MemFS):
    """memfs whose reads and writes can be made to fail or stop on demand.

    ``fail[op] = errno`` fails every *op* ("read", "write", "getattr");
    each hook in ``hooks`` runs before the transfer and may block, or return
    an errno to fail it.  ``calls`` records (op, offset, bytes) of each I/O.
    """

    name = "progfs"

    def __init__(self) -> None:
        self.fail: dict[str, int] = {}
        self.hooks: list[IoHook] = []
        self.write_limit: int | None = None  # write at most this many bytes, then stop short
        self.calls: list[tuple[str, int, int]] = []

    def getattr(self, vp: Vnode, vap: Any) -> int:
        return self._before("getattr", vp, None) or super().getattr(vp, vap)

    def _before(self, op: str, vp: Vnode, uio: Uio | None) -> int:
        self.calls.append((op, uio.offset, uio.resid) if uio else (op, -1, 0))
        for hook in list(self.hooks):
            error = hook(op, vp, uio)
            if error:
                return error
        return self.fail.get(op, 0)

    def read(self, vp: Vnode, uio: Uio, ioflag: int) -> int:
        return self._before("read", vp, uio) or super().read(vp, uio, ioflag)

    def write(self, vp: Vnode, uio: Uio, ioflag: int) -> int:
        error = self._before("write", vp, uio)
        if error or self.write_limit is None or uio.resid <= self.write_limit:
            return error or super().write(vp, uio, ioflag)
        short = uio.resid - self.write_limit
        uio.resid = self.write_limit
        error = super().write(vp, uio, ioflag)
        uio.resid += short
        return error


class Gate:
    """A ProgFS hook that holds matching I/Os until :meth:`open` is called."""

    def __init__(self, op: str, offset: int | None = None,
                 when: Callable[[], object] | None = None) -> None:
        self.op, self.offset, self.when = op, offset, when
        self.entered = threading.Event()
        self.released = threading.Event()
        self.passed = 0

    def __call__(self, op: str, vp: Vnode, uio: Uio | None) -> int:
        if (op == self.op and (self.offset is None or uio is None or uio.offset == self.offset)
                and (self.when is None or self.when())):
            self.entered.set()
            if not self.released.wait(WAIT):
                raise AssertionError("gate never opened")
            self.passed += 1
        return 0

    def wait_entered(self) -> None:
        assert self.entered.wait(WAIT), "no I/O reached the gate"

    def open(self) -> None:
        self.released.set()


def progfs(vm: VM) -> tuple[ProgFS, Mount]:
    fs = ProgFS()
    return fs, vm.vfs.mount(fs, f"progfs{id(fs)}")


# ---------------------------------------------------------------- objects

def machine(pages: int = 64, **kw: Any) -> VM:
    """A VM of *pages* pages with no page daemon: nothing runs but the test."""
    return VM(physmem=pages * PS, pagedaemon=False, **kw)


def mkfile(vm: VM, data: bytes = b"", prot: int = RW, mp: Mount | None = None,
           size: int | None = None) -> tuple[Vnode, UvmVnode]:
    """A memfs (or *mp*) file attached once.  The vnode has two references:
    the creator's and the object's."""
    vp = memfs_create(vm.vfs, mp or vm.memfs, data, size=size)
    uvn = uvn_attach(vp, prot)
    assert uvn is not None
    return vp, uvn


def contents(vp: Vnode) -> bytes:
    return bytes(vp.v_data.data)


def get_busy(uvn: UvmVnode, offset: int, npages: int, flags: int = PGO_ALLPAGES,
             centeridx: int = 0) -> tuple[int, list[PageSlot]]:
    """The unlocked pass of uvn_get: pages come back busy, object unlocked."""
    pps: list[PageSlot] = [None] * npages
    uvn.vmobjlock.rw_enter(RW_WRITE)
    result, _ = uvn_get(uvn, offset, pps, npages, centeridx, PROT_READ, 0, flags)
    return result, pps


def unbusy(uvn: UvmVnode, pgs: list[VmPage]) -> None:
    """What a fault does with the pages it got: activate and unbusy them."""
    with uvn.vmobjlock:
        with uvn.vm.pageqlock:
            for pg in pgs:
                uvm_pageactivate(pg)
        uvm_page_unbusy(pgs)


def getpages(uvn: UvmVnode, offset: int, npages: int) -> list[VmPage]:
    """Pages [offset, +npages) resident, active and not busy."""
    result, pps = get_busy(uvn, offset, npages)
    assert result == VM_PAGER_OK
    pgs = [pg for pg in pps if isinstance(pg, VmPage)]
    assert len(pgs) == npages
    unbusy(uvn, pgs)
    return pgs


def store(pmap: Pmap, pg: VmPage, data: bytes, at: int = 0) -> None:
    """A store through a writable mapping: the pmap marks the page modified."""
    pmap_enter(pmap, pg.offset, pg, RW, PROT_WRITE)
    pg.data[at:at + len(data)] = data


def dirty_progfs(vm: VM, npages: int, pages: tuple[int, ...], data: bytes = b"new%d"
                 ) -> tuple[ProgFS, Vnode, UvmVnode, list[VmPage]]:
    """A progfs file of *npages* resident pages, the pages at *pages* stored
    to (``data % i`` at the start of page i)."""
    fs, mp = progfs(vm)
    vp, uvn = mkfile(vm, pattern(npages), mp=mp)
    pgs = getpages(uvn, 0, npages)
    pm = Pmap(vm)
    for i in pages:
        store(pm, pgs[i], data % i if b"%" in data else data)
    return fs, vp, uvn, pgs


def flush(uvn: UvmVnode, start: int, stop: int, flags: int) -> bool:
    """uvn_flush, then wait for the asynchronous writes it started (without
    PGO_SYNCIO), so that the test sees their outcome."""
    with uvn.vmobjlock:
        ok = uvn_flush(uvn, start, stop, flags)
    if uvn.vm.aiodaemon is not None:
        uvn.vm.aiodaemon.drain()
    return ok


# ---------------------------------------------------------------- threads

class Runner(threading.Thread):
    """A thread that keeps its target's result or exception for join_ok()."""

    def __init__(self, fn: Callable[[], Any], name: str = "runner") -> None:
        super().__init__(name=name, daemon=True)
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # reported by join_ok
            self.error = e

    def join_ok(self, timeout: float = WAIT) -> Any:
        self.join(timeout)
        assert not self.is_alive(), f"{self.name} did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def start(fn: Callable[[], Any], name: str = "runner") -> Runner:
    t = Runner(fn, name)
    t.start()
    return t


def _stack_names(t: threading.Thread) -> list[str]:
    frame = sys._current_frames().get(t.ident or -1)
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return names


def wait_blocked(t: threading.Thread, fn: str) -> None:
    """Wait until *t* is blocked (waiting on a lock or event) inside *fn*.

    Polls the thread's stack: the innermost frame must be a wait, and *fn*
    must be on the stack.  Bounded by WAIT.
    """
    done = threading.Event()
    for _ in range(int(WAIT / 0.005)):
        names = _stack_names(t)
        if names and names[0] == "wait" and fn in names:
            return
        assert t.is_alive(), f"{t.name} finished without blocking in {fn}"
        done.wait(0.005)
    raise AssertionError(f"{t.name} never blocked in {fn}: {_stack_names(t)}")


def wait_sleeping(wmesg: str, count: int = 1) -> None:
    """Wait until *count* threads sleep (tsleep/rwsleep) with *wmesg*."""
    ev = threading.Event()
    for _ in range(int(WAIT / 0.005)):
        if list(sleepers().values()).count(wmesg) >= count:
            return
        ev.wait(0.005)
    raise AssertionError(f"no thread slept on {wmesg}: {sleepers()}")


def child_status(pid: int, timeout: float) -> int:
    """The exit code of forked child *pid*, waited for *timeout* seconds at
    most: a child still running then is killed and the test fails."""
    deadline = time.monotonic() + timeout
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("child hung")
    return os.waitstatus_to_exitcode(done[1])
