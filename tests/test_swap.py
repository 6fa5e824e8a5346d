"""Anonymous and private pages page out to swap on disk (vfs/swapfs.py),
so that physmem bounds the process's memory for every kind of page."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import vnpager
from helpers import PS, WAIT
from vnpager.vfs.swapfs import SwapNode, _copy_data, _tmpfile


def _run(code: str, env: dict[str, str]) -> Any:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=110, check=True)
    return json.loads(out.stdout)


def test_swap_anonymous_memory_64_times_physmem(tmp_path: Path) -> None:
    """Every page of a 128 MiB anonymous map written (a pattern of its own)
    and read back through a 2 MiB VM: all right, and the peak RSS of the
    process (VmHWM, in a child of its own) stays below the map's size.
    Paged out to memfs, every byte of the map was in the process.

    (1 GiB through 16 MiB, the same ratio, takes a minute: see the README.)
    """
    code = """
        import json, vnpager
        size, chunk, ps = 128 << 20, 4 << 20, 4096

        def block(off):  # page i holds the number i, over and over
            pages = range(off // ps, (off + chunk) // ps)
            return b"".join(i.to_bytes(8, "little") * (ps // 8) for i in pages)

        vm = vnpager.VM(physmem=2 << 20)
        with vnpager.mmap(-1, size, vm=vm) as m:
            for off in range(0, size, chunk):
                m[off:off + chunk] = block(off)
            wrong = sum(m[off:off + chunk] != block(off) for off in range(0, size, chunk))
        vm.check_invariants()
        with open("/proc/self/status") as status:
            hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        print(json.dumps({"wrong": wrong, "pageouts": vm.uvmexp.pageouts, "maxrss_kib": hwm}))
    """
    got = _run(code, {"VNPAGER_SWAPDIR": str(tmp_path)})
    assert got["wrong"] == 0
    assert got["pageouts"] >= (128 << 20) // PS - (2 << 20) // PS
    assert got["maxrss_kib"] < 100 * 1024
    assert os.listdir(tmp_path) == []  # unlinked files, and all given back


def _swap_nodes(vm: vnpager.VM) -> list[SwapNode]:
    return [vp.v_data for vp in vm.swapfs.mnt_vnodes.values() if isinstance(vp.v_data, SwapNode)]


def test_swap_space_goes_back_when_the_map_closes(tmp_path: Path) -> None:
    """A map that paged out has a swap file; closing the map gives its disk
    space back (uvm_anon_discard) and keeps no descriptor of it."""
    vm = vnpager.VM(physmem=32 * PS, swapdir=str(tmp_path))
    m = vnpager.mmap(-1, 128 * PS, vm=vm)
    m[:] = b"s" * (128 * PS)
    assert m[:] == b"s" * (128 * PS)
    vm.quiesce(WAIT)
    files = [n.fd for n in _swap_nodes(vm) if n.fd >= 0]
    assert len(files) == 1 and os.fstat(files[0]).st_blocks > 0
    m.close()
    assert not [n for n in _swap_nodes(vm) if n.fd >= 0]
    vm.check_invariants()
    vm.close()


def test_swap_private_pages_page_out_too(tmp_path: Path) -> None:
    """The pages a MAP_PRIVATE map writes live in its amap, paged out to
    swap like anonymous memory; the file never sees them."""
    path = tmp_path / "f"
    path.write_bytes(bytes(128 * PS))
    vm = vnpager.VM(physmem=32 * PS, swapdir=str(tmp_path))
    with open(path, "rb") as f, vnpager.mmap(f.fileno(), 0, access=vnpager.ACCESS_COPY, vm=vm) as m:
        for i in range(128):
            m[i * PS:(i + 1) * PS] = bytes([i + 1]) * PS
        assert all(m[i * PS:(i + 1) * PS] == bytes([i + 1]) * PS for i in range(128))
        assert any(n.fd >= 0 for n in _swap_nodes(vm))
    assert path.read_bytes() == bytes(128 * PS)
    vm.check_invariants()
    vm.close()


@pytest.mark.parametrize("host", ["linux", "portable"])
def test_swap_fork_copy_keeps_data_and_holes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             host: str) -> None:
    """The child's copy of a swap file has the same bytes; where the host
    can tell holes (SEEK_DATA), they stay holes.  "portable" is a host with
    neither SEEK_DATA nor copy_file_range."""
    if host == "portable":
        monkeypatch.delattr(os, "SEEK_DATA")
        monkeypatch.delattr(os, "copy_file_range")
    size = 8 << 20
    src = _tmpfile(str(tmp_path))
    os.ftruncate(src, size)
    os.pwrite(src, b"x" * PS, 0)
    os.pwrite(src, b"y" * 3 * PS, 5 << 20)
    dst = _tmpfile(str(tmp_path))
    try:
        _copy_data(src, dst, size)
        assert os.fstat(dst).st_size == size
        assert os.pread(dst, size, 0) == os.pread(src, size, 0)
        if host == "linux":
            assert os.fstat(dst).st_blocks * 512 < 1 << 20
    finally:
        os.close(src)
        os.close(dst)
