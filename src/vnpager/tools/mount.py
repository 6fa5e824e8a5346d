"""``vnpager mount SRC MNT`` and ``vnpager umount MNT``.

Registered by vnpager.tools.cli through :func:`add_subcommands`.  Without
``--foreground``, mount starts the server as a detached process (its
output goes to a log file, not to our stdout and stderr), waits until the
mount is there, and returns.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from vnpager.tools.cli import size_arg

MOUNT_WAIT = 30.0  # seconds to wait for a detached server to mount


def add_subcommands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "mount", help="mount SRC at MNT, file data through the pager (FUSE)",
        description="Mount SRC at MNT; file data goes through the pager.  SRC is a host directory "
                    "(passed through) or a bucket's URL, s3://BUCKET[/PREFIX] (its objects as files; "
                    "credentials, region and endpoint from the environment and AWS config, as fsspec's "
                    "s3fs finds them, or from the options below).")
    p.add_argument("src", metavar="SRC", help="the directory tree to pass through, or s3://BUCKET[/PREFIX]")
    p.add_argument("mnt", metavar="MNT", help="the mount point (an existing directory)")
    p.add_argument("--physmem", type=size_arg, default="64M", metavar="SIZE",
                   help="memory of the pager's VM (default 64M)")
    p.add_argument("--foreground", action="store_true", help="serve in this process until unmounted")
    p.add_argument("--direct-io", action="store_true",
                   help="bypass the kernel's page cache entirely (shared mmap then fails with ENODEV)")
    p.add_argument("--endpoint-url", metavar="URL",
                   help="an S3 SRC: the server's endpoint (default: AWS_ENDPOINT_URL, AWS config, AWS)")
    p.add_argument("-o", "--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an S3 SRC: an fsspec storage option for s3fs, repeated (key=, secret=, anon=true, "
                        "client_kwargs='{\"region_name\": \"x\"}'; a VALUE that is JSON is taken as such)")
    p.add_argument("--dir-cache-time", type=_seconds_arg, metavar="SECONDS",
                   help="an S3 SRC: seconds a directory's listing is trusted; names made or deleted by "
                        "others are seen after that (default 300; 0: listed at every lookup and readdir)")
    p.set_defaults(func=run_mount)
    u = subparsers.add_parser("umount", help="unmount a vnpager mount, waiting for its write-back")
    u.add_argument("mnt", metavar="MNT")
    u.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds to wait for the server to write back (default 600)")
    u.set_defaults(func=run_umount)


def _seconds_arg(text: str) -> float:
    """A number of seconds >= 0 (argparse type)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return seconds


def run_mount(args: argparse.Namespace) -> int:
    problem = _not_mountable(args.src, args.mnt)
    options: dict[str, Any] = {}
    try:
        options = _storage_options(args)
    except ValueError as e:
        problem = problem or str(e)
    if problem:
        print(f"vnpager mount: {problem}", file=sys.stderr)
        return 1
    try:
        from vnpager.fuse.mount import serve
    except ImportError as e:
        print(f"vnpager mount needs the fuse extra (pip install -e '.[fuse]'): {e}", file=sys.stderr)
        return 1
    if not args.foreground:
        return _detach(args)
    try:
        failed = serve(args.src, args.mnt, args.physmem, direct_io=args.direct_io, storage_options=options,
                       dir_cache_time=args.dir_cache_time)
    except (OSError, RuntimeError) as e:  # pyfuse3.init raises RuntimeError; libfuse said why
        print(f"vnpager mount: mounting {args.src} at {args.mnt} failed: {e}", file=sys.stderr)
        return 1
    return 1 if failed else 0


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    """The fsspec storage options of the command line.  Raises ValueError."""
    options = parse_storage_options(args.storage_option)
    if args.endpoint_url:
        options["endpoint_url"] = args.endpoint_url
    if (options or args.dir_cache_time is not None) and "://" not in args.src:
        raise ValueError("--endpoint-url, --storage-option and --dir-cache-time are for an object "
                         "store's SRC (a URL)")
    return options


def parse_storage_options(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as fsspec storage_options: a VALUE that parses
    as JSON is that (numbers, booleans, ``{"region_name": "x"}``), else the
    string.  Raises ValueError for an item without ``=``."""
    options: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"storage option {item!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def _not_mountable(src: str, mnt: str) -> str | None:
    """Why *src* cannot be mounted at *mnt* (None: it looks possible)."""
    for what, path in (("mount point", mnt),) if "://" in src else (("SRC", src), ("mount point", mnt)):
        if not os.path.exists(path):
            return f"{what} {path}: no such directory"
        if not os.path.isdir(path):
            return f"{what} {path}: not a directory"
    return None


def _detach(args: argparse.Namespace) -> int:
    """Start the server in a session of its own, its stdout and stderr in a
    log file (so that nobody waits on our pipes for as long as it serves),
    and return once it has mounted."""
    from vnpager.fuse.mount import server_pid

    argv = [sys.executable, "-m", "vnpager", "mount", args.src, args.mnt, "--foreground",
            "--physmem", str(args.physmem)] + (["--direct-io"] if args.direct_io else [])
    argv += [f"--storage-option={o}" for o in args.storage_option]
    argv += [f"--endpoint-url={args.endpoint_url}"] if args.endpoint_url else []
    argv += [f"--dir-cache-time={args.dir_cache_time}"] if args.dir_cache_time is not None else []
    fd, log = tempfile.mkstemp(prefix="vnpager-mount-", suffix=".log")
    try:
        server = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                  start_new_session=True)
    finally:
        os.close(fd)
    deadline = time.monotonic() + MOUNT_WAIT
    while server_pid(args.mnt) != server.pid:
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            server.wait()
            print(_last_line(log) or f"vnpager mount: mounting {args.src} at {args.mnt} failed",
                  file=sys.stderr)
            os.unlink(log)
            return 1
        time.sleep(0.05)
    src = args.src if "://" in args.src else os.path.realpath(args.src)
    print(f"vnpager: {src} mounted at {os.path.realpath(args.mnt)} "
          f"(server pid {server.pid}, its messages in {log})\n"
          f"vnpager: unmount with: vnpager umount {args.mnt}")
    return 0


def _last_line(path: str) -> str:
    with open(path, errors="replace") as f:
        lines = [line.rstrip() for line in f if line.strip()]
    return lines[-1] if lines else ""


def run_umount(args: argparse.Namespace) -> int:
    from vnpager.fuse.mount import unmount

    return unmount(args.mnt, args.timeout)
