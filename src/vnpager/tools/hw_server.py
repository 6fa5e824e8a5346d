"""An instrumented pager server for the tools' hardware-MMU runs (bench, torture, demo).

``python -m vnpager.tools.hw_server --socket @NAME --physmem SIZE`` is
``vnpager serve`` (:class:`vnpager.server.serve.Server` over
:class:`~vnpager.server.space.ClientSpace`) with what the tools need and
a plain server does not give:

* ``--faults SEED:RATE`` puts the VM's host files behind a
  :class:`~vnpager.vfs.faultfs.FaultFS` that fails write calls (EIO,
  ENOSPC, short): only writes, since a failed read is SIGBUS in the client
  on this machine; SIGUSR1 clears the plan (a torture run's final check);
* ``--profile PATH`` profiles every thread of the server (cProfile, one
  profiler per thread) and dumps the merged stats to PATH at exit.

It prints ``ready`` on stdout once it accepts, and at exit one JSON line:
the faults injected by kind.  :class:`Spawned` starts one and stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import errno
import json
import os
import pstats
import select
import signal
import subprocess
import sys
import threading
from collections import Counter
from typing import IO

from vnpager.arch.uffd import Uffd
from vnpager.server import serve as server
from vnpager.server.serve import make_vm
from vnpager.uvm.uvm import VM
from vnpager.vfs.faultfs import FaultFS, FaultPlan
from vnpager.vfs.hostfs import HostFS

READY_TIMEOUT = 60.0  # seconds for the server to import vnpager, make its VM and listen
STOP_TIMEOUT = 120.0  # seconds for it to write back and exit


def write_faults(seed: int, rate: float) -> FaultPlan:
    """Write-back faults only (see the module docstring), and slow calls."""
    plan = FaultPlan(seed)
    plan.fail("write", errno.EIO, probability=rate)
    plan.fail("write", errno.ENOSPC, probability=rate)
    plan.short("write", 1000, error=errno.ENOSPC, probability=rate)
    plan.short("write", 1000, probability=rate)  # the rest follows in a second call
    plan.delay(("read", "write"), 0.0005, probability=5 * rate)
    return plan


class _ThreadProfiles:
    """cProfile in every thread started from now on (and this one)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.profiles: list[cProfile.Profile] = []
        threading.setprofile(self._start)
        self._start()

    def _start(self, *_: object) -> None:
        prof = cProfile.Profile()
        with self.lock:
            self.profiles.append(prof)
        prof.enable()  # replaces this hook in the thread

    def dump(self, path: str) -> None:
        threading.setprofile(None)
        with self.lock:
            profiles = list(self.profiles)
        profiles[0].disable()
        stats = pstats.Stats(profiles[0])
        for prof in profiles[1:]:
            with contextlib.suppress(TypeError):  # a thread that never ran a Python call
                stats.add(prof)
        stats.dump_stats(path)


def serve(args: argparse.Namespace) -> Counter[str]:
    """Run the server until SIGTERM/SIGINT; the faults injected by kind."""
    profiles = _ThreadProfiles() if args.profile else None
    vm: VM = make_vm(args.physmem)
    plan: FaultPlan | None = None
    if args.faults:
        seed, rate = args.faults.split(":")
        plan = write_faults(int(seed), float(rate))
        vm.hostfs = vm.vfs.mount(FaultFS(HostFS(), plan), "faulty")  # every client's files come through it
    if plan is not None:
        signal.signal(signal.SIGUSR1, lambda *_: _clear(plan))
    try:
        server.serve(args.socket, vm=vm, parent_pid=args.parent_pid, ready=lambda: print("ready", flush=True))
    finally:
        if profiles is not None:
            profiles.dump(args.profile)
    injected: Counter[str] = Counter()
    for (op, label), k in (plan.injected.items() if plan is not None else ()):
        injected[f"{op} {label}"] += k
    return injected


def _clear(plan: FaultPlan) -> None:
    plan.clear()
    print("cleared", flush=True)


class Spawned:
    """A hw_server child process at an abstract socket; ``with`` stops it.

    ``injected`` (faults by kind) is filled in by :meth:`stop`.
    """

    def __init__(self, physmem: int | str, *, faults: str = "", profile: str = "") -> None:
        self.path = f"@vnpager-tools-{os.getpid()}-{id(self):x}"
        cmd = [sys.executable, "-m", "vnpager.tools.hw_server", "--socket", self.path,
               "--physmem", str(physmem), "--parent-pid", str(os.getpid())]
        cmd += ["--faults", faults] if faults else []
        cmd += ["--profile", profile] if profile else []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.injected: Counter[str] = Counter()
        assert self.proc.stdout is not None
        if _readline(self.proc.stdout, READY_TIMEOUT) != "ready":
            self.stop()
            raise RuntimeError(f"the pager server did not start (exit status {self.proc.poll()})")

    def clear_faults(self) -> None:
        """No more faults from now on (when this returns, the server has cleared them)."""
        self.proc.send_signal(signal.SIGUSR1)
        assert self.proc.stdout is not None
        if _readline(self.proc.stdout, READY_TIMEOUT) != "cleared":
            raise RuntimeError("the pager server did not clear its faults")

    def stop(self) -> None:
        """SIGTERM it (it writes back and exits); read what it injected."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=STOP_TIMEOUT)
        for line in (out or b"").decode().splitlines():
            with contextlib.suppress(ValueError):
                self.injected = Counter(json.loads(line))

    def __enter__(self) -> Spawned:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _readline(f: IO[bytes], timeout: float) -> str:
    ready, _, _ = select.select([f], [], [], timeout)
    return f.readline().decode().strip() if ready else ""


def main(argv: list[str] | None = None) -> int:
    from vnpager.tools.cli import size_arg

    p = argparse.ArgumentParser(prog="python -m vnpager.tools.hw_server", description=__doc__)
    p.add_argument("--socket", required=True, metavar="PATH")
    p.add_argument("--physmem", type=size_arg, default=None, metavar="SIZE")
    p.add_argument("--faults", default="", metavar="SEED:RATE", help="inject write-back faults")
    p.add_argument("--profile", default="", metavar="PATH", help="cProfile every thread, dump to PATH")
    p.add_argument("--parent-pid", type=int, default=None, help="stop when this process exits")
    args = p.parse_args(argv)
    Uffd.open().close()  # UffdUnavailable, naming the fix, before anything else
    injected = serve(args)
    with contextlib.suppress(BrokenPipeError):  # nobody reads it (the parent is gone)
        print(json.dumps(injected), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
