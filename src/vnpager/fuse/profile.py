"""``VNPAGER_FUSE_PROFILE=1``: where the mount's data requests spend their time.

With the variable set, the server times each read, write and fsync in
stages and prints a table when it unmounts (to its log with ``vnpager
mount``, to stdout with ``--foreground``):

* **loop**: the request's time on the event loop, from the handler's entry
  to its return, less what the stages below account for (pyfuse3's
  coroutine, our handler's own code, a copy on the loop);
* **hop in**: from handing the call to a worker thread
  (``trio.to_thread.run_sync``) until the thread starts it;
* **pager**: the pager call itself, in the worker thread;
* **hop out**: from its end until the event loop resumes the request.

A request served on the loop without a worker (a read of resident pages)
has no hops.  With ``VNPAGER_FUSE_PROFILE=cprofile`` the pager calls are
also run under cProfile, one profiler per worker thread, and the sum of
them is printed sorted by cumulative time: it splits *pager* into the
copy, page allocation, waits for the page daemon (``uvm_wait``) and for
object locks (``rw_enter``).  The time a request spends in the kernel and
libfuse before pyfuse3 calls us is not seen here: compare the mean of
*total* with the latency fio reports (``clat``).  The table ends with the
server's CPU time (all threads: the page daemon's and the aio daemon's
too) per data request, which a machine shared with other jobs inflates
less than it does the wall-clock stages.

Off (the default), nothing is wrapped: :func:`enabled` is False and the
file system calls its pager functions directly.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
MODE = os.environ.get("VNPAGER_FUSE_PROFILE", "")
STAGES = ("loop", "hop in", "pager", "hop out")


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def enabled() -> bool:
    return MODE not in ("", "0")


@dataclass
class OpStats:
    """The requests of one kind: how many, their bytes and each stage's seconds."""

    n: int = 0
    nbytes: int = 0
    inline: int = 0  # served on the event loop, without a worker thread
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))


class RequestProfile:
    """The stage times of the requests served, by kind ('read', 'write', ...).

    => updated from the event loop thread only, except :meth:`in_worker`,
       which runs in the worker and returns its times for the loop to add.
    """

    def __init__(self) -> None:
        self.ops: dict[str, OpStats] = {}
        self._cprofile = MODE == "cprofile"
        self._local = threading.local()
        self._profilers: list[cProfile.Profile] = []
        self._lock = threading.Lock()  # guards _profilers
        self._cpu0 = _cpu()  # the start-up's, left out

    def in_worker(self, fn: Callable[..., T], *args: Any) -> tuple[T, float, float]:
        """Run *fn* in this worker thread; return its result, start and end."""
        start = time.perf_counter()
        if not self._cprofile:
            return fn(*args), start, time.perf_counter()
        prof = getattr(self._local, "prof", None)
        if prof is None:
            prof = self._local.prof = cProfile.Profile()
            with self._lock:
                self._profilers.append(prof)
        result = prof.runcall(fn, *args)
        return result, start, time.perf_counter()

    def add(self, op: str, nbytes: int, stages: dict[str, float], inline: bool = False) -> None:
        s = self.ops.setdefault(op, OpStats())
        s.n += 1
        s.nbytes += nbytes
        s.inline += inline
        for k, v in stages.items():
            s.seconds[k] += v

    def report(self, counters: dict[str, int]) -> str:
        """The table, the server's CPU time and the VM's *counters* (uvmexp's)."""
        lines = ["vnpager: request profile (mean microseconds per request)",
                 f"{'op':<8}{'requests':>10}{'KiB/req':>9}{'inline':>8}"
                 + "".join(f"{s:>10}" for s in STAGES) + f"{'total':>10}"]
        for op, s in sorted(self.ops.items()):
            total = sum(s.seconds.values())
            lines.append(f"{op:<8}{s.n:>10}{s.nbytes / max(s.n, 1) / 1024:>9.1f}{s.inline:>8}"
                         + "".join(f"{s.seconds[k] / s.n * 1e6:>10.1f}" for k in STAGES)
                         + f"{total / s.n * 1e6:>10.1f}")
        cpu = _cpu() - self._cpu0
        requests = sum(s.n for s in self.ops.values())
        lines.append(f"server CPU since mounting (all threads, user + system): {cpu:.2f} s, "
                     f"{cpu / max(requests, 1) * 1e6:.0f} us per data request")
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
