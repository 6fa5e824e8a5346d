"""The mount's request profile (vnpager.fuse.profile): every request counted
by kind, its bytes, and its time split in stages that add up to the
handler's; thread hops after a reply in a row of their own; the table
printed at unmount, in-process and by a ``VNPAGER_FUSE_PROFILE`` server.
Figures are checked for what they count, never for how long anything took."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

import vnpager
from fuse_helpers import PHYSMEM, Server
from vnpager.fuse import pager
from vnpager.fuse.mount import mounted
from vnpager.fuse.profile import AFTER_REPLY, STAGES, RequestProfile


def _dirs(tmp_path: Path) -> tuple[Path, Path]:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    return src, mnt


def test_the_profile_counts_every_request_and_its_stages(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    src, mnt = _dirs(tmp_path)
    data = random.Random(3).randbytes(5 * 4096 + 100)
    vm = vnpager.VM(physmem=PHYSMEM)
    prof = RequestProfile()
    with mounted(vm, str(src), str(mnt), profile=prof):
        (mnt / "f").write_bytes(data)
        assert (mnt / "f").read_bytes() == data
        st = os.stat(src / "f")
        os.unlink(mnt / "f")  # its object is uncached after the reply, in a thread
        deadline = time.monotonic() + 30
        while pager.cached_size(vm, (st.st_dev, st.st_ino)) >= 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    ops = prof.ops
    assert ops["write"].nbytes == len(data)  # every byte written, once
    assert ops["read"].n >= 1 and ops["read"].nbytes >= len(data)
    assert ops["create"].n == 1 and ops["create"].threaded == 1  # the object is opened in a worker
    assert ops["release"].threaded == ops["release"].n >= 2  # each close detaches in a worker
    assert ops["unlink"].n == 1 and ops["unlink"].threaded == 0  # its uncache comes after the reply
    assert ops[AFTER_REPLY].n == 1
    for s in ops.values():
        assert set(s.seconds) == set(STAGES)
        assert all(t >= 0 for t in s.seconds.values()), s  # the hops fit inside their handler
    report = capsys.readouterr().out
    assert "request profile" in report
    for op in ("write", "read", "create", "release", "unlink", AFTER_REPLY):
        assert f"\n{op} " in report


def test_a_server_started_with_the_variable_prints_its_profile_at_unmount(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, mnt = _dirs(tmp_path)
    monkeypatch.setenv("VNPAGER_FUSE_PROFILE", "cprofile")
    server = Server(src, mnt)
    try:
        (mnt / "f").write_bytes(b"x" * 10_000)
        assert (mnt / "f").read_bytes() == b"x" * 10_000
    finally:
        assert server.stop() == 0
    assert "request profile" in server.output
    assert "\nwrite " in server.output
    assert "cumulative" in server.output  # the worker calls' cProfile, sorted
