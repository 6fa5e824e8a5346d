"""Serving a mount: from pyfuse3.init to the last dirty page written.

:func:`serve` mounts, serves requests until the mount goes away (``vnpager
umount``, ``fusermount3 -u``) or SIGINT/SIGTERM arrives, then unmounts,
writes every dirty page, terminates every object and stops the VM.

The mount's source name in /proc/self/mountinfo is ``vnpager:PID``, so
that ``vnpager umount`` can wait for the server to finish its write-back.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pyfuse3
import trio

from vnpager.fuse import pager
from vnpager.fuse.fs import VnpagerFS
from vnpager.uvm.uvm import VM

FSNAME_PREFIX = "vnpager:"


def serve(src: str, mnt: str, physmem: int, *, direct_io: bool = False) -> None:
    """Mount *src* at *mnt* and serve it until unmounted or signalled.

    Returns once the mount is gone and every dirty page is written.
    """
    if not os.path.isdir(src):
        raise OSError(errno.ENOTDIR, f"{src}: not a directory")
    where = os.path.realpath(mnt)  # not once mounted: that would ask us, not yet serving
    vm = VM(physmem=physmem)
    fs = VnpagerFS(vm, src, direct_io=direct_io)
    options = set(pyfuse3.default_options) | {f"fsname={FSNAME_PREFIX}{os.getpid()}", "subtype=vnpager"}
    if os.geteuid() == 0:
        options.add("allow_other")  # a root server serves every user
    pyfuse3.init(fs, mnt, options)
    unmounted = False
    try:
        print(f"vnpager: {fs.src} mounted at {where} "
              f"({vm.physmem >> 20} MiB of pages, pid {os.getpid()})\n"
              f"vnpager: unmount with: vnpager umount {mnt}   (or Ctrl-C / SIGTERM here)", flush=True)
        unmounted = trio.run(_main)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second one must not cut the write-back short
            signal.signal(sig, signal.SIG_IGN)
        pyfuse3.close(unmount=not unmounted)
        pager.shutdown(vm, fs.open_objects())
    print(f"vnpager: {mnt} unmounted, every dirty page written", flush=True)


async def _main() -> bool:
    """Serve until the kernel ends the session (True: unmounted already)
    or a signal comes (False: we must unmount)."""
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            nursery.start_soon(_stop_on_signal, signals, nursery.cancel_scope)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
            return True
    return False


async def _stop_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return


def server_pid(mnt: str) -> int | None:
    """The pid of the vnpager server of the mount at *mnt*, if it is one."""
    target = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = left.split()[4].encode().decode("unicode_escape")
            source = right.split()[1]
            if point == target and source.startswith(FSNAME_PREFIX):
                return int(source[len(FSNAME_PREFIX):])
    return None


def unmount(mnt: str, timeout: float) -> int:
    """Unmount *mnt* and wait for its server to write back and exit.

    Returns 0, or 1 if fusermount3 failed or the server outlived *timeout*.
    """
    pid = server_pid(mnt)
    if subprocess.run(["fusermount3", "-u", mnt], check=False).returncode:
        return 1
    deadline = time.monotonic() + timeout
    while pid is not None and _alive(pid):
        if time.monotonic() > deadline:
            print(f"vnpager: server {pid} still writing after {timeout:.0f}s", file=sys.stderr)
            return 1
        time.sleep(0.05)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has finished: our own child, not yet reaped
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
