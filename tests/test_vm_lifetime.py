"""A VM dropped without close() gives its threads back once it is garbage."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import vnpager
from helpers import PS, WAIT


def _busy_vm(path: Path) -> list[threading.Thread]:
    """A VM whose page daemon, aio workers and read-ahead daemon all ran,
    dropped without close() (with its mappings closed); its daemons."""
    vm = vnpager.VM(physmem=32 * PS)
    with vnpager.mmap(-1, 96 * PS, vm=vm) as anon:  # three times physmem: pageouts
        for off in range(0, 96 * PS, PS):
            anon[off:off + 8] = b"busypage"
    with open(path, "r+b") as f, vnpager.mmap(f.fileno(), 0, vm=vm) as m:
        m.madvise(vnpager.MADV_WILLNEED)
        vm.readahead.drain()
        m[0:4] = b"ABCD"
    assert vm.uvmexp.pdwoke and vm.uvmexp.pageouts
    assert vm.pagedaemon is not None and vm.readahead._threads
    return [vm.pagedaemon.thread, *vm.readahead._threads]


def test_vm_dropped_without_close_releases_its_threads(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(16 * PS))
    before = set(threading.enumerate())
    daemons = [t for _ in range(50) for t in _busy_vm(path)]
    deadline = time.monotonic() + WAIT
    while (left := set(threading.enumerate()) - before) and time.monotonic() < deadline:
        gc.collect()  # the VM is a cycle (its pages point at it): only the collector frees it
        time.sleep(0.1)
    assert not left, sorted(t.name for t in left)
    assert not any(t.is_alive() for t in daemons)
