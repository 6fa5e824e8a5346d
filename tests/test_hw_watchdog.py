"""A client whose server dies: SIGBUS on the next fault, OSError from the
map methods, within a bounded time -- never a hang, never zeros.

The server here is the test's own (tests/hw_fake_server.py: FaultSpaces, every
page resolved by UFFDIO_CONTINUE), so that its death is the only thing
under test; test_hw_mmap.py kills the real one.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hw_procs import DEADLINE, Client, ServerProc

PAGE = mmap.PAGESIZE


@pytest.fixture
def content(tmp_path: Path) -> bytes:
    data = bytes(range(256)) * (8 * PAGE // 256)
    (tmp_path / "f").write_bytes(data)
    return data


@pytest.fixture
def server() -> Iterator[ServerProc]:
    srv = ServerProc(fake=True)
    try:
        yield srv
    finally:
        srv.stop()


def stop(pid: int) -> None:
    """SIGSTOP *pid* and wait until it is stopped (state T), not only signalled."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] == "T":
                return
        time.sleep(0.01)
    raise TimeoutError(f"pid {pid} did not stop")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_watchdog_turns_a_dead_server_into_sigbus(server: ServerProc, content: bytes, tmp_path: Path) -> None:
    client = Client()
    try:
        client.do(op="connect", path=server.path)
        client.do(op="map", file=str(tmp_path / "f"))
        assert client.do(op="read", off=0, n=PAGE) == sha(content[:PAGE])
        assert client.do(op="stats")["faults"] == 1  # the page faulted into the server
        server.kill()
        # the page mapped stays readable: it is memory the client maps
        assert client.do(op="read", off=0, n=PAGE) == sha(content[:PAGE])
        name, err, _ = client.error(op="flush")
        assert (name, err) == ("ServerGone", errno.EPIPE)
        client.send(op="read", off=3 * PAGE, n=PAGE)  # never mapped: it faults, and nobody serves it
        assert client.proc.wait(DEADLINE) == -signal.SIGBUS
    finally:
        client.kill()


def test_watchdog_wakes_a_fault_the_dead_server_had_read(server: ServerProc, content: bytes,
                                                        tmp_path: Path) -> None:
    # The fault is taken while the server is stopped (SIGSTOP): its event
    # waits in the uffd; the server then dies without reading it.
    client = Client()
    try:
        client.do(op="connect", path=server.path)
        client.do(op="map", file=str(tmp_path / "f"))
        stop(server.proc.pid)
        client.send(op="read", off=5 * PAGE, n=PAGE)
        try:
            line = client.lines.readline(timeout=1.0)  # the fault waits for a server that cannot run
        except TimeoutError:
            line = "timeout"
        assert line == "timeout"
        server.kill()
        assert client.proc.wait(DEADLINE) == -signal.SIGBUS
    finally:
        client.kill()
