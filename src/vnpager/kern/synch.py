"""Sleep and wakeup on wait channels (kern_synch.c).

A wait channel is any hashable value.  The seed sleeps on addresses
(``uvn``, ``&uvn->u_nio``, ``&uvn->u_flags``); we sleep on the object itself
or on an ``(object, "field")`` tuple, which keeps the channels of one object
apart without inventing addresses.

:func:`rwsleep` enqueues the sleeper *before* it drops the interlock, and
:func:`wakeup` takes the same scheduler lock, so a wakeup issued by a thread
that took the interlock after us can never be lost.  A sleeper wakes only by
:func:`wakeup` or its timeout: there are no spurious wakeups, but callers loop
on their condition anyway, as the kernel's do.  A sleeping thread lets go
of the kernel lock, as mi_switch() does.

Fork holds the scheduler lock across the fork (:func:`synch_fork_prepare`),
so that the child's sleep queue is not caught half changed; the child
empties it (its sleepers were other threads, which the child has not).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Hashable
from typing import Protocol

from vnpager.kern.lock import kernel_lock

INFSLP = None  # sleep with no timeout


class Interlock(Protocol):
    def exit(self) -> None: ...

    def enter(self) -> None: ...


class WaitChannel:
    """A named wait channel that refers to nothing (unlike a tuple holding
    its object), so a sleeper on it does not keep its owner alive."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<WaitChannel {self.name}>"


_sched = threading.Lock()
_sleepq: dict[Hashable, list[threading.Event]] = {}
_wmesg: dict[int, str] = {}  # thread id -> what it sleeps on, for hang reports


def _sleep(chan: Hashable, wmesg: str, lock: Interlock | None,
           timeout: float | None, relock: bool) -> int:
    ev = threading.Event()
    me = threading.get_ident()
    with _sched:
        _sleepq.setdefault(chan, []).append(ev)
        _wmesg[me] = wmesg
        if lock is not None:
            lock.exit()
    with kernel_lock.dropped():
        woke = ev.wait(timeout)
    with _sched:
        _wmesg.pop(me, None)
        if not woke:
            waiters = _sleepq.get(chan)
            if waiters is not None and ev in waiters:
                waiters.remove(ev)
                if not waiters:
                    del _sleepq[chan]
            else:
                woke = True  # a wakeup raced with the timeout: take it
    if lock is not None and relock:
        lock.enter()
    return 0 if woke else errno.EWOULDBLOCK


def tsleep(chan: Hashable, wmesg: str, timeout: float | None = INFSLP) -> int:
    """Sleep on *chan* until woken; return 0, or EWOULDBLOCK on timeout."""
    return _sleep(chan, wmesg, None, timeout, False)


def rwsleep(chan: Hashable, lock: Interlock, wmesg: str,
            timeout: float | None = INFSLP, *, relock: bool = True) -> int:
    """Drop *lock* and sleep on *chan* atomically.

    => caller holds *lock* (for write); it is held again on return unless
       ``relock=False`` (the kernel's PNORELOCK).
    """
    return _sleep(chan, wmesg, lock, timeout, relock)


def wakeup(chan: Hashable) -> None:
    """Wake every thread sleeping on *chan*."""
    with _sched:
        waiters = _sleepq.pop(chan, None)
    for ev in waiters or ():
        ev.set()


def wakeup_one(chan: Hashable) -> None:
    """Wake the longest sleeper on *chan*, if any."""
    with _sched:
        waiters = _sleepq.get(chan)
        if not waiters:
            return
        ev = waiters.pop(0)
        if not waiters:
            del _sleepq[chan]
    ev.set()


def sleepers() -> dict[int, str]:
    """Thread id -> wait message of every sleeping thread (for hang reports)."""
    with _sched:
        return dict(_wmesg)


def nsleepers(chan: Hashable) -> int:
    """How many threads sleep on *chan* now (for statistics)."""
    with _sched:
        return len(_sleepq.get(chan, ()))


def synch_fork_prepare() -> None:
    """Before fork: hold the scheduler lock.  => the VM is quiet (fork_gate)."""
    _sched.acquire()


def synch_fork_parent() -> None:
    _sched.release()


def synch_fork_child() -> None:
    """In the child: nobody sleeps (only the forking thread exists)."""
    _sleepq.clear()
    _wmesg.clear()
    _sched.release()
