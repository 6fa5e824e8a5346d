"""kern: sleep and wakeup, rwsleep, locks and their panics."""

from __future__ import annotations

import errno
import threading

import pytest

from helpers import start, wait_blocked, wait_sleeping
from vnpager.kern.debug import KASSERT, Panic, panic
from vnpager.kern.lock import (
    LK_EXCLUSIVE,
    LK_NOWAIT,
    LK_RECURSEFAIL,
    RW_NOSLEEP,
    RW_READ,
    RW_WRITE,
    KernelLock,
    LockMgr,
    Mutex,
    RWLock,
    kernel_lock,
)
from vnpager.kern.synch import rwsleep, sleepers, tsleep, wakeup, wakeup_one


def test_tsleep_times_out_with_ewouldblock() -> None:
    assert tsleep(object(), "nobody", timeout=0.01) == errno.EWOULDBLOCK
    assert "nobody" not in sleepers().values()


def test_wakeup_wakes_every_sleeper_and_only_its_channel() -> None:
    chan, other = ("c", 1), ("c", 2)
    sleepers_ = [start(lambda: tsleep(chan, "wk"), f"s{i}") for i in range(3)]
    bystander = start(lambda: tsleep(other, "other"), "bystander")
    wait_sleeping("wk", count=3)
    wait_sleeping("other")
    wakeup(chan)
    assert [t.join_ok() for t in sleepers_] == [0, 0, 0]
    assert bystander.is_alive()
    wakeup(other)
    assert bystander.join_ok() == 0


def test_wakeup_one_wakes_the_oldest_sleeper() -> None:
    chan = object()
    first = start(lambda: tsleep(chan, "one"), "first")
    wait_sleeping("one")
    second = start(lambda: tsleep(chan, "one"), "second")
    wait_sleeping("one", count=2)
    wakeup_one(chan)
    assert first.join_ok() == 0 and second.is_alive()
    wakeup_one(chan)
    assert second.join_ok() == 0
    wakeup_one(chan)  # nobody left: nothing happens


def test_rwsleep_no_lost_wakeup_and_relocks() -> None:
    lock = Mutex("interlock")
    state = {"ready": False}
    chan = object()

    def waiter() -> bool:
        with lock:
            while not state["ready"]:
                rwsleep(chan, lock, "cond")
            return lock.held()

    t = start(waiter, "waiter")
    wait_sleeping("cond")
    with lock:  # we get the interlock only once the waiter is queued
        state["ready"] = True
        wakeup(chan)
    assert t.join_ok() is True


def test_rwsleep_norelock_and_timeout() -> None:
    lock = RWLock("obj")
    lock.enter()
    assert rwsleep(object(), lock, "nr", timeout=0.01, relock=False) == errno.EWOULDBLOCK
    assert not lock.rw_lock_held()


def test_sleep_lets_go_of_kernel_lock() -> None:
    chan = object()

    def sleeper() -> bool:
        with kernel_lock:
            tsleep(chan, "klock")
            return kernel_lock.held()

    t = start(sleeper, "sleeper")
    wait_sleeping("klock")
    with kernel_lock:  # free while the sleeper sleeps
        wakeup(chan)
    assert t.join_ok() is True


def test_rwlock_readers_share_writers_exclude() -> None:
    lock = RWLock("rw")
    assert lock.rw_enter(RW_READ) and lock.rw_enter(RW_READ)
    assert lock.rw_lock_held() and not lock.rw_write_held()
    assert lock.rw_enter(RW_WRITE | RW_NOSLEEP) is False
    writer = start(lambda: lock.rw_enter(RW_WRITE) and lock.rw_exit(), "writer")
    wait_blocked(writer, "rw_enter")
    lock.rw_exit()
    lock.rw_exit()
    writer.join_ok()
    with pytest.raises(Panic, match="not held"):
        lock.rw_exit()


def test_rwlock_recursion_and_foreign_exit_panic() -> None:
    lock = RWLock("rw")
    lock.enter()
    with pytest.raises(Panic, match="locking against myself"):
        lock.rw_enter(RW_WRITE)
    with pytest.raises(Panic, match="not held by me"):
        start(lock.rw_exit, "intruder").join_ok()
    lock.exit()


def test_mutex_recursion_and_foreign_exit_panic() -> None:
    mtx = Mutex("m")
    with mtx:
        assert mtx.held()
        with pytest.raises(Panic, match="locking against myself"):
            mtx.enter()
        with pytest.raises(Panic, match="not held by me"):
            start(mtx.exit, "intruder").join_ok()
    assert not mtx.held()


def test_kernel_lock_is_recursive() -> None:
    klock = KernelLock()
    with klock, klock:
        assert klock.held()
    assert not klock.held()
    with pytest.raises(Panic, match="KERNEL_UNLOCK"):
        klock.exit()


def test_lockmgr_edeadlk_ebusy_and_waiting() -> None:
    lk = LockMgr("vnode")
    assert lk.lock(LK_EXCLUSIVE) == 0 and lk.held() and lk.locked()
    assert lk.lock(LK_EXCLUSIVE | LK_RECURSEFAIL) == errno.EDEADLK
    with pytest.raises(Panic, match="locking against myself"):
        lk.lock(LK_EXCLUSIVE)
    assert start(lambda: lk.lock(LK_EXCLUSIVE | LK_NOWAIT), "nowait").join_ok() == errno.EBUSY
    got = threading.Event()

    def waiter() -> None:
        assert lk.lock(LK_EXCLUSIVE) == 0
        got.set()
        lk.unlock()

    t = start(waiter, "waiter")
    wait_blocked(t, "lock")
    assert not got.is_set()
    lk.unlock()
    t.join_ok()
    assert got.is_set() and not lk.locked()
    with pytest.raises(Panic, match="unlock not held"):
        lk.unlock()


def test_kassert_and_panic() -> None:
    KASSERT(True)
    with pytest.raises(Panic, match="boom"):
        KASSERT(False, "boom")
    with pytest.raises(Panic, match="bang"):
        panic("bang")
