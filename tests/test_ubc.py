"""UBC: vm.pread / vm.pwrite / vm.open through the pager's pages."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from vnpager import VM
from vnpager import mmap as vn_mmap
from vnpager.uvm.uvm_bio import ubc_read, ubc_setsize, ubc_write
from vnpager.uvm.uvm_param import PROT_READ, PROT_WRITE
from vnpager.uvm.uvm_vnode import uvm_vnp_sync
from vnpager.vfs.faultfs import FaultFS, FaultPlan
from vnpager.vfs.hostfs import HostFS, hostfs_vget_path
from vnpager.vfs.memfs import memfs_create
from vnpager.vnmap import FileObject

PS = 4096


@pytest.fixture
def vm() -> Iterator[VM]:
    """32 pages: every test moves several times that."""
    machine = VM(physmem=32 * PS)
    yield machine
    machine.close()
    machine.check_invariants()


def test_write_then_read_many_times_physmem(vm: VM, tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = random.Random(1).randbytes(8 * vm.physmem + 123)
    with vm.open(path, "wb") as f:
        for i in range(0, len(data), 10_000):  # unaligned chunks
            assert f.write(data[i:i + 10_000]) == len(data[i:i + 10_000])
    with vm.open(path, "rb") as f:
        assert f.readall() == data
    vm.close()
    assert path.read_bytes() == data


def test_read_stops_at_eof(vm: VM, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 5000)
    assert vm.pread(path, 10_000, 4000) == b"x" * 1000
    assert vm.pread(path, 10, 5000) == b""
    assert vm.pread(path, 10, 9000) == b""


def test_write_past_end_grows_with_zeros(vm: VM, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert vm.pwrite(path, b"tail", 3 * PS + 10) == 4
    assert os.path.getsize(path) == 3 * PS + 14  # the backing file grew at once
    assert vm.pread(path, 3 * PS + 14, 0) == b"abc" + bytes(3 * PS + 7) + b"tail"
    uvm_vnp_sync(vm)
    assert path.read_bytes() == b"abc" + bytes(3 * PS + 7) + b"tail"


def test_whole_page_writes_read_nothing(vm: VM, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\xff" * 4 * PS)
    before = vm.uvmexp.pageins
    vm.pwrite(path, b"\x01" * 2 * PS, PS)  # pages 1 and 2, wholly
    assert vm.uvmexp.pageins == before
    vm.pwrite(path, b"\x02", 0)  # part of page 0: read first
    assert vm.uvmexp.pageins == before + 1
    assert vm.pread(path, 4 * PS, 0) == b"\x02" + b"\xff" * (PS - 1) + b"\x01" * 2 * PS + b"\xff" * PS


def test_partial_last_page_write_keeps_no_garbage(vm: VM, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"")
    vm.pwrite(path, b"a" * 100, 0)  # covers all of the file in page 0
    vm.pwrite(path, b"b" * 10, 200)
    assert vm.pread(path, 1000, 0) == b"a" * 100 + bytes(100) + b"b" * 10


def test_truncate_and_append(vm: VM, tmp_path: Path) -> None:
    path = tmp_path / "f"
    with vm.open(path, "w+b") as f:
        f.write(b"y" * (3 * PS))
        assert f.truncate(PS + 5) == PS + 5
        f.seek(0)
        assert f.read() == b"y" * (PS + 5)
    assert os.path.getsize(path) == PS + 5
    with vm.open(path, "ab") as f:
        f.write(b"z")
    with vm.open(path, "rb") as f:
        assert f.read() == b"y" * (PS + 5) + b"z"
    with vm.open(path, "wb"):
        pass
    assert vm.pread(path, 10, 0) == b""
    assert os.path.getsize(path) == 0


def test_sync_writes_to_the_host(vm: VM, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(PS))
    with vm.open(path, "r+b") as f:
        f.write(b"synced")
        f.sync()
        assert path.read_bytes()[:6] == b"synced"


def test_bad_modes_and_closed_files(vm: VM, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        vm.open(tmp_path / "f", "rw")
    with pytest.raises(FileNotFoundError):
        vm.open(tmp_path / "missing", "rb")
    with pytest.raises(FileExistsError):
        (tmp_path / "g").write_bytes(b"")
        vm.open(tmp_path / "g", "xb")
    f = vm.open(tmp_path / "g", "rb")
    f.close()
    with pytest.raises(ValueError):
        f.read(1)


def test_concurrent_writers_and_readers(vm: VM, tmp_path: Path) -> None:
    """Threads writing disjoint stripes of one file, with readers, under
    memory pressure: every byte lands."""
    import threading

    path = tmp_path / "f"
    path.write_bytes(b"")
    f = FileObject.open(vm, path, PROT_READ | PROT_WRITE)
    uvn = f.uvn
    nthreads, stripe = 4, 3 * PS + 7
    rounds = 8

    def writer(t: int) -> None:
        for r in range(rounds):
            off = (r * nthreads + t) * stripe
            ubc_write(uvn, bytes([t + 1]) * stripe, off)
            assert ubc_read(uvn, stripe, off) == bytes([t + 1]) * stripe

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    expected = b"".join(bytes([t + 1]) * stripe for _ in range(rounds) for t in range(nthreads))
    assert ubc_read(uvn, len(expected) + 10, 0) == expected
    ubc_setsize(uvn, 10)
    assert ubc_read(uvn, 100, 0) == b"\x01" * 10
    f.close()


def test_coherent_with_vnpager_mmap(vm: VM, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(4 * PS))
    with open(path, "r+b") as f:
        m = vn_mmap(f.fileno(), 0, vm=vm)
        try:
            vm.pwrite(path, b"from ubc", PS + 3)
            assert m[PS + 3:PS + 11] == b"from ubc"  # at once: the same page
            m[3 * PS:3 * PS + 8] = b"from map"
            assert vm.pread(path, 8, 3 * PS) == b"from map"
        finally:
            m.close()
    assert vm.pread(path, 8, PS + 3) == b"from ubc"


def _written_from_outside(path: Path, data: bytes, at: int = 0) -> None:
    """Another program writes *data* into *path*; its mtime moves on by a
    second, as it would on a filesystem with a coarse clock."""
    st = path.stat()
    with open(path, "r+b") as other:
        other.seek(at)
        other.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_pread_and_open_see_what_another_program_wrote(vm: VM, tmp_path: Path) -> None:
    """Close-to-open for vm.pread and vm.open, as for vnpager.mmap: each call
    or open of a file changed since (mtime or size) reads it again."""
    path = tmp_path / "f"
    path.write_bytes(b"old." * PS)
    assert vm.pread(path, 4, 0) == b"old."  # the object persists with the page
    _written_from_outside(path, b"new.")
    assert vm.pread(path, 4, 0) == b"new."
    with vm.open(path, "rb") as f:
        assert f.read(4) == b"new."
    _written_from_outside(path, b"more", 4 * PS)  # a new size too
    with vm.open(path, "rb") as f:
        assert f.read(4) == b"new." and f.seek(0, os.SEEK_END) == 4 * PS + 4
    assert vm.pread(path, 8, 4 * PS - 4) == b"old.more"


def test_close_of_a_file_open_for_writing_writes_back(vm: VM, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(2 * PS))
    with vm.open(path, "r+b") as f:
        f.seek(PS)
        f.write(b"closed")
    assert path.read_bytes()[PS:PS + 6] == b"closed"  # close-to-open, the other way


def test_open_and_map_a_vnode(vm: VM, tmp_path: Path) -> None:
    """vm.open and vm.map take the VM's own vnodes too (no host descriptor)."""
    vp = memfs_create(vm.vfs, vm.memfs, b"a" * PS)
    try:
        with vm.open(vp, "r+b") as f:
            f.write(b"bb")
        with vm.map(vp) as m:
            assert m[:3] == b"bba" and len(m) == m.size() == PS
            m.resize(2 * PS)
            m[-1:] = b"z"
        assert vm.pread(vp, 3, 2 * PS - 2) == b"\0z"
        with pytest.raises(FileExistsError):
            vm.open(vp, "xb")
    finally:
        vm.vfs.vrele(vp)


def test_each_open_file_is_told_of_a_write_back_error_once(vm: VM, tmp_path: Path) -> None:
    """errseq for vm.open as for vnpager.mmap: sync and close raise a failed
    write-back once to each file open when it failed, whoever wrote."""
    path = tmp_path / "f"
    path.write_bytes(bytes(2 * PS))
    plan = FaultPlan(seed=1)
    vp = hostfs_vget_path(vm.vfs, vm.vfs.mount(FaultFS(HostFS(), plan), "faulty"), str(path))
    try:
        a, b = vm.open(vp, "r+b"), vm.open(vp, "rb")
        a.write(b"hello")
        plan.fail("write", errno.ENOSPC, times=1)
        with pytest.raises(OSError) as exc:
            a.sync()
        assert exc.value.errno == errno.ENOSPC
        assert path.read_bytes()[:5] == bytes(5)  # kept dirty, not lost
        a.sync()  # told once; written now
        assert path.read_bytes()[:5] == b"hello"
        with pytest.raises(OSError):
            b.sync()  # open when it failed: told too, once
        b.close()
        a.close()
    finally:
        vm.vfs.vrele(vp)
