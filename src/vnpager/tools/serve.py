"""``vnpager serve``: a pager server for the hardware MMU.

Runs a VM of ``--physmem`` bytes on the host's MMU (userfaultfd) and serves
every client that connects to ``--socket`` (``vnpager.VM.connect(PATH)``):
they share one budget and one set of pages, so a write by one process is
seen by the others at once.  SIGTERM or SIGINT stops it after writing
every dirty page back.  ``--listen-fd`` and ``--parent-pid`` are how
``vnpager.VM(mmu="hardware")`` starts its private server.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vnpager.arch.uffd import Uffd, UffdUnavailable


def run_serve(args: argparse.Namespace) -> int:
    from vnpager.server.serve import serve

    if args.socket is None and args.listen_fd is None:
        print("vnpager serve: --socket PATH is required", file=sys.stderr)
        return 2
    try:
        Uffd.open().close()  # the clients will need it too: say why not now, in one line
    except UffdUnavailable as e:
        print(f"vnpager serve: {e}", file=sys.stderr)
        return 1
    ready = None if args.listen_fd is not None else (
        lambda: print(f"vnpager serve: listening at {args.socket}", file=sys.stderr, flush=True))
    try:
        serve(args.socket, args.physmem, listen_fd=args.listen_fd, parent_pid=args.parent_pid, ready=ready)
    except OSError as e:
        print(f"vnpager serve: {args.socket}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


def add_subcommands(subparsers: Any) -> None:
    from vnpager.tools.cli import size_arg

    p = subparsers.add_parser("serve", help="a pager server for hardware-MMU clients",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--socket", metavar="PATH", help="the socket to listen at (@name: abstract)")
    p.add_argument("--physmem", type=size_arg, default=None, metavar="SIZE",
                   help="bytes of page frames for all clients (default: VNPAGER_PHYSMEM, else 256M)")
    p.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run_serve)
