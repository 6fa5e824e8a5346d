"""Where a mount's requests spend their time.

Set ``VNPAGER_FUSE_PROFILE=1`` (or run ``python -m vnpager.tools.mount_profile``)
and the server times every request it handles, by kind, and prints a table
when it unmounts (to its log with ``vnpager mount``, to stdout with
``--foreground``).  A request's time, from its handler's entry to its
reply, is split in stages:

* **loop**: on the event loop: pyfuse3's coroutine, our handler's code,
  host calls, and a read or write that resident pages serve at once;
* **hop in**: from handing a call to a worker thread
  (``trio.to_thread.run_sync``) until the thread starts it (a free thread,
  the GIL);
* **thread**: the call itself in the worker (the pager's, mostly);
* **hop out**: from its end until the event loop resumes the request.

Calls a request hands to a thread after its reply (the uncache an unlink
starts) are the row "(after a reply)".  With ``VNPAGER_FUSE_PROFILE=cprofile``
the thread calls also run under cProfile, one profiler per worker thread,
summed and sorted by cumulative time at the end: it splits *thread* into
the copy, page allocation, waits for the page daemon (``uvm_wait``) and
for object locks (``rw_enter``).  A request's time in the kernel and
libfuse before pyfuse3 calls us is not seen: compare the mean *total* with
the latency a program measures (fio's ``clat``).  The table ends with the
server's CPU time (all threads, the daemons' too) per request, which a
machine shared with other jobs inflates less than the wall-clock stages.

Off (the default), nothing is wrapped and nothing timed.
"""

from __future__ import annotations

import contextvars
import cProfile
import functools
import inspect
import io
import os
import pstats
import resource
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

T = TypeVar("T")
STAGES = ("loop", "hop in", "thread", "hop out")
AFTER_REPLY = "(after a reply)"
# the bytes a data request moves, from its handler's arguments (fh, off, size or buf)
NBYTES: dict[str, Callable[[tuple[Any, ...]], int]] = {
    "read": lambda args: int(args[2]), "write": lambda args: len(args[2])}


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _seconds() -> dict[str, float]:
    return dict.fromkeys(STAGES, 0.0)


@dataclass
class OpStats:
    """The requests of one kind: how many, their bytes, thread hops and each stage's seconds."""

    n: int = 0
    nbytes: int = 0
    threaded: int = 0  # requests that handed a call to a worker thread
    seconds: dict[str, float] = field(default_factory=_seconds)


@dataclass
class _Request:
    """The hops of the request a trio task is serving (its context's)."""

    op: str
    hops: int = 0
    seconds: dict[str, float] = field(default_factory=_seconds)  # all but "loop"


class RequestProfile:
    """The stage times of the requests served, by kind ('read', 'lookup', ...).

    => updated from the event loop thread only; a worker thread measures its
       own call and the loop adds it once the hop is back."""

    def __init__(self, cprofile: bool = False) -> None:
        self.ops: dict[str, OpStats] = {}
        self._cprofile = cprofile
        self._request: contextvars.ContextVar[_Request | None] = contextvars.ContextVar(
            "request", default=None)  # each request is a trio task: a context of its own
        self._local = threading.local()
        self._profilers: list[cProfile.Profile] = []
        self._lock = threading.Lock()  # guards _profilers
        self._cpu0 = _cpu()  # the start-up's, left out

    def install(self, operations: object) -> None:
        """Time every request handler of *operations* (its public coroutine
        methods), on the instance: its class is left as it is."""
        for name, _ in inspect.getmembers(type(operations), inspect.iscoroutinefunction):
            if not name.startswith("_"):
                setattr(operations, name, self._timed(name, getattr(operations, name)))

    def _timed(self, op: str, handler: Callable[..., Coroutine[Any, Any, T]]
               ) -> Callable[..., Coroutine[Any, Any, T]]:
        nbytes = NBYTES.get(op)

        @functools.wraps(handler)
        async def timed(*args: Any) -> T:
            req = _Request(op)
            token = self._request.set(req)
            start = time.perf_counter()
            try:
                return await handler(*args)
            finally:
                self._request.reset(token)
                s = self._add(op, time.perf_counter() - start, req)
                s.n += 1
                s.nbytes += nbytes(args) if nbytes else 0
                s.threaded += req.hops > 0
        return timed

    async def hop(self, fn: Callable[..., T], *args: Any) -> T:
        """``trio.to_thread.run_sync(fn, *args)``, its stages timed for the
        request being served (or the row "(after a reply)")."""
        req = self._request.get()
        own = req or _Request(AFTER_REPLY)
        begin = time.perf_counter()
        done: list[float] = []
        try:
            return await trio.to_thread.run_sync(self._in_thread, done, fn, *args)
        finally:
            end = time.perf_counter()
            started, finished = done or (end, end)  # a call never started: all hop
            own.hops += 1
            for stage, t in (("hop in", started - begin), ("thread", finished - started),
                             ("hop out", end - finished)):
                own.seconds[stage] += t
            if req is None:
                s = self._add(AFTER_REPLY, end - begin, own)
                s.n += 1
                s.threaded += 1

    def _in_thread(self, done: list[float], fn: Callable[..., T], *args: Any) -> T:
        """Run *fn* in this worker thread, putting its start and end in *done*."""
        start = time.perf_counter()
        try:
            if not self._cprofile:
                return fn(*args)
            return self._profiler().runcall(fn, *args)
        finally:
            done[:] = start, time.perf_counter()

    def _profiler(self) -> cProfile.Profile:
        prof: cProfile.Profile | None = getattr(self._local, "prof", None)
        if prof is None:
            prof = self._local.prof = cProfile.Profile()
            with self._lock:
                self._profilers.append(prof)
        return prof

    def _add(self, op: str, total: float, req: _Request) -> OpStats:
        s = self.ops.setdefault(op, OpStats())
        for stage, t in req.seconds.items():
            s.seconds[stage] += t
        s.seconds["loop"] += total - sum(req.seconds.values())
        return s

    def report(self, counters: dict[str, int]) -> str:
        """The table, the server's CPU time and the VM's *counters* (uvmexp's)."""
        handlers = sum(sum(s.seconds.values()) for s in self.ops.values())
        lines = ["vnpager: request profile (mean microseconds per request)",
                 f"{'op':<16}{'requests':>10}{'KiB/req':>9}{'threaded':>9}"
                 + "".join(f"{s:>10}" for s in STAGES) + f"{'total':>10}{'share':>8}"]
        for op, s in sorted(self.ops.items(), key=lambda kv: -sum(kv[1].seconds.values())):
            total = sum(s.seconds.values())
            kib = f"{s.nbytes / s.n / 1024:.1f}" if s.nbytes else ""
            lines.append(f"{op:<16}{s.n:>10}{kib:>9}{s.threaded:>9}"
                         + "".join(f"{s.seconds[k] / s.n * 1e6:>10.1f}" for k in STAGES)
                         + f"{total / s.n * 1e6:>10.1f}{total / max(handlers, 1e-9):>8.1%}")
        cpu = _cpu() - self._cpu0
        requests = sum(s.n for s in self.ops.values())
        lines.append(f"server CPU since mounting (all threads, user + system): {cpu:.2f} s, "
                     f"{cpu / max(requests, 1) * 1e6:.0f} us per request")
        lines.append("VM: " + ", ".join(f"{k} {v}" for k, v in counters.items()))
        if self._profilers:
            out = io.StringIO()
            with self._lock:
                stats = pstats.Stats(self._profilers[0], stream=out)
                for prof in self._profilers[1:]:
                    stats.add(prof)
            stats.sort_stats("cumulative").print_stats(40)
            lines.append(out.getvalue())
        return "\n".join(lines)


def from_environment() -> RequestProfile | None:
    """The profile ``VNPAGER_FUSE_PROFILE`` asks for: None when unset or 0."""
    mode = os.environ.get("VNPAGER_FUSE_PROFILE", "")
    return None if mode in ("", "0") else RequestProfile(cprofile=mode == "cprofile")
