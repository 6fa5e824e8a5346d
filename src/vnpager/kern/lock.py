"""Locks: the rwlock behind ``vmobjlock``, mutexes, the kernel lock and the
exclusive vnode lock (kern_rwlock.c, kern_lock.c, vfs_lockf for vn_lock),
and the gate that fork() closes (:class:`ForkGate`).

Every lock knows its owner, so ``rw_write_held()`` and friends are real
checks, and taking a non-recursive lock twice panics instead of hanging.

**Fork.**  A forked child has only the thread that forked, so a lock held
or a page left busy by any other thread would stay so in the child for
ever.  Fork therefore first makes the process quiet, as OpenBSD's
single_thread_set() does for fork and exit: :data:`fork_gate` is held
shared by every thread inside a VM entry point (functions marked
:func:`gated`: faults, map changes, the pager's attach, detach, flush,
sync, size changes, UBC) and by every thread that holds one of these
locks, and fork closes it: it waits until no thread is inside, while new
entries wait at the gate.  A thread blocked at the gate holds nothing:
the gate is met only at the outermost entry and at a thread's first lock
(which it takes, then gives back if the gate is closing: a lock checks
the gate after taking it, and fork looks at the owners after closing it,
so one of the two always sees the other).
The VM's daemon threads (page daemon, aio, read-ahead) are exempt, so that
the threads fork waits for can finish (they may need memory); fork parks
them next (see ``vnpager.uvm.uvm``).  In the child every lock is made anew
(:func:`locks_after_fork_child`).
"""

from __future__ import annotations

import errno
import functools
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from vnpager.kern.debug import panic

RW_WRITE = 0x1
RW_READ = 0x2
RW_NOSLEEP = 0x4

LK_EXCLUSIVE = 0x1
LK_NOWAIT = 0x2
LK_RECURSEFAIL = 0x4
LK_RETRY = 0x8

F = TypeVar("F", bound=Callable[..., Any])


class ForkGate:
    """The gate into the VM that fork() closes (see the module docstring).

    => ``_inside`` and ``closing`` change under ``_cv``; ``closing`` is also
       read without it by every lock just taken (see :meth:`admit`).
    """

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self.closing = False  # a fork is quiescing the process
        self._forker: int | None = None
        self._inside = 0  # threads inside an entry point, outermost entries counted
        self._local = threading.local()  # .depth: this thread's nesting of entry points
        self._exempt: set[int] = set()  # daemon threads: never wait, never counted

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def _passes(self, taken: object = None) -> bool:
        """May this thread go on while the gate is closing?  Yes if it is
        exempt, is the forker, is inside, or holds a lock other than
        *taken* (it must not wait holding it: the threads fork waits for
        might need it)."""
        me = threading.get_ident()
        return (me in self._exempt or me == self._forker or self._depth() > 0
                or any(lk.owner_ident() == me and lk is not taken for lk in _all_locks()))

    def enter(self) -> None:
        """Enter a VM entry point (nested entries are free)."""
        local = self._local
        depth = self._depth()
        if depth or threading.get_ident() in self._exempt:
            local.depth = depth + 1
            return
        with self._cv:
            if self.closing and not self._passes():
                self._cv.wait_for(lambda: not self.closing)
            self._inside += 1
        local.depth = 1

    def exit(self) -> None:
        local = self._local
        local.depth -= 1
        if local.depth or threading.get_ident() in self._exempt:
            return
        with self._cv:
            self._inside -= 1
            if self.closing:
                self._cv.notify_all()

    def admit(self, taken: object) -> bool:
        """May this thread keep the lock *taken* it has just taken?  If not
        (False), it must give the lock back and :meth:`wait_open`: it was
        its first lock, and the gate is closing."""
        return not self.closing or self._passes(taken)

    def wait_open(self) -> None:
        with self._cv:
            self._cv.wait_for(lambda: not self.closing)

    @contextmanager
    def exempt(self) -> Iterator[None]:
        """Run the body (a daemon thread's life) exempt from the gate."""
        me = threading.get_ident()
        self._exempt.add(me)
        try:
            yield
        finally:
            self._exempt.discard(me)

    def close(self, timeout: float) -> bool:
        """Quiesce: wait until no thread but exempt ones is inside or holds
        a lock; threads arriving meanwhile wait at the gate.  False if this
        thread is inside itself (fork from within a VM call: the gate cannot
        close) or after *timeout* seconds; the gate is closed either way
        until :meth:`open`."""
        me = threading.get_ident()
        deadline = time.monotonic() + timeout
        with self._cv:
            self._cv.wait_for(lambda: not self.closing)
            self.closing, self._forker = True, me
            if self._depth():
                return False
        while True:
            with self._cv:
                if not self._cv.wait_for(lambda: self._inside == 0, deadline - time.monotonic()):
                    return False
            if not self._held_by_others(me):
                with self._cv:
                    if self._inside == 0:  # nobody came in holding a lock meanwhile
                        return True
                continue
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)  # a short section outside any entry point: let it finish

    def _held_by_others(self, me: int) -> bool:
        owners = {lk.owner_ident() for lk in _all_locks()}
        return bool(owners - {None, me} - self._exempt)

    def open(self) -> None:
        with self._cv:
            self.closing, self._forker = False, None
            self._cv.notify_all()

    def after_fork_child(self) -> None:
        """In the child: only this thread exists, outside every entry point."""
        self._cv = threading.Condition(threading.Lock())
        self._inside = 0
        self._exempt = set()
        self.closing, self._forker = False, None


fork_gate = ForkGate()


def gated(fn: F) -> F:
    """Mark *fn* a VM entry point: fork waits until it has returned, and it
    waits while a fork is under way (see ForkGate).  => caller holds no VM
    lock, or is inside an entry point already."""
    @functools.wraps(fn)
    def entry(*args: Any, **kwargs: Any) -> Any:
        fork_gate.enter()
        try:
            return fn(*args, **kwargs)
        finally:
            fork_gate.exit()
    entry.__gated__ = fn  # type: ignore[attr-defined]
    return entry  # type: ignore[return-value]


# every lock made, so that fork can tell whether one is held and the child can
# make them anew (=> _locks_lock guards adding and listing)
_locks: weakref.WeakSet[RWLock | Mutex | KernelLock | LockMgr] = weakref.WeakSet()
_locks_lock = threading.Lock()


def _register(lk: RWLock | Mutex | KernelLock | LockMgr) -> None:
    with _locks_lock:
        _locks.add(lk)


def _all_locks() -> list[RWLock | Mutex | KernelLock | LockMgr]:
    with _locks_lock:
        return list(_locks)


def locks_after_fork_child() -> None:
    """In the child of a fork: make every lock's primitives anew.  A lock
    is free at the fork (the gate was closed) unless the forking thread,
    the only one left, holds it."""
    global _locks_lock
    _locks_lock = threading.Lock()
    for lk in _all_locks():
        lk.after_fork_child()


def _take(lk: Mutex | KernelLock, me: int) -> None:
    """Acquire *lk*'s primitive for *me*, and give it back while the fork
    gate will not admit us (see ForkGate.admit)."""
    lk._lock.acquire()
    lk._owner = me
    while not fork_gate.admit(lk):
        lk._owner = None
        lk._lock.release()
        fork_gate.wait_open()
        lk._lock.acquire()
        lk._owner = me


class RWLock:
    """A readers-writer lock (``struct rwlock``).

    Taking and releasing a free lock is one Python call each, with the
    condition's lock taken directly (its ``with`` is two more calls) and
    no notify when nobody waits (``_waiting``): the cold path takes an
    object lock a few times per fault, and UBC once per page.
    => ``_lock`` (the condition's) guards ``_writer``, ``_readers`` and
       ``_waiting``.
    """

    __slots__ = ("__weakref__", "_cv", "_lock", "_readers", "_waiting", "_writer", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._writer: int | None = None
        self._readers = 0
        self._waiting = 0  # threads asleep in _rw_wait
        _register(self)

    def rw_enter(self, flags: int = RW_WRITE) -> bool:
        """Take the lock; with RW_NOSLEEP return False instead of waiting."""
        me = threading.get_ident()
        while True:
            with self._lock:
                if self._writer == me:
                    panic(f"rw_enter: {self.name} locking against myself")
                free = self._writer is None and (flags & RW_READ or not self._readers)
                if free:
                    if flags & RW_READ:
                        self._readers += 1
                    else:
                        self._writer = me
                elif flags & RW_NOSLEEP:
                    return False
            if not free:
                self._rw_wait(me, flags & RW_READ)
            if not fork_gate.closing or fork_gate.admit(self):
                return True
            self.rw_exit()
            fork_gate.wait_open()

    def _rw_wait(self, me: int, read: int) -> None:
        """Sleep until the lock is free for us, and take it."""
        with kernel_lock.dropped(), self._cv:
            self._waiting += 1
            while self._writer is not None or (not read and self._readers):
                self._cv.wait()
            self._waiting -= 1
            if read:
                self._readers += 1
            else:
                self._writer = me

    def rw_exit(self) -> None:
        with self._lock:
            if self._writer is not None:
                if self._writer != threading.get_ident():
                    panic(f"rw_exit: {self.name} not held by me")
                self._writer = None
            elif self._readers:
                self._readers -= 1
            else:
                panic(f"rw_exit: {self.name} not held")
            if self._waiting:
                self._cv.notify_all()

    def rw_write_held(self) -> bool:
        return self._writer == threading.get_ident()

    def rw_lock_held(self) -> bool:
        return self.rw_write_held() or self._readers > 0

    def owner_ident(self) -> int | None:
        """The writer, or 0 for readers (only entry points take it shared)."""
        return self._writer if self._writer is not None else (0 if self._readers else None)

    def after_fork_child(self) -> None:
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._waiting = 0
        if self._writer != threading.get_ident():
            self._writer, self._readers = None, 0

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

    __slots__ = ("__weakref__", "_lock", "_owner", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._owner: int | None = None
        _register(self)

    def enter(self) -> None:
        me = threading.get_ident()
        if self._owner == me:
            panic(f"mtx_enter: {self.name} locking against myself")
        if fork_gate.closing:
            _take(self, me)
            return
        self._lock.acquire()  # _take, inline: no call when no fork is under way
        self._owner = me
        if fork_gate.closing:  # it began meanwhile: _take's checks
            self._owner = None
            self._lock.release()
            _take(self, me)

    def exit(self, *_exc: object) -> None:
        if self._owner != threading.get_ident():
            panic(f"mtx_leave: {self.name} not held by me")
        self._owner = None
        self._lock.release()

    def held(self) -> bool:
        return self._owner == threading.get_ident()

    def owner_ident(self) -> int | None:
        return self._owner

    def after_fork_child(self) -> None:
        if self._owner != threading.get_ident():
            self._lock, self._owner = threading.Lock(), None

    __enter__ = enter
    __exit__ = exit  # a ``with`` costs two calls, not three

    def statistics(self) -> LockStatistics:
        """Who holds the mutex (its threading.Lock counts no waiters: None)."""
        return LockStatistics(self.name, self._lock.locked(), _thread_name(self._owner), 0, None)


class KernelLock:
    """The big lock: recursive, as KERNEL_LOCK() is.

    As in the kernel, a thread that sleeps (or waits for a device) lets go
    of it and takes it back when it runs again: see :meth:`dropped`.
    """

    __slots__ = ("__weakref__", "_depth", "_lock", "_owner")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        _register(self)

    def enter(self) -> None:
        me = threading.get_ident()
        if self._owner != me:
            _take(self, me)
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

    def owner_ident(self) -> int | None:
        return self._owner

    def after_fork_child(self) -> None:
        if self._owner != threading.get_ident():
            self._lock, self._owner, self._depth = threading.Lock(), None, 0

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

    __slots__ = ("__weakref__", "_cv", "_owner", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._cv = threading.Condition(threading.Lock())
        self._owner: int | None = None
        _register(self)

    def lock(self, flags: int = LK_EXCLUSIVE) -> int:
        while True:
            error = self._lock(flags)
            if error or fork_gate.admit(self):
                return error
            self.unlock()
            fork_gate.wait_open()

    def _lock(self, flags: int) -> int:
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

    def owner_ident(self) -> int | None:
        return self._owner

    def after_fork_child(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        if self._owner != threading.get_ident():
            self._owner = None

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
