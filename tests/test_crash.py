"""Crashes (issue 4, point 6): a child writes and flushes through vnpager
and is killed with SIGKILL at a random moment; every byte acknowledged by
a flush that returned before the kill is in the file afterwards."""

from __future__ import annotations

import os
import random
import select
import subprocess
import sys
from pathlib import Path

import pytest

from crash_child import ACK, generation

CHILD = Path(__file__).with_name("crash_child.py")
SIZE = 32 * 4096 + 1000
WAIT = 30.0  # a bound on waiting for the child, never a measure


def _apply(model: bytearray, writes: list[tuple[int, bytes]]) -> bytearray:
    out = bytearray(model)
    for off, data in writes:
        out[off:off + len(data)] = data
    return out


def _acks(fd: int) -> list[int]:
    """Every acknowledgement the child sent before it died."""
    data = b""
    while chunk := os.read(fd, 1 << 16):
        data += chunk
    return [ACK.unpack_from(data, i)[0] for i in range(0, len(data) - len(data) % ACK.size, ACK.size)]


@pytest.mark.parametrize("seed", range(6))
def test_acknowledged_flushes_survive_sigkill(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    path = tmp_path / "f"
    initial = bytearray(rng.randbytes(SIZE))
    path.write_bytes(initial)
    r, w = os.pipe()
    child = subprocess.Popen([sys.executable, str(CHILD), str(path), str(seed), str(w)],
                             pass_fds=(w,), stderr=subprocess.PIPE, cwd=CHILD.parent)
    os.close(w)
    try:
        # kill it once it is under way, at a random moment
        ready, _, _ = select.select([r], [], [], WAIT)
        assert ready, "the child never acknowledged a flush"
        select.select([], [], [], rng.uniform(0.0, 0.4))
        child.kill()
        child.wait(WAIT)
        assert child.returncode == -9, child.stderr.read().decode() if child.stderr else ""
        acks = _acks(r)
    finally:
        os.close(r)
        if child.stderr:
            child.stderr.close()
    assert acks == list(range(1, len(acks) + 1))
    last = acks[-1]

    acknowledged = initial
    for g in range(1, last + 1):
        acknowledged = _apply(acknowledged, generation(seed, g, SIZE))
    # the generation under way when it died may be on disk in part, no other
    in_flight = _apply(acknowledged, generation(seed, last + 1, SIZE))
    disk = path.read_bytes()
    assert len(disk) == SIZE
    lost = [i for i, b in enumerate(disk) if b != acknowledged[i] and b != in_flight[i]]
    assert not lost, f"after {last} acknowledged flushes, {len(lost)} bytes differ, first at {lost[0]:#x}"
