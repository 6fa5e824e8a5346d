"""Where a mount's requests spend their time: serve SRC at MNT, run a
command on the mount, and count and time every FUSE request the server
handles meanwhile.  A measuring tool, like the bench, not a test.

    python -m vnpager.tools.mount_profile SRC MNT [--physmem SIZE] -- COMMAND...

For each operation: how many requests, their mean time in the server (from
the handler's start to its reply, waits included), and of that the time
spent in worker threads (the pager's calls, and any other thread hop):
the work the thread did, and the hop itself (handing the call to a thread,
waiting for a free one and for the GIL, and coming back to the event
loop).  Thread hops of no request (the uncache that an unlink starts
after its reply) are the row "(after a reply)".  The time of a request
before its handler starts (the kernel, the
FUSE device, pyfuse3's dispatch, trio's scheduling) is not in these
figures: the command's wall time less the server's time shows it.

The server runs in a thread of this process (:func:`vnpager.fuse.mount.mounted`),
the command in a process of its own.
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import inspect
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import trio

from vnpager.fuse import fs as fuse_fs
from vnpager.fuse.mount import mounted
from vnpager.uvm.uvm import VM


@dataclass
class OpStats:
    count: int = 0
    seconds: float = 0.0  # in the handler, waits included
    hops: int = 0  # calls handed to a worker thread
    thread_seconds: float = 0.0  # the threads' own work
    hop_seconds: float = 0.0  # the hops' awaits less that work


class Profile:
    """Per-operation figures of the requests a :class:`VnpagerFS` handled.

    => updated from the event loop thread (the threads' work time is
       measured in the thread and added once the hop has come back)."""

    def __init__(self) -> None:
        self.ops: defaultdict[str, OpStats] = defaultdict(OpStats)
        self._op: contextvars.ContextVar[str] = contextvars.ContextVar("op", default="(after a reply)")

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Time every request handler of VnpagerFS and every thread hop, for the block."""
        saved: dict[str, Any] = {}
        for name, fn in vars(fuse_fs.VnpagerFS).items():
            if inspect.iscoroutinefunction(fn) and not name.startswith("_"):
                saved[name] = fn
                setattr(fuse_fs.VnpagerFS, name, self._timed(name, fn))
        run_sync = trio.to_thread.run_sync
        trio.to_thread.run_sync = self._hop(run_sync)  # type: ignore[assignment]
        try:
            yield
        finally:
            trio.to_thread.run_sync = run_sync
            for name, fn in saved.items():
                setattr(fuse_fs.VnpagerFS, name, fn)

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def handler(*args: Any, **kwargs: Any) -> Any:
            token = self._op.set(name)  # each request is a trio task: a context of its own
            start = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                s = self.ops[name]
                s.count += 1
                s.seconds += time.perf_counter() - start
                self._op.reset(token)
        return handler

    def _hop(self, run_sync: Callable[..., Any]) -> Callable[..., Any]:
        async def hop(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            work = [0.0]

            def timed() -> Any:
                start = time.perf_counter()
                try:
                    return fn(*args)
                finally:
                    work[0] = time.perf_counter() - start

            start = time.perf_counter()
            try:
                return await run_sync(timed, **kwargs)
            finally:
                s = self.ops[self._op.get()]
                s.hops += 1
                s.thread_seconds += work[0]
                s.hop_seconds += time.perf_counter() - start - work[0]
        return hop

    def lines(self, wall: float) -> Iterator[str]:
        total = sum(s.seconds for s in self.ops.values())
        requests = sum(s.count for s in self.ops.values())
        yield (f"{requests:,} requests in {wall:.2f} s of the command: {total:.2f} s in handlers "
               "(summed over concurrent requests)")
        yield ("| operation | requests | mean µs | share of handler time | thread hops "
               "| mean µs in the thread | mean µs of the hop |")
        yield "|---|---:|---:|---:|---:|---:|---:|"
        for name, s in sorted(self.ops.items(), key=lambda kv: -kv[1].seconds):
            per_hop = (f"{s.thread_seconds / s.hops * 1e6:,.0f} | {s.hop_seconds / s.hops * 1e6:,.0f}"
                       if s.hops else " | ")
            yield (f"| {name} | {s.count:,} | {s.seconds / max(s.count, 1) * 1e6:,.0f} "
                   f"| {s.seconds / total:.1%} | {s.hops:,} | {per_hop} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vnpager.tools.mount_profile",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("src")
    p.add_argument("mnt")
    p.add_argument("--physmem", default="64M", help="the VM's size (default 64M)")
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        p.error("no command to run: give it after --")
    cut = argv.index("--")
    args, command = p.parse_args(argv[:cut]), argv[cut + 1:]
    profile = Profile()
    with profile.installed(), mounted(VM(physmem=args.physmem), args.src, args.mnt):
        start = time.perf_counter()
        code = subprocess.run(command, check=False).returncode
        wall = time.perf_counter() - start
    print("\n".join(profile.lines(wall)))
    return code


if __name__ == "__main__":
    sys.exit(main())
