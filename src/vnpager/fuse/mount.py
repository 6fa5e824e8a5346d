"""Serving a mount: from pyfuse3.init to the last dirty page written.

:func:`serve` mounts, serves requests until the mount goes away (``vnpager
umount``, ``fusermount3 -u``) or SIGINT/SIGTERM arrives, then unmounts,
writes every dirty page, terminates every object and stops the VM.

The mount's source name in /proc/self/mountinfo is ``vnpager:PID``, so
that ``vnpager umount`` can wait for the server to finish its write-back.

:func:`mounted` serves from a thread of the calling process instead, so
that the program can use the mount's VM itself (``vnpager.mmap``,
``vm.pread``) and see the same pages as the programs on the mount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pyfuse3
import trio

from vnpager import vm as front
from vnpager.fuse import pager
from vnpager.fuse.fs import VnpagerFS
from vnpager.fuse.profile import RequestProfile, from_environment
from vnpager.uvm.uvm import VM
from vnpager.vfs.objfs import is_url

if TYPE_CHECKING:
    from vnpager.fuse.objects import ObjectsFS

FSNAME_PREFIX = "vnpager:"
# the VM's counters a request profile ends with (VNPAGER_FUSE_PROFILE)
PROFILE_COUNTERS = ("read_ios", "pageins", "write_ios", "pageouts", "waits",
                    "pdwoke", "pdfreed", "pdpageouts")


def serve(src: str, mnt: str, physmem: int, *, direct_io: bool = False,
          storage_options: dict[str, Any] | None = None, dir_cache_time: float | None = None) -> int:
    """Mount *src* at *mnt* and serve it until unmounted or signalled: a
    host directory, or a bucket's URL (``s3://bucket/prefix``, through
    fsspec with *storage_options*, its listings trusted for *dir_cache_time*
    seconds, None: objects.DIR_CACHE_TIME; :mod:`vnpager.fuse.objects`).

    Returns once the mount is gone and every dirty page is written (and,
    for a bucket, published): the number of objects whose publish failed.
    """
    if not is_url(src) and not os.path.isdir(src):
        raise OSError(errno.ENOTDIR, f"{src}: not a directory")
    where = os.path.realpath(mnt)  # not once mounted: that would ask us, not yet serving
    vm = front.VM(physmem=physmem)
    try:
        fs = _operations(vm, src, direct_io, storage_options, from_environment(), dir_cache_time)
    except BaseException:
        vm.close()
        raise
    pyfuse3.init(fs, mnt, _options())
    unmounted = False
    failed = 0
    try:
        print(f"vnpager: {_source(fs)} mounted at {where} "
              f"({vm.physmem >> 20} MiB of pages, pid {os.getpid()})\n"
              f"vnpager: unmount with: vnpager umount {mnt}   (or Ctrl-C / SIGTERM here)", flush=True)
        unmounted = trio.run(_main)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second one must not cut the write-back short
            signal.signal(sig, signal.SIG_IGN)
        failed = _finish(fs, unmount=not unmounted)
    if failed:
        print(f"vnpager: {mnt} unmounted, {failed} objects not published (see above)", flush=True)
    else:
        print(f"vnpager: {mnt} unmounted, every dirty page written", flush=True)
    return failed


def _operations(vm: front.VM, src: str, direct_io: bool, storage_options: dict[str, Any] | None,
                profile: RequestProfile | None, dir_cache_time: float | None) -> VnpagerFS | ObjectsFS:
    """The file system serving *src*: a bucket's for a URL, else the host passthrough."""
    if is_url(src):
        if direct_io:
            raise OSError(errno.EINVAL, "--direct-io is for host directories")
        from vnpager.fuse.objects import DIR_CACHE_TIME, ObjectsFS

        return ObjectsFS(vm, src, storage_options, profile=profile,
                         dir_cache_time=DIR_CACHE_TIME if dir_cache_time is None else dir_cache_time)
    if storage_options or dir_cache_time is not None:
        raise OSError(errno.EINVAL, "storage options and listings are for object stores (SRC a URL)")
    return VnpagerFS(vm, src, direct_io=direct_io, profile=profile)


def _source(fs: VnpagerFS | ObjectsFS) -> str:
    return fs.src if isinstance(fs, VnpagerFS) else fs.url


@contextmanager
def mounted(vm: VM, src: str, mnt: str, *, direct_io: bool = False, timeout: float = 60.0,
            profile: RequestProfile | None = None) -> Iterator[VnpagerFS]:
    """Mount *src* at *mnt* with the pages of *vm*, served by a thread of
    this process, for the duration of the ``with`` block.

    At the end: stop serving, unmount (lazily, so a file left open cannot
    keep the mount), write every dirty page and close *vm*.  pyfuse3 has
    one session per process: one mount at a time.

    => the caller's own mappings of *vm* are closed before the block ends.
    => this process must never touch a kernel mapping (mmap.mmap) of a file
       on the mount: the page fault would hold the GIL that the server
       thread needs to serve it.  read/write/stat release the GIL: fine.

    With a *profile*, every request is timed and the table printed at the
    end (see :mod:`vnpager.fuse.profile`).
    """
    fs = VnpagerFS(vm, src, direct_io=direct_io, profile=profile)
    pyfuse3.init(fs, mnt, _options())
    loop = threading.Thread(target=trio.run, args=(pyfuse3.main,), name="vnpager-fuse", daemon=True)
    loop.start()
    try:
        yield fs
    finally:
        if not _stopped(loop, timeout):  # stuck: leave no mount behind, and no VM to a live thread
            subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)
            raise TimeoutError(f"the FUSE server thread outlived {timeout:.0f}s")
        _finish(fs, unmount=True)


def _stopped(loop: threading.Thread, timeout: float) -> bool:
    """End pyfuse3.main on the thread *loop* (unless it has ended by
    itself); False if it is still running after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while loop.is_alive() and time.monotonic() < deadline:
        token = pyfuse3.trio_token  # None until main starts and once it ends
        if token is not None:
            with contextlib.suppress(trio.RunFinishedError):  # it ended meanwhile
                trio.from_thread.run_sync(pyfuse3.terminate, trio_token=token)
        loop.join(0.05)
    return not loop.is_alive()


def _options() -> set[str]:
    options = set(pyfuse3.default_options) | {f"fsname={FSNAME_PREFIX}{os.getpid()}", "subtype=vnpager"}
    if os.geteuid() == 0:
        options.add("allow_other")  # a root server serves every user
    return options


def _finish(fs: VnpagerFS | ObjectsFS, *, unmount: bool) -> int:
    """The loop has ended: unmount if still mounted, then write every dirty
    page, terminate every object, close the VM and the inodes' descriptors
    (a bucket: publish every object written; the failures are printed and
    counted)."""
    pyfuse3.close(unmount=unmount)
    if fs.profile is not None:  # before the unmount's write-back adds its own
        stats = fs.vm.stats()
        counters = {k: getattr(stats, k) for k in PROFILE_COUNTERS}
    failed = []
    if isinstance(fs, VnpagerFS):
        pager.shutdown(fs.vm, fs.open_objects())
        fs.inodes.close()
    else:
        failed = fs.shutdown()
    for url, e in failed:
        print(f"vnpager: {url}: not published: {e}", file=sys.stderr, flush=True)
    if fs.profile is not None:
        print(fs.profile.report(counters), flush=True)
    return len(failed)


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


def mount_source(mnt: str) -> str | None:
    """The source name of the mount at *mnt* (``vnpager:PID``, or another
    server's; the topmost if several), or None if nothing is mounted there.
    Reads mountinfo: never asks the server, so it is safe before it serves
    or after it died."""
    target = os.path.realpath(mnt)
    source = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4].encode().decode("unicode_escape") == target:
                source = right.split()[1]
    return source


def server_pid(mnt: str) -> int | None:
    """The pid of the vnpager server of the mount at *mnt*, if it is one."""
    source = mount_source(mnt)
    if source is None or not source.startswith(FSNAME_PREFIX):
        return None
    return int(source[len(FSNAME_PREFIX):])


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
