"""The mount's data path (vnpager.fuse.pager): runs of pages per request,
reads and writes served without a worker when the pages are resident, and
writers that free memory ahead of themselves.

The pager-level tests call the functions the file system calls, on a VM a
quarter of the file or less; the last test drives them through a real
mount (O_DIRECT and buffered descriptors, random operations checked
against a model of the file, fsx's way), then checks SRC after unmount.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vnpager import VM
from vnpager.fuse import pager
from vnpager.kern.lock import RW_WRITE
from vnpager.vnmap import FileObject

PS = 4096
MiB = 1 << 20
PHYSMEM = 2 * MiB  # 512 pages


@pytest.fixture
def vm() -> Iterator[VM]:
    machine = VM(physmem=PHYSMEM)
    yield machine
    machine.close()
    machine.check_invariants()


def _file(tmp_path: Path, size: int, seed: int = 1) -> tuple[Path, bytes]:
    data = random.Random(seed).randbytes(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    return path, data


def test_a_stream_of_whole_page_writes_bigger_than_the_vm_neither_reads_nor_waits(
        vm: VM, tmp_path: Path) -> None:
    """Whole pages are never read first, and the writer frees memory ahead
    of itself (its own oldest pages, written back), so it never sleeps for
    the page daemon (uvmexp.waits) however much it writes."""
    path, _ = _file(tmp_path, 4 * PHYSMEM)
    new = random.Random(2).randbytes(4 * PHYSMEM)
    f = pager.open_object(vm, str(path), write=True)
    try:
        for off in range(0, len(new), MiB):
            assert pager.write(f, new[off:off + MiB], off) == MiB
        stats = vm.stats()
        assert stats.pageins == 0
        assert stats.waits == 0
        pager.fsync(f)
    finally:
        f.close()
    assert path.read_bytes() == new


def test_a_read_of_missing_pages_is_one_read_call(vm: VM, tmp_path: Path) -> None:
    """A 1 MiB read of pages not resident, memory full of clean pages: the
    memory is freed first, so the whole request is one read call."""
    path, data = _file(tmp_path, 4 * PHYSMEM)
    f = pager.open_object(vm, str(path), write=False)
    try:
        for off in range(0, len(data), MiB):
            assert pager.read(f.uvn, MiB, off) == data[off:off + MiB]
        assert vm.stats().read_ios == len(data) // MiB
    finally:
        f.close()


def test_read_nowait_reads_from_free_memory_only(tmp_path: Path) -> None:
    """Without sleeping: missing pages are read while pages are free above
    freemin (here no page daemon frees any), then only resident ones."""
    vm = VM(physmem=64 * PS, pagedaemon=False)
    path, data = _file(tmp_path, 128 * PS + 5)
    f = pager.open_object(vm, str(path), write=False)
    try:
        got = 0
        while (d := pager.read_nowait(f.uvn, PS, got * PS)) is not None:
            assert d == data[got * PS:(got + 1) * PS]
            got += 1
        assert got == 64 - vm.freemin
        assert pager.read_nowait(f.uvn, 2 * PS - 7, PS + 3) == data[PS + 3:3 * PS - 4]
        assert pager.read_nowait(f.uvn, 2 * PS, (got - 1) * PS) is None  # its last page is not resident
        assert pager.read_nowait(f.uvn, 100, 200 * PS) == b""  # past the end
    finally:
        f.close()
        vm.close()


def test_read_nowait_only_tries_the_object_lock(vm: VM, tmp_path: Path) -> None:
    path, data = _file(tmp_path, 10 * PS + 5)
    f = pager.open_object(vm, str(path), write=False)
    try:
        assert pager.read_nowait(f.uvn, 100, 10 * PS) == data[10 * PS:]  # cut at the end
        held, done = threading.Event(), threading.Event()

        def holder() -> None:  # the lock is only tried: another thread holds it
            f.uvn.vmobjlock.rw_enter(RW_WRITE)
            held.set()
            done.wait(30)
            f.uvn.vmobjlock.rw_exit()

        t = threading.Thread(target=holder)
        t.start()
        try:
            assert held.wait(30)
            assert pager.read_nowait(f.uvn, PS, PS) is None
        finally:
            done.set()
            t.join(30)
        assert pager.read_nowait(f.uvn, PS, PS) == data[PS:2 * PS]
    finally:
        f.close()


def test_write_nowait_takes_what_needs_no_read_and_no_growth(vm: VM, tmp_path: Path) -> None:
    path, data = _file(tmp_path, 8 * PS)
    model = bytearray(data)
    f = pager.open_object(vm, str(path), write=True)
    try:
        assert pager.write_nowait(f, b"x" * 10, PS + 1) == 0  # part of a page not resident
        assert pager.write_nowait(f, b"y" * PS, 8 * PS - 10) == 0  # would grow the file
        assert pager.write_nowait(f, b"z" * (PS + 10), 2 * PS) == PS  # a fresh page, then a part
        model[2 * PS:3 * PS] = b"z" * PS
        assert pager.read(f.uvn, PS, 4 * PS) == data[4 * PS:5 * PS]  # now resident
        assert pager.write_nowait(f, b"w" * 100, 4 * PS + 50) == 100
        model[4 * PS + 50:4 * PS + 150] = b"w" * 100
        assert pager.read(f.uvn, 8 * PS, 0) == model
        pager.fsync(f)
    finally:
        f.close()
    assert path.read_bytes() == model


def _check(f: FileObject, model: bytearray, rng: random.Random) -> None:
    off = rng.randrange(len(model) + 1)
    n = rng.choice([1, 100, PS, 3 * PS + 7, MiB])
    got = pager.read_nowait(f.uvn, n, off)
    if got is None:
        got = pager.read(f.uvn, n, off)
    assert got == model[off:off + n], (off, n)


def _write(f: FileObject, model: bytearray, rng: random.Random) -> None:
    off = rng.choice([rng.randrange(len(model) + PS), rng.randrange(len(model) // PS + 1) * PS])
    data = rng.randbytes(rng.choice([1, 555, PS, 5 * PS, 5 * PS + 3, 300 * PS]))
    done = pager.write_nowait(f, data, off) if rng.random() < 0.5 else 0
    if done < len(data):
        assert pager.write(f, memoryview(data)[done:], off + done) == len(data) - done
    if off > len(model):
        model.extend(bytes(off - len(model)))
    model[off:off + len(data)] = data


def test_random_operations_against_a_model(vm: VM, tmp_path: Path) -> None:
    """fsx at the pager level: reads and writes of every alignment and size
    (whole pages, parts, runs longer than half the VM, past the end),
    truncations and fsyncs, on a file several times the VM."""
    path, data = _file(tmp_path, 3 * PHYSMEM + 123)
    model = bytearray(data)
    rng = random.Random(3)
    f = pager.open_object(vm, str(path), write=True)
    try:
        for _ in range(400):
            op = rng.random()
            if op < 0.45:
                _write(f, model, rng)
            elif op < 0.9:
                _check(f, model, rng)
            elif op < 0.95:
                size = rng.randrange(5 * PHYSMEM)
                f.setsize(size)
                model[size:] = b""
                model.extend(bytes(size - len(model)))
            else:
                pager.fsync(f)
        pager.fsync(f)
    finally:
        f.close()
    assert path.read_bytes() == model
    vm.check_invariants()


def test_random_operations_through_the_mount(tmp_path: Path) -> None:
    """fsx on a real mount, in this process (mounted), so that the VM can
    be checked: O_DIRECT descriptors (each request reaches the server as
    the program made it) and a buffered one (the kernel's requests: pages
    and read-ahead), random reads and writes checked against a model; SRC
    after the unmount."""
    pytest.importorskip("pyfuse3")
    from fuse_helpers import PHYSMEM as MOUNT_PHYSMEM
    from vnpager.fuse.mount import mounted

    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    rng = random.Random(4)
    model = bytearray(rng.randbytes(4 * MOUNT_PHYSMEM))
    (src / "f").write_bytes(model)
    vm = VM(physmem=MOUNT_PHYSMEM)
    buf = mmap.mmap(-1, 2 * MiB)  # page-aligned, for O_DIRECT
    with mounted(vm, str(src), str(mnt)):
        fds = [os.open(mnt / "f", os.O_RDWR | os.O_DIRECT), os.open(mnt / "f", os.O_RDWR)]
        try:
            for _ in range(300):
                fd = rng.choice(fds)
                off = rng.choice([rng.randrange(len(model)), rng.randrange(len(model) // PS) * PS])
                n = rng.choice([1, 700, PS, 16 * PS, MiB, MiB + 3 * PS + 1])
                if rng.random() < 0.5:
                    data = rng.randbytes(n)
                    buf[:n] = data
                    assert os.pwritev(fd, [memoryview(buf)[:n]], off) == n
                    model.extend(bytes(max(0, off + n - len(model))))
                    model[off:off + n] = data
                else:
                    got = os.preadv(fd, [memoryview(buf)[:n]], off)
                    assert buf[:got] == model[off:off + n], (fd, off, n)
            os.fsync(fds[0])
        finally:
            for fd in fds:
                os.close(fd)
    buf.close()
    assert (src / "f").read_bytes() == model
    assert not os.path.ismount(mnt)


_FAILING_SERVER = """
import errno, sys
from vnpager.fuse import pager, mount

def page_in(uvn, *args):  # as a failed read would: the object lock given back
    uvn.vmobjlock.rw_exit()
    raise OSError(errno.EIO, "injected")

def write_run(*args):
    raise OSError(errno.EIO, "injected")

pager._page_in, pager._write_run = page_in, write_run
mount.serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
"""


def test_an_error_on_the_event_loop_is_an_error_reply(tmp_path: Path) -> None:
    """A read or write served on the event loop that fails (a server whose
    page-ins and page copies fail) answers its request with the errno, and
    the server goes on serving: the error must not escape into pyfuse3's
    loop, which would end the server (and the caller would see ENOTCONN)."""
    fuse_helpers = pytest.importorskip("fuse_helpers")
    from vnpager.fuse.mount import server_pid

    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "f").write_bytes(bytes(4 * PS))
    proc = subprocess.Popen([sys.executable, "-c", _FAILING_SERVER, str(src), str(mnt),
                             str(fuse_helpers.PHYSMEM)], stdout=subprocess.DEVNULL)
    buf = mmap.mmap(-1, PS)  # page-aligned, for O_DIRECT
    try:
        deadline = time.monotonic() + fuse_helpers.MOUNT_WAIT
        while server_pid(str(mnt)) != proc.pid:
            assert proc.poll() is None and time.monotonic() < deadline, "the mount did not appear"
            time.sleep(0.05)
        fd = os.open(mnt / "f", os.O_RDWR | os.O_DIRECT)
        try:
            with pytest.raises(OSError) as read_error:
                os.preadv(fd, [buf], 0)
            with pytest.raises(OSError) as write_error:
                os.pwritev(fd, [buf], PS)
        finally:
            os.close(fd)
        assert read_error.value.errno == write_error.value.errno == errno.EIO
        assert os.stat(mnt / "f").st_size == 4 * PS  # still served
        assert proc.poll() is None
    finally:
        buf.close()
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False, timeout=60)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, timeout=60)
