"""Typed ``statistics()`` of the kern locks, the aio daemon, the pager map
and the page daemon: frozen snapshots of who holds, who waits, what runs."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from vnpager import VM
from vnpager.kern.lock import RW_READ, RW_WRITE, KernelLock, LockMgr, Mutex, RWLock
from vnpager.uvm.uvm_pager import (
    UVMPAGER_MAPIN_WAITOK,
    AioDaemon,
    PagerMap,
    UvmAioDesc,
    uvm_pagermapin,
    uvm_pagermapout,
)

WAIT = 10.0  # seconds for a thread to reach the state looked for


def _until(cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, "the thread never got there"
        time.sleep(0.001)


def _thread(target: Callable[[], Any]) -> threading.Thread:
    t = threading.Thread(target=target, name="waiter", daemon=True)
    t.start()
    return t


def test_rwlock_owner_readers_and_waiters() -> None:
    lock = RWLock("obj")
    assert lock.statistics() == type(lock.statistics())("obj", False, None, 0, 0)
    lock.rw_enter(RW_READ)
    lock.rw_enter(RW_READ)
    writer = _thread(lambda: (lock.rw_enter(RW_WRITE), lock.rw_exit()))
    _until(lambda: lock.statistics().waiters == 1)
    stats = lock.statistics()
    assert stats.locked and stats.readers == 2 and stats.owner is None  # readers have no owner
    lock.rw_exit()
    lock.rw_exit()
    writer.join(WAIT)
    assert not writer.is_alive() and lock.statistics().waiters == 0
    lock.rw_enter(RW_WRITE)
    assert lock.statistics().owner == threading.current_thread().name
    lock.rw_exit()
    with pytest.raises(dataclasses.FrozenInstanceError):
        lock.statistics().locked = True  # type: ignore[misc]


def test_mutex_and_kernel_lock_owner_and_depth() -> None:
    mtx, big = Mutex("pageq"), KernelLock()
    assert not mtx.statistics().locked and mtx.statistics().waiters is None
    with mtx:
        assert mtx.statistics().owner == threading.current_thread().name
    with big, big:
        stats = big.statistics()
        assert stats.locked and stats.depth == 2 and stats.owner == threading.current_thread().name
    assert big.statistics().depth == 0 and big.statistics().owner is None


def test_lockmgr_waiters() -> None:
    vlock = LockMgr("vnode")
    assert vlock.lock() == 0
    other = _thread(lambda: (vlock.lock(), vlock.unlock()))
    _until(lambda: vlock.statistics().waiters == 1)
    assert vlock.statistics().owner == threading.current_thread().name
    vlock.unlock()
    other.join(WAIT)
    assert not other.is_alive() and vlock.statistics() == type(vlock.statistics())("vnode", False, None, 0, 0)


def test_aio_daemon_workers_and_pending() -> None:
    daemon = AioDaemon(nworkers=2, idle=0.1)
    go = threading.Event()
    desc = UvmAioDesc(None, [], lambda: 0 if go.wait(WAIT) else 1, lambda d: None)  # type: ignore[arg-type]
    daemon.start(desc)
    stats = daemon.statistics()
    assert stats.pending == 1 and stats.workers == 1 and stats.max_workers == 2 and stats.failures == 0
    go.set()
    daemon.drain()
    assert daemon.statistics().pending == 0 and daemon.statistics().queued == 0
    _until(lambda: daemon.statistics().workers == 0)  # idle workers go


def test_pager_map_slots_and_waiters() -> None:
    pmap = PagerMap(1)
    assert uvm_pagermapin(pmap, [], UVMPAGER_MAPIN_WAITOK) == []
    waiter = _thread(lambda: (uvm_pagermapin(pmap, [], UVMPAGER_MAPIN_WAITOK), uvm_pagermapout(pmap)))
    _until(lambda: pmap.statistics().waiters == 1)
    assert pmap.statistics() == type(pmap.statistics())(1, 1, 1)
    uvm_pagermapout(pmap)
    waiter.join(WAIT)
    assert not waiter.is_alive() and pmap.statistics() == type(pmap.statistics())(1, 0, 0)


def test_page_daemon_state_and_counters() -> None:
    vm = VM(physmem="256K")
    daemon = vm.pagedaemon
    assert daemon is not None
    stats = daemon.statistics()
    assert stats.running and (stats.wakeups, stats.freed, stats.pageouts) == (
        vm.uvmexp.pdwoke, vm.uvmexp.pdfreed, vm.uvmexp.pdpageouts)
    vm.close()
    assert not daemon.statistics().running
