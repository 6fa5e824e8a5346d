"""A client's watchdog: when its pager server dies, every fault is SIGBUS.

A client thread that touches a missing page sleeps in the kernel until
someone resolves the fault through the client's userfaultfd.  If the
server died, nobody would: the thread would hang for good, holding the
GIL, so no thread of the client could notice.  Hence a *process*, started
by the client at connect (``python -m vnpager.client.watchdog``), holding a
duplicate of the client's uffd, a pidfd of the server and one of the
client.  It sleeps until one of them exits:

* the client: the watchdog exits (nothing to guard);
* the server: the watchdog takes the uffd over.  It wakes every fault
  waiting now (the server may have read a fault's event and died before
  resolving it: the woken thread faults again and sends a new event), then
  answers each fault event with UFFDIO_POISON on the faulting page, so the
  access gets SIGBUS, as the kernel's mmap gives for a page it cannot read.
  Fork events bring a child's uffd, served the same way.  Pages already
  mapped stay readable (they are in the memfd, which the client maps); what
  was never flushed is lost with the server.  The client's map methods
  raise OSError on their own: the server's end of the connection is gone.

Until the server dies the watchdog never reads the uffd: events are the
server's.  It needs only :mod:`vnpager.arch.uffd`, which imports nothing of
vnpager: the client runs this file as a script (``python -I -S
watchdog.py``), with that package importable as ``uffd`` alone, so that a
watchdog costs a tenth of a second of CPU and a few MiB, not an import of
the whole of vnpager (a fork Pool starts one per worker).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import mmap
import os
import select
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

ARCH = Path(__file__).resolve().parents[1] / "arch"  # holds uffd/, vnpager.arch.uffd

if __package__:
    from vnpager.arch.uffd import Uffd, UffdMsg, uapi
else:  # the client's script: arch/uffd as a package of its own (it imports nothing above it)
    sys.path.insert(0, str(ARCH))
    from uffd import Uffd, UffdMsg, uapi  # type: ignore[no-redef]

#: The range UFFDIO_WAKE covers to retry every waiting fault: the whole
#: user address space above mmap_min_addr (the kernel refuses lower), x86_64.
WAKE_START = 1 << 16
WAKE_END = (1 << 47) - mmap.PAGESIZE


def wait_for_death(server_pidfd: int, client_pidfd: int) -> bool:
    """Sleep until the server or the client exits; True if the server did."""
    ready, _, _ = select.select([server_pidfd, client_pidfd], [], [])
    return server_pidfd in ready and client_pidfd not in ready


def poison(uffd: Uffd, msg: UffdMsg) -> None:
    """SIGBUS for the fault of *msg* (and every later access of its page).

    A page registered for write-protect may carry a marker, which POISON
    refuses (EEXIST): clear it first.  EEXIST from POISON itself means the
    page was mapped meanwhile (a CONTINUE of the server's just before it
    died): the access is retried by the wake and succeeds.
    """
    page = msg.address & ~(mmap.PAGESIZE - 1)
    with contextlib.suppress(OSError):  # not registered for WP, or nothing to clear
        uffd.writeprotect(page, mmap.PAGESIZE, False, wake=False)
    try:
        uffd.poison(page, mmap.PAGESIZE)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOENT, errno.ESRCH):
            raise
        with contextlib.suppress(OSError):
            uffd.wake(page, mmap.PAGESIZE)


def take_over(uffd: Uffd, client_pidfd: int) -> None:
    """Serve *uffd* (and its forked children's) with SIGBUS until the
    client exits."""
    uffds = {uffd.fd: uffd}
    with contextlib.suppress(OSError):  # the client's address space is gone: nothing waits
        uffd.wake(WAKE_START, WAKE_END - WAKE_START)
    while True:
        ready, _, _ = select.select([client_pidfd, *uffds], [], [])
        if client_pidfd in ready:
            return
        for fd in ready:
            for msg in uffds[fd].read_events():
                if msg.is_pagefault:
                    poison(uffds[fd], msg)
                elif msg.event == uapi.UFFD_EVENT_FORK:
                    child = Uffd(msg.ufd, uffds[fd].features)
                    uffds[child.fd] = child


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vnpager watchdog")
    parser.add_argument("--uffd", type=int, required=True, help="the client's userfaultfd")
    parser.add_argument("--features", type=int, required=True, help="the features it was opened with")
    parser.add_argument("--server", type=int, required=True, help="a pidfd of the server")
    parser.add_argument("--client", type=int, required=True, help="the client's pid")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's ^C is the client's to handle
    try:
        client_pidfd = os.pidfd_open(args.client)
    except ProcessLookupError:
        return 0
    if wait_for_death(args.server, client_pidfd):
        print(f"vnpager watchdog: the server died; faults of pid {args.client} get SIGBUS from now on",
              file=sys.stderr)
        take_over(Uffd(args.uffd, args.features), client_pidfd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
