"""Real faults, not injected ones (issue 4, point 3): a full filesystem
(a small tmpfs this test mounts), and a file truncated or deleted by
someone else while it is mapped."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import vnpager
from vnpager import VM, BusError

PS = vnpager.PAGESIZE


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 128 KiB (32 pages), unmounted after."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mnt)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True, timeout=30)


def test_enospc_from_a_full_filesystem(vm: VM, small_tmpfs: Path) -> None:
    ballast = small_tmpfs / "ballast"
    ballast.write_bytes(b"b" * (24 * PS))  # 8 pages of 32 left
    path = small_tmpfs / "f"
    with open(path, "wb") as f:
        f.truncate(16 * PS)  # sparse: needs 16 pages once written
    data = os.urandom(16 * PS)
    with open(path, "r+b") as f:
        m = vnpager.mmap(f.fileno(), 0, vm=vm)
        m[:] = data
        with pytest.raises(OSError) as exc:
            m.flush()
        assert exc.value.errno == errno.ENOSPC
        assert m[:] == data  # every page kept, dirty
        ballast.unlink()
        m.flush()  # room again: the same pages are written
        m.close()
    assert path.read_bytes() == data


def _mapped(vm: VM, path: Path, npages: int) -> tuple[vnpager.mmap, bytes]:
    data = os.urandom(npages * PS)
    path.write_bytes(data)
    with open(path, "r+b") as f:
        return vnpager.mmap(f.fileno(), 0, vm=vm), data


def test_truncated_from_outside_while_mapped(vm: VM, tmp_path: Path) -> None:
    path = tmp_path / "f"
    m, data = _mapped(vm, path, 4)
    assert m[:] == data  # all resident
    m[3 * PS:3 * PS + 4] = b"gone"  # dirty, past the end-to-be
    os.truncate(path, PS + 100)

    with pytest.raises(BusError):
        m[3 * PS]
    with pytest.raises(BusError):
        m[2 * PS] = 1
    assert m[:PS + 100] == data[:PS + 100]  # the process lives, the rest still works
    m[:4] = b"kept"
    m.flush()
    # the dirty page past the new end was dropped, not written back: no resurrection
    assert path.read_bytes() == b"kept" + data[4:PS + 100]
    vm.check_invariants()
    m.close()


def test_deleted_from_outside_while_mapped(vm: VM, tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(6 * PS)
    path.write_bytes(data)
    with open(path, "r+b") as f:
        m = vnpager.mmap(f.fileno(), 0, vm=vm)
        assert m[:PS] == data[:PS]
        path.unlink()
        path.write_bytes(b"another file")  # a new file at the old name
        # the mapping keeps its file, as a kernel mapping keeps its inode
        assert m[:] == data
        m[PS:PS + 5] = b"still"
        m.flush()
        assert os.pread(f.fileno(), 5, PS) == b"still"
        m.close()
    assert path.read_bytes() == b"another file"
    vm.check_invariants()
