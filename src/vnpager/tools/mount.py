"""``vnpager mount SRC MNT`` and ``vnpager umount MNT``.

Registered by vnpager.tools.cli through :func:`add_subcommands`.  Without
``--foreground``, mount starts the server as a detached process, waits
until the mount is there, and returns.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

from vnpager.tools.cli import size_arg

MOUNT_WAIT = 30.0  # seconds to wait for a detached server to mount


def add_subcommands(subparsers: Any) -> None:
    p = subparsers.add_parser("mount", help="mount SRC at MNT, file data through the pager (FUSE)")
    p.add_argument("src", metavar="SRC", help="the directory tree to pass through")
    p.add_argument("mnt", metavar="MNT", help="the mount point (an existing directory)")
    p.add_argument("--physmem", type=size_arg, default="64M", metavar="SIZE",
                   help="memory of the pager's VM (default 64M)")
    p.add_argument("--foreground", action="store_true", help="serve in this process until unmounted")
    p.add_argument("--direct-io", action="store_true",
                   help="bypass the kernel's page cache entirely (shared mmap then fails with ENODEV)")
    p.set_defaults(func=run_mount)
    u = subparsers.add_parser("umount", help="unmount a vnpager mount, waiting for its write-back")
    u.add_argument("mnt", metavar="MNT")
    u.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds to wait for the server to write back (default 600)")
    u.set_defaults(func=run_umount)


def run_mount(args: argparse.Namespace) -> int:
    from vnpager.fuse.mount import serve, server_pid

    if args.foreground:
        serve(args.src, args.mnt, args.physmem, direct_io=args.direct_io)
        return 0
    argv = [sys.executable, "-m", "vnpager", "mount", args.src, args.mnt, "--foreground",
            "--physmem", str(args.physmem)] + (["--direct-io"] if args.direct_io else [])
    server = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + MOUNT_WAIT
    while server_pid(args.mnt) != server.pid:
        if server.poll() is not None or time.monotonic() > deadline:
            print(f"vnpager: mounting {args.src} at {args.mnt} failed", file=sys.stderr)
            server.kill()
            return 1
        time.sleep(0.05)
    print(f"vnpager: {os.path.realpath(args.src)} mounted at {os.path.realpath(args.mnt)} "
          f"(server pid {server.pid})\nvnpager: unmount with: vnpager umount {args.mnt}")
    return 0


def run_umount(args: argparse.Namespace) -> int:
    from vnpager.fuse.mount import unmount

    return unmount(args.mnt, args.timeout)
