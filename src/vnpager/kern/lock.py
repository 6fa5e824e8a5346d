"""Locks: the rwlock behind ``vmobjlock``, mutexes, the kernel lock and the
exclusive vnode lock (kern_rwlock.c, kern_lock.c, vfs_lockf for vn_lock).

Every lock knows its owner, so ``rw_write_held()`` and friends are real
checks, and taking a non-recursive lock twice panics instead of hanging.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from vnpager.kern.debug import panic

RW_WRITE = 0x1
RW_READ = 0x2
RW_NOSLEEP = 0x4

LK_EXCLUSIVE = 0x1
LK_NOWAIT = 0x2
LK_RECURSEFAIL = 0x4
LK_RETRY = 0x8


class RWLock:
    """A readers-writer lock (``struct rwlock``)."""

    __slots__ = ("_cv", "_readers", "_writer", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._cv = threading.Condition(threading.Lock())
        self._writer: int | None = None
        self._readers = 0

    def rw_enter(self, flags: int = RW_WRITE) -> bool:
        """Take the lock; with RW_NOSLEEP return False instead of waiting."""
        me = threading.get_ident()
        read = flags & RW_READ
        with self._cv:
            if self._writer == me:
                panic(f"rw_enter: {self.name} locking against myself")
            if self._writer is None and (read or not self._readers):
                self._take(me, read)
                return True
            if flags & RW_NOSLEEP:
                return False
        with kernel_lock.dropped(), self._cv:
            while self._writer is not None or (not read and self._readers):
                self._cv.wait()
            self._take(me, read)
        return True

    def _take(self, me: int, read: int) -> None:
        if read:
            self._readers += 1
        else:
            self._writer = me

    def rw_exit(self) -> None:
        with self._cv:
            if self._writer is not None:
                if self._writer != threading.get_ident():
                    panic(f"rw_exit: {self.name} not held by me")
                self._writer = None
            elif self._readers:
                self._readers -= 1
            else:
                panic(f"rw_exit: {self.name} not held")
            self._cv.notify_all()

    def rw_write_held(self) -> bool:
        return self._writer == threading.get_ident()

    def rw_lock_held(self) -> bool:
        return self.rw_write_held() or self._readers > 0

    # the interlock protocol of rwsleep(): write mode, as the seed uses it
    def enter(self) -> None:
        self.rw_enter(RW_WRITE)

    def exit(self) -> None:
        self.rw_exit()

    __enter__ = enter

    def __exit__(self, *exc: object) -> None:
        self.rw_exit()

    def statistics(self) -> LockStatistics:
        """Who holds the lock and who waits for it, read without taking it."""
        return LockStatistics(self.name, self._writer is not None or self._readers > 0,
                              _thread_name(self._writer), self._readers, _cv_waiters(self._cv))


class Mutex:
    """A non-recursive mutex that knows its owner (``struct mutex``)."""

    __slots__ = ("_lock", "_owner", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._owner: int | None = None

    def enter(self) -> None:
        me = threading.get_ident()
        if self._owner == me:
            panic(f"mtx_enter: {self.name} locking against myself")
        self._lock.acquire()
        self._owner = me

    def exit(self) -> None:
        if self._owner != threading.get_ident():
            panic(f"mtx_leave: {self.name} not held by me")
        self._owner = None
        self._lock.release()

    def held(self) -> bool:
        return self._owner == threading.get_ident()

    __enter__ = enter

    def __exit__(self, *exc: object) -> None:
        self.exit()

    def statistics(self) -> LockStatistics:
        """Who holds the mutex (its threading.Lock counts no waiters: None)."""
        return LockStatistics(self.name, self._lock.locked(), _thread_name(self._owner), 0, None)


class KernelLock:
    """The big lock: recursive, as KERNEL_LOCK() is.

    As in the kernel, a thread that sleeps (or waits for a device) lets go
    of it and takes it back when it runs again: see :meth:`dropped`.
    """

    __slots__ = ("_depth", "_lock", "_owner")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._depth = 0

    def enter(self) -> None:
        me = threading.get_ident()
        if self._owner != me:
            self._lock.acquire()
            self._owner = me
        self._depth += 1

    def exit(self) -> None:
        if self._owner != threading.get_ident():
            panic("KERNEL_UNLOCK: not held by me")
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._lock.release()

    def held(self) -> bool:
        return self._owner == threading.get_ident()

    @contextmanager
    def dropped(self) -> Iterator[None]:
        """Release the lock entirely, if held, for the duration of a sleep."""
        depth = self._depth if self.held() else 0
        if depth:
            self._depth = 0
            self._owner = None
            self._lock.release()
        try:
            yield
        finally:
            if depth:
                self._lock.acquire()
                self._owner = threading.get_ident()
                self._depth = depth

    __enter__ = enter

    def __exit__(self, *exc: object) -> None:
        self.exit()

    def statistics(self) -> LockStatistics:
        """Who holds the big lock, and how deep (no waiter count: None)."""
        return LockStatistics("kernel_lock", self._lock.locked(), _thread_name(self._owner), 0, None,
                              self._depth)


kernel_lock = KernelLock()


def KERNEL_LOCK() -> None:
    kernel_lock.enter()


def KERNEL_UNLOCK() -> None:
    kernel_lock.exit()


class LockMgr:
    """An exclusive sleep lock with lockmgr's flags (the vnode lock).

    ``lock()`` returns an errno instead of raising: EBUSY for LK_NOWAIT
    when taken, EDEADLK for LK_RECURSEFAIL when the caller holds it already
    (where the kernel would otherwise deadlock against itself).
    """

    __slots__ = ("_cv", "_owner", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._cv = threading.Condition(threading.Lock())
        self._owner: int | None = None

    def lock(self, flags: int = LK_EXCLUSIVE) -> int:
        me = threading.get_ident()
        with self._cv:
            if self._owner == me:
                if flags & LK_RECURSEFAIL:
                    return errno.EDEADLK
                panic(f"lockmgr: {self.name} locking against myself")
            if self._owner is None:
                self._owner = me
                return 0
            if flags & LK_NOWAIT:
                return errno.EBUSY
        with kernel_lock.dropped(), self._cv:
            while self._owner is not None:
                self._cv.wait()
            self._owner = me
        return 0

    def unlock(self) -> None:
        with self._cv:
            if self._owner != threading.get_ident():
                panic(f"lockmgr: {self.name} unlock not held by me")
            self._owner = None
            self._cv.notify()

    def held(self) -> bool:
        return self._owner == threading.get_ident()

    def locked(self) -> bool:
        return self._owner is not None

    def statistics(self) -> LockStatistics:
        """Who holds the vnode lock and who waits for it, read without taking it."""
        return LockStatistics(self.name, self._owner is not None, _thread_name(self._owner), 0,
                              _cv_waiters(self._cv))


@dataclass(frozen=True)
class LockStatistics:
    """A lock's state, as its ``statistics()`` saw it (without taking the
    lock: a snapshot that may be stale as soon as it is returned)."""

    name: str
    locked: bool  # held, by a writer or owner, or by readers
    owner: str | None  # the holding thread's name (None: free, or held by readers only)
    readers: int = 0  # RWLock: threads holding it for reading
    waiters: int | None = None  # threads waiting for it (None: the lock keeps no such count)
    depth: int = 0  # KernelLock: how many times its owner holds it


def _thread_name(ident: int | None) -> str | None:
    if ident is None:
        return None
    return next((t.name for t in threading.enumerate() if t.ident == ident), f"thread {ident:#x}")


def _cv_waiters(cv: threading.Condition) -> int:
    """Threads waiting on *cv*: CPython's Condition keeps them in _waiters."""
    return len(getattr(cv, "_waiters", ()))
