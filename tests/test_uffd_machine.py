"""The uffd machine (issue 10): uvm.VM(machine="uffd") and ClientSpace.

The test process is the pager server: a VM of the uffd machine and a
ClientSpace per client; each client is a subprocess (hw_client.py) that
maps an object's memfd and touches it as user code would, its faults
served by the space's threads through uvm_fault.  Every wait is bounded
(DEADLINE), and clients are killed at the end.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vnpager.arch.uffd import PAGE_SIZE, Uffd, fdpass
from vnpager.server.space import ClientSpace
from vnpager.uvm.uvm import VM
from vnpager.uvm.uvm_map import MAP_PRIVATE, MAP_SHARED

CLIENT = Path(__file__).with_name("hw_client.py")
DEADLINE = 30.0
CLUSTER = 16 * PAGE_SIZE  # MAXBSIZE: the pager's cluster
RO = mmap.PROT_READ
RW = mmap.PROT_READ | mmap.PROT_WRITE


class ClientGone(Exception):
    """The client's socket reached end of file: it exited or died."""


def pattern(size: int, seed: int = 1) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest()
    out = bytearray()
    while len(out) < size:
        out += hashlib.sha256(block + len(out).to_bytes(8, "little")).digest()
    return bytes(out[:size])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)


class Client:
    """One client subprocess and its space in the test's server."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([sys.executable, str(CLIENT), str(child.fileno())],
                                     pass_fds=[child.fileno()])
        child.close()
        self.sock.settimeout(DEADLINE)
        payload, fds = fdpass.recv(self.sock, 4096, 1)
        hello = json.loads(payload)
        self.pid: int = hello["pid"]
        self.space = ClientSpace(vm, Uffd(fds[0], hello["features"]), self.pid)

    def map(self, path: Path, length: int = 0, offset: int = 0, prot: int = RW,
            flags: int = MAP_SHARED) -> int:
        """Map *path* as ``mmap.mmap(fd, length, flags, prot, offset=offset)``
        would in the client; its address."""
        fd = os.open(path, os.O_RDWR if prot & mmap.PROT_WRITE and not flags & MAP_PRIVATE else os.O_RDONLY)
        try:
            grant = self.space.map(fd, length, offset, prot, flags)
        finally:
            os.close(fd)
        length = length or grant.size - offset
        cmd = {"op": "map", "length": length, "offset": offset, "prot": prot, "flags": flags}
        fdpass.send(self.sock, json.dumps(cmd).encode(), [grant.memfd])
        addr = int(self._reply())  # type: ignore[call-overload]
        self.space.mapped(grant.id, addr, length)
        return addr

    def request(self, **cmd: object) -> object:
        self.sock.send(json.dumps(cmd).encode())
        return self._reply()

    def _reply(self) -> object:
        try:
            reply = self.sock.recv(1 << 20)
        except TimeoutError:
            raise TimeoutError(f"the client did not answer in {DEADLINE} s") from None
        if not reply:
            raise ClientGone
        return json.loads(reply)["ok"]

    def read(self, at: int, off: int, n: int) -> str:
        return str(self.request(op="read", at=at, off=off, n=n))

    def write(self, at: int, off: int, data: bytes) -> None:
        self.request(op="write", at=at, off=off, data=data.hex())

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.sock.send(json.dumps({"op": "exit"}).encode())
                self.proc.wait(timeout=DEADLINE)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=DEADLINE)
        self.space.close()
        self.sock.close()


@pytest.fixture
def hvm() -> Iterator[VM]:
    """A uffd machine of 256 pages (1 MiB)."""
    machine = VM(physmem=256 * PAGE_SIZE, machine="uffd")
    yield machine
    machine.check_invariants()
    machine.close()


@pytest.fixture
def clients(hvm: VM) -> Iterator[Callable[[], Client]]:
    made: list[Client] = []

    def make() -> Client:
        made.append(Client(hvm))
        return made[-1]

    yield make
    for c in made:
        c.close()


@pytest.fixture
def content() -> bytes:
    return pattern(8 * CLUSTER)


@pytest.fixture
def path(tmp_path: Path, content: bytes) -> Path:
    p = tmp_path / "data.bin"
    p.write_bytes(content)
    return p


def test_read_fault_is_served_by_the_pager_in_clusters(hvm: VM, clients: Callable[[], Client],
                                                        path: Path, content: bytes) -> None:
    c = clients()
    at = c.map(path, prot=RO)
    off = CLUSTER + 3 * PAGE_SIZE
    assert c.read(at, off, PAGE_SIZE) == sha(content[off : off + PAGE_SIZE])
    stats = c.space.statistics()
    assert stats.faults == 1 and stats.poisoned == 0 and stats.pmap.continues == 1
    assert (hvm.uvmexp.read_ios, hvm.uvmexp.pageins) == (1, 1)  # a random miss reads its page
    # A sequential stream reads growing windows, each in one read, mapped in one CONTINUE.
    assert c.read(at, 0, len(content)) == sha(content)
    stats = c.space.statistics()
    npages = len(content) // PAGE_SIZE
    assert stats.faults <= 12 and stats.pmap.continues == stats.faults
    assert hvm.uvmexp.pageins == npages  # each page read once
    assert hvm.uvmexp.read_ios <= 10


def test_sequential_advice_reads_the_largest_window_in_one_read(
        hvm: VM, clients: Callable[[], Client], path: Path, content: bytes) -> None:
    c = clients()
    at = c.map(path, prot=RO)
    c.space.madvise(at, 0, len(content), mmap.MADV_SEQUENTIAL)
    assert c.read(at, 0, PAGE_SIZE) == sha(content[:PAGE_SIZE])
    window = 256 * 1024 // PAGE_SIZE
    assert (hvm.uvmexp.read_ios, hvm.uvmexp.pageins) == (1, window)
    # (the worker counts what CONTINUE mapped after it returned, and woke the client)
    wait_for(lambda: c.space.statistics().pmap.mapped == window, "the window mapped")
    stats = c.space.statistics()
    assert (stats.faults, stats.pmap.continues) == (1, 1)
    assert c.read(at, 0, window * PAGE_SIZE) == sha(content[: window * PAGE_SIZE])
    assert c.space.statistics().faults == 1  # all of it mapped by the one fault


def test_numpy_and_kernel_accesses_fault_through_the_space(clients: Callable[[], Client], path: Path,
                                                            content: bytes) -> None:
    c = clients()
    at = c.map(path, prot=RO)
    assert c.request(op="numpy_sum", at=at, off=0, n=len(content)) == sum(content)
    off = 5 * CLUSTER
    assert c.request(op="os_write", at=at, off=off, n=PAGE_SIZE) == sha(content[off : off + PAGE_SIZE])


def test_a_map_at_an_offset_reads_the_file_there(clients: Callable[[], Client], path: Path,
                                                  content: bytes) -> None:
    c = clients()
    at = c.map(path, length=2 * CLUSTER, offset=3 * CLUSTER, prot=RO)
    assert c.read(at, 0, 2 * CLUSTER) == sha(content[3 * CLUSTER : 5 * CLUSTER])
