"""fork(): each process has a VM of its own afterwards, and no wrong data.

Children are made with os.fork() and with multiprocessing's fork context,
and always leave with os._exit (never through pytest).  Every wait on a
child is bounded; a child that hangs is killed and fails the test.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import vnpager
from helpers import PS, WAIT, pattern, progfs
from vnpager.kern.lock import Mutex, fork_gate, gated
from vnpager.uvm.uvm_vnode import uvm_vnp_sync
from vnpager.vfs.faultfs import FaultFS, FaultPlan
from vnpager.vfs.hostfs import HostFS, hostfs_vget_path
from vnpager.vfs.memfs import memfs_create

# Python 3.12 warns about fork in a process with threads: that fork is what we test
pytestmark = pytest.mark.filterwarnings("ignore:This process .*multi-threaded:DeprecationWarning")


def _fork(child: Callable[[], None]) -> int:
    """Run *child* in a forked process; its exit status is 0 if it returned."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            child()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    return pid


def _reap(pid: int, timeout: float = WAIT) -> int:
    """The exit status of child *pid*; a child still running after
    *timeout* seconds is killed and the test fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"child {pid} hung")


@pytest.fixture
def file64(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "f64"
    path.write_bytes(bytes(64 * PS))
    yield path


def test_fork_parent_and_child_write_halves(file64: Path, tmp_path: Path) -> None:
    """Each process writes and flushes its own half: the file has both.

    The child then frees its pages of the file (MADV_DONTNEED) and reads
    another file into the frames: frames shared with the parent would carry
    that file into the parent's write-back.
    """
    other = tmp_path / "other"
    other.write_bytes(b"o" * (64 * PS))
    vm = vnpager.VM(physmem=128 * PS)
    with open(file64, "r+b") as f, vnpager.mmap(f.fileno(), 0, vm=vm) as m:
        m[:] = b"P" * (64 * PS)  # dirty before the fork

        def child() -> None:
            m[:32 * PS] = b"C" * (32 * PS)
            m.flush()
            m.madvise(vnpager.MADV_DONTNEED)
            with open(other, "rb") as g, vnpager.mmap(g.fileno(), 0, access=vnpager.ACCESS_READ, vm=vm) as o:
                assert o[:] == b"o" * (64 * PS)

        assert _reap(_fork(child)) == 0
        m[32 * PS:] = b"Q" * (32 * PS)
        m.flush()
    data = file64.read_bytes()
    assert data[:32 * PS] == b"C" * (32 * PS)
    assert data[32 * PS:] == b"Q" * (32 * PS)
    vm.check_invariants()
    vm.close()


_pool_map: vnpager.mmap | None = None
POOL_PAGES = 1024


def _pool_read(seed: int) -> int:
    """In a pool worker: read pages of the map at random; how many were wrong."""
    assert _pool_map is not None
    rng = random.Random(seed)
    wrong = 0
    for _ in range(200):
        i = rng.randrange(POOL_PAGES)
        if _pool_map[i * PS:(i + 1) * PS] != bytes([i % 251 + 1]) * PS:
            wrong += 1
    return wrong


def test_fork_pool_reads_a_map_made_before_the_pool(tmp_path: Path) -> None:
    """Pool workers fault pages of a map made before the pool into frames
    of their own: no read is wrong.  The VM holds a quarter of the file."""
    global _pool_map
    path = tmp_path / "pool"
    path.write_bytes(b"".join(bytes([i % 251 + 1]) * PS for i in range(POOL_PAGES)))
    vm = vnpager.VM(physmem=POOL_PAGES // 4 * PS)
    with open(path, "rb") as f:
        _pool_map = vnpager.mmap(f.fileno(), 0, access=vnpager.ACCESS_READ, vm=vm)
    try:
        assert _pool_map[:PS] == bytes([1]) * PS  # some pages resident at the fork
        with multiprocessing.get_context("fork").Pool(2) as pool:
            wrong = pool.map_async(_pool_read, range(32)).get(timeout=WAIT)
        assert sum(wrong) == 0
        assert _pool_read(99) == 0  # and the parent still reads right
    finally:
        _pool_map.close()
        _pool_map = None
    vm.check_invariants()
    vm.close()


def test_fork_child_pages_out_and_writes_back(tmp_path: Path) -> None:
    """A child whose VM is full needs the page daemon (memory) and the aio
    daemon (its pageouts): both work in the child."""
    path = tmp_path / "big"
    npages = 200
    path.write_bytes(bytes(npages * PS))
    vm = vnpager.VM(physmem=32 * PS)
    with vnpager.mmap(-1, 16 * PS, vm=vm) as warm:
        warm[:] = b"w" * (16 * PS)  # the daemons ran in the parent

        def child() -> None:
            with open(path, "r+b") as f, vnpager.mmap(f.fileno(), 0, vm=vm) as m:
                m[:] = pattern(npages)  # 8 times physmem: written back as it goes
                assert m[:] == pattern(npages)
            assert vm.uvmexp.pdpageouts > 0
            assert warm[:] == b"w" * (16 * PS)
            vm.check_invariants()

        assert _reap(_fork(child)) == 0
    assert path.read_bytes() == pattern(npages)
    vm.close()


def test_fork_anonymous_memory_is_not_shared(vm: vnpager.VM) -> None:
    """A MAP_SHARED anonymous map is the process's own after the fork (unlike
    the stdlib's): what the child writes, the parent never sees."""
    m = vnpager.mmap(-1, 16 * PS, vm=vm)
    m[:] = b"a" * (16 * PS)

    def child() -> None:
        assert m[:] == b"a" * (16 * PS)
        m[:] = b"b" * (16 * PS)
        assert m[:] == b"b" * (16 * PS)

    assert _reap(_fork(child)) == 0
    assert m[:] == b"a" * (16 * PS)
    m.close()


def test_fork_while_another_thread_faults_and_writes(tmp_path: Path) -> None:
    """A thread faults, writes and flushes in a loop (its VM under pressure)
    while the main thread forks several times: every child has a working VM
    of its own, nobody hangs, and the thread's data is right throughout.
    The child writes other pages of the file than the thread (see the
    README on a page written by both)."""
    path = tmp_path / "busy"
    npages = 96
    path.write_bytes(bytes(npages * PS))
    vm = vnpager.VM(physmem=32 * PS)
    f = open(path, "r+b")  # noqa: SIM115 - closed at the end, with the maps
    m = vnpager.mmap(f.fileno(), 0, vm=vm)
    theirs = [i for i in range(npages) if i % 7]  # the child's pages; the thread has the others
    anon = vnpager.mmap(-1, 48 * PS, vm=vm)
    stop = threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            gen = 0
            while not stop.is_set():
                gen = gen % 200 + 1
                for i in range(0, npages, 7):
                    m[i * PS:i * PS + 16] = bytes([gen]) * 16
                    anon[(i % 48) * PS:(i % 48) * PS + 16] = bytes([gen]) * 16
                m.flush()
                for i in range(0, npages, 7):
                    assert m[i * PS:i * PS + 16] == bytes([gen]) * 16
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        for k in range(4):
            time.sleep(0.05)

            def child(k: int = k) -> None:
                mark = bytes([0xC0 + k]) * 8
                for i in theirs:
                    m[i * PS + 100:i * PS + 108] = mark
                for i in range(48):
                    anon[i * PS + 100:i * PS + 108] = mark
                m.flush()
                assert all(m[i * PS + 100:i * PS + 108] == mark for i in theirs)
                assert all(anon[i * PS + 100:i * PS + 108] == mark for i in range(48))
                vm.check_invariants()

            assert _reap(_fork(child)) == 0
            with open(path, "rb") as g:
                data = g.read()
            mark = bytes([0xC0 + k]) * 8
            assert all(data[i * PS + 100:i * PS + 108] == mark for i in theirs)
    finally:
        stop.set()
        thread.join(WAIT)
    assert not thread.is_alive() and not errors, errors
    m.close()
    anon.close()
    f.close()
    vm.check_invariants()
    vm.close()


def test_fork_child_never_writes_a_stale_copy_over_the_parent(file64: Path) -> None:
    """Pages dirty at the fork, which the parent then writes and flushes
    (acknowledged): the child's write-back of everything it has dirty
    (closing its VM) must not put its own older copy of them over that."""
    vm = vnpager.VM(physmem=128 * PS)
    f = open(file64, "r+b")  # noqa: SIM115 - closed below, after the map
    m = vnpager.mmap(f.fileno(), 0, vm=vm)
    m[:] = b"P" * (64 * PS)
    go_r, go_w = os.pipe()

    def child() -> None:
        os.close(go_w)
        assert os.read(go_r, 1) == b"!"  # the parent's flush has returned
        m[:32 * PS] = b"C" * (32 * PS)
        m.close()
        vm.close()

    pid = _fork(child)
    os.close(go_r)
    m[32 * PS:] = b"Q" * (32 * PS)
    m.flush()
    os.write(go_w, b"!")
    os.close(go_w)
    assert _reap(pid) == 0
    m.close()
    f.close()
    assert file64.read_bytes() == b"C" * (32 * PS) + b"Q" * (32 * PS)
    vm.check_invariants()
    vm.close()


def test_fork_swap_is_not_shared(tmp_path: Path) -> None:
    """An anonymous map four times the VM, paged out before and after the
    fork by both processes at once: each reads back its own bytes."""
    npages = 128
    vm = vnpager.VM(physmem=32 * PS, swapdir=str(tmp_path))
    m = vnpager.mmap(-1, npages * PS, vm=vm)
    m[:] = b"a" * (npages * PS)

    def fill(byte: bytes) -> None:
        for _ in range(3):
            assert all(m[i * PS:(i + 1) * PS] in (b"a" * PS, byte * PS) for i in range(npages))
            m[:] = byte * (npages * PS)
            assert m[:] == byte * (npages * PS)

    pid = _fork(lambda: fill(b"b"))
    fill(b"c")
    assert _reap(pid) == 0
    assert m[:] == b"c" * (npages * PS)
    m.close()
    vm.check_invariants()
    vm.close()


def test_fork_a_page_whose_write_back_failed_is_the_parents(tmp_path: Path) -> None:
    """A page still dirty at the fork (its write-back failed, the fork's
    too) is the parent's to retry: once the parent has written it anew and
    synced, the child's sync (its backend healed too) must not write its
    older copy over it."""
    path = tmp_path / "f"
    path.write_bytes(bytes(PS))
    vm = vnpager.VM(physmem=64 * PS)
    plan = FaultPlan(seed=1)
    vp = hostfs_vget_path(vm.vfs, vm.vfs.mount(FaultFS(HostFS(), plan), "faulty"), str(path))
    plan.fail("write", errno.EIO)
    vm.pwrite(vp, b"P" * PS, 0)  # its write-back fails: dirty, kept with the error
    go_r, go_w = os.pipe()

    def child() -> None:
        os.close(go_w)
        assert os.read(go_r, 1) == b"!"  # the parent's sync has returned
        plan.clear()
        uvm_vnp_sync(vm)

    pid = _fork(child)
    os.close(go_r)
    plan.clear()
    vm.pwrite(vp, b"Q" * PS, 0)
    uvm_vnp_sync(vm)
    assert path.read_bytes() == b"Q" * PS
    os.write(go_w, b"!")
    os.close(go_w)
    assert _reap(pid) == 0
    assert path.read_bytes() == b"Q" * PS
    vm.vfs.vrele(vp)
    vm.check_invariants()
    vm.close()


def test_fork_from_inside_a_vm_call_warns_and_does_not_hang(vm: vnpager.VM) -> None:
    """A fork from a filesystem's hook, in the middle of a page-in, cannot
    wait for that call: it warns and goes ahead, and the parent carries on."""
    fs, mp = progfs(vm)
    vp = memfs_create(vm.vfs, mp, b"r" * PS)
    pids: list[int] = []

    def fork_in_read(op: str, vp: object, uio: object) -> int:
        if op == "read" and not pids:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                os._exit(0)
            pids.append(pid)
        return 0

    fs.hooks.append(fork_in_read)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert vm.pread(vp, PS, 0) == b"r" * PS
    assert pids and _reap(pids[0]) == 0
    assert any(issubclass(w.category, RuntimeWarning) and "could not be made quiet" in str(w.message)
               for w in caught)
    assert vm.pread(vp, PS, 0) == b"r" * PS  # the gate is open again
    vm.vfs.vrele(vp)


def test_fork_gate_waits_for_calls_inside_and_holds_new_ones() -> None:
    """The gate fork closes: it waits for a thread inside an entry point,
    and for one holding a lock outside any; while it is closed a new entry,
    or a thread's first lock, waits for it to open."""
    inside, release = threading.Event(), threading.Event()
    mutex = Mutex("test")

    @gated
    def call() -> None:
        inside.set()
        release.wait(WAIT)

    def holder() -> None:
        with mutex:
            inside.set()
            release.wait(WAIT)

    for busy in (call, holder):
        inside.clear()
        release.clear()
        t = threading.Thread(target=busy)
        t.start()
        assert inside.wait(WAIT)
        assert not fork_gate.close(0.05)  # still inside: it cannot close
        release.set()
        t.join(WAIT)
        fork_gate.open()
    assert fork_gate.close(WAIT)
    order: list[str] = []
    late = [threading.Thread(target=lambda: (call(), order.append("call"))),
            threading.Thread(target=lambda: (mutex.enter(), mutex.exit(), order.append("lock")))]
    inside.clear()
    release.set()
    for t in late:
        t.start()
    time.sleep(0.05)  # not a measure: a chance for them to get in, which they must not
    order.append("open")
    fork_gate.open()
    for t in late:
        t.join(WAIT)
    assert order[0] == "open" and sorted(order[1:]) == ["call", "lock"]
