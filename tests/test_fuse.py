"""vnpager mount: real programs on a FUSE mount whose pager has far less
memory than the data (cp, tar, sqlite3, Python's mmap).

Each server runs in a subprocess (``python -m vnpager mount ...
--foreground``); the fixtures always unmount and reap it, even on failure.
The coherence test of the mount with vnpager.mmap needs one VM for both,
so it serves from a thread of the test process (``mounted``) instead.
"""

from __future__ import annotations

import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import vnpager
from fuse_helpers import PHYSMEM, Server, fill_database, mount, sqlite
from vnpager.fuse.mount import mounted


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A mount kept for the whole module (starting one costs a second)."""
    yield from mount(tmp_path_factory.mktemp("shared"))


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Server]:
    """A mount of its own, for tests that unmount it."""
    yield from mount(tmp_path)


def test_cp_of_a_file_many_times_physmem(shared: Server) -> None:
    data = random.Random(5).randbytes(8 * PHYSMEM + 4321)
    (shared.src / "big").write_bytes(data)
    subprocess.run(["cp", str(shared.mnt / "big"), str(shared.mnt / "copy")], check=True, timeout=120)
    subprocess.run(["cmp", str(shared.src / "big"), str(shared.mnt / "copy")], check=True, timeout=60)
    assert os.path.getsize(shared.mnt / "copy") == len(data)


def _make_tree(root: Path) -> None:
    rng = random.Random(7)
    for d in range(6):
        sub = root / f"dir{d}" / f"sub{d % 2}"
        sub.mkdir(parents=True)
        for f in range(8):
            (sub / f"file{f}.bin").write_bytes(rng.randbytes(rng.choice([0, 1, 4096, 70_000, 300_001])))
    (root / "link").symlink_to("dir0/sub0/file1.bin")
    (root / "empty").mkdir()


def test_tar_extract_and_diff(shared: Server, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    _make_tree(tree)
    archive = tmp_path / "tree.tar"
    subprocess.run(["tar", "cf", str(archive), "-C", str(tree), "."], check=True, timeout=60)
    dest = shared.mnt / "extracted"
    dest.mkdir()
    subprocess.run(["tar", "xf", str(archive), "-C", str(dest)], check=True, timeout=120)
    subprocess.run(["diff", "-r", "--no-dereference", str(tree), str(dest)], check=True, timeout=60)
    assert os.readlink(dest / "link") == "dir0/sub0/file1.bin"


def test_python_mmap_on_the_mount(shared: Server) -> None:
    path = shared.mnt / "mapped"
    path.write_bytes(b"\0" * (3 * mmap.PAGESIZE))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[mmap.PAGESIZE:mmap.PAGESIZE + 7] = b"written"
        m.flush()
        assert m[:4] == b"\0\0\0\0"
    with open(path, "rb") as f:
        data = f.read()
    assert data[mmap.PAGESIZE:mmap.PAGESIZE + 7] == b"written"
    assert len(data) == 3 * mmap.PAGESIZE
    # written through the file, then seen through a new mapping
    with open(path, "r+b") as f:
        f.seek(5)
        f.write(b"by write")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m[5:13] == b"by write"


def test_rename_over_and_unlink(shared: Server) -> None:
    a, b = shared.mnt / "a", shared.mnt / "b"
    a.write_bytes(b"new contents")
    b.write_bytes(b"old contents that are longer")
    os.rename(a, b)
    assert b.read_bytes() == b"new contents"
    assert not a.exists()
    b.unlink()
    assert not (shared.src / "b").exists()
    b.write_bytes(b"again")  # a new file of the same name
    assert b.read_bytes() == b"again"


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="sqlite3 CLI not installed (make sysdeps)")
def test_sqlite_then_sigterm_writes_every_page(fresh: Server) -> None:
    db = fresh.mnt / "test.db"
    expected = fill_database(db, 30, 500)
    assert sqlite(db, "PRAGMA integrity_check;") == "ok"
    assert int(sqlite(db, "SELECT count(*) FROM t;")) == expected
    assert os.path.getsize(db) > 4 * PHYSMEM
    assert fresh.stop(signal.SIGTERM) == 0, fresh.output
    assert "every dirty page written" in fresh.output
    assert not os.path.ismount(fresh.mnt)
    on_src = fresh.src / "test.db"
    assert sqlite(on_src, "PRAGMA integrity_check;") == "ok"
    assert int(sqlite(on_src, "SELECT count(*) FROM t;")) == expected


def test_umount_command_waits_for_write_back(fresh: Server) -> None:
    data = random.Random(9).randbytes(3 * PHYSMEM)
    (fresh.mnt / "f").write_bytes(data)
    subprocess.run([sys.executable, "-m", "vnpager", "umount", str(fresh.mnt)], check=True, timeout=60)
    assert (fresh.src / "f").read_bytes() == data
    assert fresh.proc.wait(timeout=10) == 0


def test_direct_io_refuses_shared_mmap(tmp_path: Path) -> None:
    """Why the default keeps the kernel's page cache: with direct_io this
    kernel refuses MAP_SHARED (FUSE_DIRECT_IO_ALLOW_MMAP is not negotiated
    by libfuse 3.14); reads and writes still go through the pager."""
    for server in mount(tmp_path, "--direct-io"):
        path = server.mnt / "f"
        path.write_bytes(b"direct")
        assert path.read_bytes() == b"direct"
        with open(path, "r+b") as f:
            try:
                mmap.mmap(f.fileno(), 0).close()
            except OSError as e:
                assert e.errno == 19  # ENODEV
            with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE) as m:
                assert m[:6] == b"direct"


def test_mount_and_vnpager_mmap_in_one_vm_stay_coherent(tmp_path: Path) -> None:
    """One file, written through the mount (the kernel, then our server
    thread, then UBC) and through vnpager.mmap in the same VM, four times
    the VM's size so that pages are paged out and read again in between:
    each side sees the other's writes without a flush, the mount's at once,
    the mapping's at the next open (the kernel caches an open file's pages:
    coherence through the mount is close-to-open), and a truncation
    through the mount at once.  This process touches the mount only with
    read/write/stat (see ``mounted``)."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    rng = random.Random(11)
    size = 4 * PHYSMEM
    model = bytearray(rng.randbytes(size))
    spots = [rng.randrange(size - 10_000) for _ in range(20)]
    vm = vnpager.VM(physmem=PHYSMEM)
    with mounted(vm, str(src), str(mnt)):
        fd = os.open(mnt / "f", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            assert os.pwrite(fd, model, 0) == size
            with open(src / "f", "r+b") as host, vnpager.mmap(host.fileno(), 0, vm=vm) as m:
                assert m[:] == model  # the mount's writes, seen by the mapping
                for off in spots[:10]:  # the mount writes while mapped: seen at once
                    data = rng.randbytes(rng.randrange(1, 10_000))
                    assert os.pwrite(fd, data, off) == len(data)
                    model[off:off + len(data)] = data
                    assert m[off:off + len(data)] == data
                for off in spots[10:]:  # the mapping writes: seen by the next open of the mount
                    data = rng.randbytes(rng.randrange(1, 10_000))
                    m[off:off + len(data)] = data
                    model[off:off + len(data)] = data
                reader = os.open(mnt / "f", os.O_RDONLY)
                try:
                    assert os.pread(reader, size + 1, 0) == model
                finally:
                    os.close(reader)
                os.ftruncate(fd, size // 2)  # through the mount: the mapping's file shrinks at once
                del model[size // 2:]
                assert m[:size // 2] == model
                with pytest.raises(vnpager.BusError):
                    m[size // 2 + 1]
        finally:
            os.close(fd)
        assert os.stat(mnt / "f").st_size == size // 2
    # the unmount wrote every page, the mapping's and the mount's
    assert (src / "f").read_bytes() == model
    assert not os.path.ismount(mnt)


def test_a_file_that_lost_its_name_through_the_mount_stops_persisting(tmp_path: Path) -> None:
    """Unlink and rename over uncache the file's object after their reply:
    each object still dies (no persisting pages of a file without its name),
    while a file kept open across its unlink still reads its data.  Served
    in-process to see the VM; this process touches the mount with
    read/write/stat only."""
    from vnpager.fuse import pager

    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    vm = vnpager.VM(physmem=PHYSMEM)
    with mounted(vm, str(src), str(mnt)):
        keys = []
        for name, data in (("gone", b"1" * 10_000), ("over", b"2" * 20_000), ("open", b"3" * 30_000)):
            (mnt / name).write_bytes(data)
            st = os.stat(src / name)
            keys.append((st.st_dev, st.st_ino))
            assert pager.cached_size(vm, keys[-1]) == len(data)  # closed: the object persists
        (mnt / "new").write_bytes(b"new")
        kept = os.open(mnt / "open", os.O_RDONLY)
        try:
            os.unlink(mnt / "gone")
            os.rename(mnt / "new", mnt / "over")
            os.unlink(mnt / "open")
            deadline = time.monotonic() + 30
            while any(pager.cached_size(vm, k) >= 0 for k in keys[:2]) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert [pager.cached_size(vm, k) for k in keys] == [-1, -1, 30_000]
            assert os.pread(kept, 40_000, 0) == b"3" * 30_000
        finally:
            os.close(kept)
        assert (mnt / "over").read_bytes() == b"new" and sorted(os.listdir(mnt)) == ["over"]
