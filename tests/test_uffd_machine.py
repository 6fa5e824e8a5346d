"""The uffd machine (issue 10): uvm.VM(machine="uffd") and ClientSpace.

The test process is the pager server: a VM of the uffd machine and a
ClientSpace per client; each client is a subprocess (hw_client.py) that
maps an object's memfd and touches it as user code would, its faults
served by the space's threads through uvm_fault.  Every wait is bounded
(DEADLINE), and clients are killed at the end.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from test_arch_uffd import ClientGone, pattern, sha, stop_client
from vnpager.arch.uffd import PAGE_SIZE, Uffd, fdpass
from vnpager.arch.uffd.pmap import HW_WRITE
from vnpager.server.space import ClientSpace, SpaceStatistics
from vnpager.uvm.pmap import pmap_is_modified, pmap_is_referenced
from vnpager.uvm.uvm import VM
from vnpager.uvm.uvm_map import MAP_PRIVATE, MAP_SHARED
from vnpager.uvm.uvm_page import PG_BUSY, uvm_pagedeactivate
from vnpager.vfs.faultfs import FaultFS, FaultPlan

CLIENT = Path(__file__).with_name("hw_client.py")
DEADLINE = 30.0
CLUSTER = 16 * PAGE_SIZE  # MAXBSIZE: the pager's cluster
RO = mmap.PROT_READ
RW = mmap.PROT_READ | mmap.PROT_WRITE


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
        step = 32 * 1024  # a datagram of the socket holds about 200 KiB
        for i in range(0, len(data), step):
            self.request(op="write", at=at, off=off + i, data=data[i : i + step].hex())

    def killed_by(self) -> int:
        """The signal that ended the client (it must end)."""
        return -self.proc.wait(timeout=DEADLINE)

    def close(self) -> None:
        stop_client(self.sock, self.proc)
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


def test_an_object_unmapped_untouched_gives_its_memfd_back(hvm: VM, clients: Callable[[], Client],
                                                           path: Path) -> None:
    c = clients()
    at = c.map(path)
    [uvn] = [m.file.uvn for m in c.space.maps.values()]
    assert hvm.frames.object_frames(uvn) is not None
    c.request(op="munmap", at=at)
    c.space.unmap(at)
    assert hvm.frames.object_frames(uvn) is None


def test_a_grant_never_mapped_is_released(hvm: VM, clients: Callable[[], Client], path: Path) -> None:
    c = clients()
    fd = os.open(path, os.O_RDWR)
    try:
        grant = c.space.map(fd, 0, 0, RW, MAP_SHARED)
    finally:
        os.close(fd)
    [uvn] = [m.file.uvn for m in c.space.grants.values()]
    assert uvn.uo_refs == 1
    c.space.release(grant.id)
    assert uvn.uo_refs == 0 and hvm.frames.object_frames(uvn) is None
    with pytest.raises(ValueError):
        c.space.release(grant.id)


def test_a_map_at_an_offset_reads_the_file_there(clients: Callable[[], Client], path: Path,
                                                  content: bytes) -> None:
    c = clients()
    at = c.map(path, length=2 * CLUSTER, offset=3 * CLUSTER, prot=RO)
    assert c.read(at, 0, 2 * CLUSTER) == sha(content[3 * CLUSTER : 5 * CLUSTER])


def test_writes_are_found_dirty_and_written_back_by_flush(hvm: VM, clients: Callable[[], Client],
                                                          path: Path, content: bytes) -> None:
    c = clients()
    at = c.map(path)
    expect = bytearray(content)
    assert c.read(at, 0, CLUSTER) == sha(content[:CLUSTER])  # mapped write-protected
    c.write(at, 100, b"hello")  # a write-protect fault: PG_MOD
    expect[100:105] = b"hello"
    off = 3 * CLUSTER + 7
    c.write(at, off, b"missing")  # a write fault on a missing page
    expect[off : off + 7] = b"missing"
    stats = c.space.statistics()
    assert (stats.wp, stats.writes) == (1, 2)
    assert path.read_bytes() == content  # not written back yet
    c.space.flush(at, 0, len(content))
    assert path.read_bytes() == expect
    writes = hvm.uvmexp.write_ios
    c.space.flush(at, 0, len(content))
    assert hvm.uvmexp.write_ios == writes  # clean now: nothing written
    # The flush protected the pages again: the next store is seen again.
    c.write(at, 101, b"again")
    expect[101:106] = b"again"
    assert c.space.statistics().wp == 2
    c.space.flush(at, 0, len(content))
    assert path.read_bytes() == expect
    assert c.read(at, 0, len(content)) == sha(bytes(expect))


def test_a_store_to_a_write_protected_page_is_served_without_uvm_fault(hvm: VM, clients: Callable[[], Client],
                                                                      path: Path, content: bytes) -> None:
    """The client space's reader serves a write-protect fault of an idle page
    itself (pmap_emulate_modify): the page is modified, and written back."""
    c = clients()
    at = c.map(path)
    expect = bytearray(content)
    assert c.read(at, 0, CLUSTER) == sha(content[:CLUSTER])  # mapped write-protected
    faults = hvm.uvmexp.faults
    for n in range(2):  # again after the flush, which protected the page again
        c.write(at, 100 + n, b"hello")
        expect[100 + n : 105 + n] = b"hello"
        stats = c.space.statistics()
        assert (stats.wp, stats.pmap.emulated, hvm.uvmexp.faults) == (n + 1, n + 1, faults)
        assert pmap_is_modified(c.space.maps[at].file.uvn.memt[0])
        c.space.flush(at, 0, len(content))
        assert path.read_bytes() == expect


def test_a_sequential_writer_faults_once_a_window_and_loses_no_store(hvm: VM, clients: Callable[[], Client],
                                                                    path: Path, content: bytes) -> None:
    """Stores to consecutive pages make the pages ahead writable with the one
    stored to (write-ahead): few faults, every store written back, and a page
    made writable ahead but stored to only after a flush is seen too."""
    c = clients()
    at = c.map(path)
    npages = len(content) // PAGE_SIZE
    new = pattern(len(content), seed=5)
    expect = bytearray(new[: 6 * PAGE_SIZE + 10] + content[6 * PAGE_SIZE + 10 :])
    c.write(at, 0, expect[: 6 * PAGE_SIZE + 10])  # pages 0-6: the window ahead reaches past them
    uvn = c.space.maps[at].file.uvn
    ahead = [off for off in range(7 * PAGE_SIZE, 16 * PAGE_SIZE, PAGE_SIZE)
             if c.space.pmap.pm_pte.get(at + off, (None, 0))[1] == HW_WRITE]
    assert ahead  # writable, not yet stored to
    c.space.flush(at, 0, len(content))
    assert path.read_bytes() == expect  # the pages made writable ahead went back unchanged
    off = ahead[0] + 7
    c.write(at, off, b"later")  # protected again by the flush: seen
    expect[off : off + 5] = b"later"
    assert pmap_is_modified(uvn.memt[ahead[0]])
    c.write(at, 0, new)  # the whole file, in stores of 32 KiB
    expect[:] = new
    assert c.space.statistics().faults < npages // 4
    c.space.flush(at, 0, len(content))
    assert path.read_bytes() == expect
    assert c.read(at, 0, len(content)) == sha(bytes(expect))


def test_a_write_back_protects_the_writable_pages_around_and_they_stay_dirty(
        hvm: VM, clients: Callable[[], Client], path: Path, content: bytes) -> None:
    """A write-protect for one page's write-back takes the writable pages of
    the object around it along (one ioctl for a cluster): they stay
    modified, are written back later, and a store to one is seen."""
    c = clients()
    at = c.map(path)
    expect = bytearray(content)
    for page in range(4):  # pages 0-3 writable and modified
        c.write(at, page * PAGE_SIZE, b"p%d" % page)
        expect[page * PAGE_SIZE : page * PAGE_SIZE + 2] = b"p%d" % page
    uvn = c.space.maps[at].file.uvn
    pte = c.space.pmap.pm_pte
    assert all(pte[at + page * PAGE_SIZE][1] == HW_WRITE for page in range(4))
    c.space.flush(at, 2 * PAGE_SIZE, PAGE_SIZE)  # page 2 alone...
    assert all(pte[at + page * PAGE_SIZE][1] != HW_WRITE for page in range(4))  # ...all four protected
    written = content[: 2 * PAGE_SIZE] + expect[2 * PAGE_SIZE : 3 * PAGE_SIZE] + content[3 * PAGE_SIZE :]
    assert path.read_bytes() == written  # page 2 only
    assert all(pmap_is_modified(uvn.memt[page * PAGE_SIZE]) for page in (0, 1, 3))
    c.space.flush(at, 0, len(content))  # the rest: all clean now
    assert path.read_bytes() == expect
    for page in (1, 3):  # protected along, clean: a store is seen
        assert not pmap_is_modified(uvn.memt[page * PAGE_SIZE])
        c.write(at, page * PAGE_SIZE + 100, b"again")
        expect[page * PAGE_SIZE + 100 : page * PAGE_SIZE + 105] = b"again"
        assert pmap_is_modified(uvn.memt[page * PAGE_SIZE])
    c.space.flush(at, 0, len(content))
    assert path.read_bytes() == expect


def test_two_sequential_writers_lose_no_store_under_eviction(tmp_path: Path) -> None:
    """Two clients store runs of consecutive pages (write-ahead at work) to
    their own halves of a file 4 times larger than the VM, each reading back
    what it wrote: the pages made writable ahead are evicted, written back
    and faulted in again with the stored ones, and nothing stored is lost."""
    size = 4 * 32 * PAGE_SIZE

    def run(c: Client, at: int, half: int, want: bytearray) -> None:
        rng = random.Random(half)
        lo = half * size // 2
        for step in range(24):
            off = lo + rng.randrange(0, size // 2 - 6 * PAGE_SIZE, 512)
            data = pattern(5 * PAGE_SIZE + 100, seed=100 * half + step)
            c.write(at, off, data)
            want[off : off + len(data)] = data
            check = lo + rng.randrange(0, size // 2, PAGE_SIZE)
            assert c.read(at, check, PAGE_SIZE) == sha(bytes(want[check : check + PAGE_SIZE]))

    vm, stats = _two_clients_at_once(tmp_path, 32, pattern(size, seed=6), run)
    assert vm.uvmexp.pageouts > 0 and all(st.pmap.emulated > 0 for st in stats)


Writer = Callable[[Client, int, int, bytearray], None]


def _two_clients_at_once(tmp_path: Path, npages: int, data: bytes,
                         run: Writer) -> tuple[VM, list[SpaceStatistics]]:
    """Two clients of a VM of *npages* map a file of *data*, and each runs
    ``run(client, its address, its number, want)`` in a thread of its own,
    recording its writes in *want*; then both must see *want*, a flush must
    write it, and the page daemon must have evicted pages meanwhile.  The VM
    (closed) and the two spaces' statistics."""
    vm = VM(physmem=npages * PAGE_SIZE, machine="uffd")
    p = tmp_path / "shared.bin"
    p.write_bytes(data)
    a, b = Client(vm), Client(vm)
    want = bytearray(data)
    errors: list[BaseException] = []

    def guarded(c: Client, at: int, i: int) -> None:
        try:
            run(c, at, i, want)
        except BaseException as e:
            errors.append(e)

    try:
        ats = a.map(p), b.map(p)
        threads = [threading.Thread(target=guarded, args=(c, at, i))
                   for i, (c, at) in enumerate(zip((a, b), ats, strict=True))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE)
        assert not errors, errors
        assert not any(t.is_alive() for t in threads)
        assert vm.uvmexp.pdfreed > 0
        assert a.read(ats[0], 0, len(data)) == sha(bytes(want))
        assert b.read(ats[1], 0, len(data)) == sha(bytes(want))
        a.space.flush(ats[0], 0, len(data))
        assert p.read_bytes() == want
        stats = [a.space.statistics(), b.space.statistics()]
    finally:
        a.close()
        b.close()
        vm.check_invariants()
        vm.close()
    assert vm.stats().frames_resident <= npages
    return vm, stats


def test_two_clients_of_one_object_see_each_others_writes(clients: Callable[[], Client], path: Path,
                                                          content: bytes) -> None:
    a, b = clients(), clients()
    at_a, at_b = a.map(path), b.map(path)
    a.write(at_a, 10, b"from a")
    assert b.read(at_b, 0, PAGE_SIZE) == sha(content[:10] + b"from a" + content[16:PAGE_SIZE])
    assert b.space.statistics().minor == 1  # the page was in the memfd already
    b.write(at_b, 20, b"from b")
    want = content[:10] + b"from a" + content[16:20] + b"from b" + content[26:]
    assert a.read(at_a, 0, len(content)) == sha(want)
    b.space.flush(at_b, 0, len(content))  # the object's dirty pages, whoever wrote them
    assert path.read_bytes() == want


def test_eviction_keeps_resident_pages_within_physmem(tmp_path: Path) -> None:
    npages = 64
    vm = VM(physmem=npages * PAGE_SIZE, machine="uffd")
    data = pattern(4 * npages * PAGE_SIZE, seed=2)
    p = tmp_path / "big.bin"
    p.write_bytes(data)
    c = Client(vm)
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], vm.stats().frames_resident)
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        at = c.map(p)
        assert c.read(at, 0, len(data)) == sha(data)
        assert vm.uvmexp.pdfreed > 0  # the page daemon punched pages out
        assert c.read(at, 0, len(data)) == sha(data)  # faulted in again, intact
        new = pattern(len(data), seed=3)
        c.write(at, 0, new)  # dirty pages written back by the page daemon to make room
        assert vm.uvmexp.pageouts > 0
        assert c.read(at, 0, len(data)) == sha(new)
        c.space.flush(at, 0, len(data))
        assert p.read_bytes() == new
    finally:
        done.set()
        watcher.join(DEADLINE)
        c.close()
        vm.check_invariants()
        vm.close()
    assert 0 < peak[0] <= npages
    assert vm.stats().frames_resident <= npages


def _faulty(vm: VM) -> FaultPlan:
    """Make the VM's host files fail as the plan says (vnodes made from now on)."""
    plan = FaultPlan(seed=1)
    vm.hostfs.mnt_op = FaultFS(vm.hostfs.mnt_op, plan)
    return plan


def test_read_error_is_sigbus_in_the_client(hvm: VM, clients: Callable[[], Client], path: Path,
                                            content: bytes) -> None:
    plan = _faulty(hvm)
    plan.fail("read", errno.EIO, offsets=range(2 * CLUSTER, 3 * CLUSTER))
    c = clients()
    at = c.map(path)
    assert c.read(at, 0, CLUSTER) == sha(content[:CLUSTER])
    with pytest.raises(ClientGone):
        c.read(at, 2 * CLUSTER, PAGE_SIZE)
    assert c.killed_by() == signal.SIGBUS
    assert c.space.statistics().poisoned == 1


def test_write_back_error_is_raised_once_per_map(hvm: VM, clients: Callable[[], Client], path: Path,
                                                 content: bytes) -> None:
    plan = _faulty(hvm)
    c = clients()
    at, other = c.map(path), c.map(path)
    c.write(at, 0, b"doomed?")
    plan.fail("write", errno.ENOSPC, times=1)
    with pytest.raises(OSError) as e:
        c.space.flush(at, 0, PAGE_SIZE)
    assert e.value.errno == errno.ENOSPC
    assert path.read_bytes() == content  # the page stayed dirty...
    c.space.flush(at, 0, PAGE_SIZE)  # ...and is written by the next flush, which is told nothing
    assert path.read_bytes()[:7] == b"doomed?"
    with pytest.raises(OSError):  # the other map was open when it failed: told once too
        c.space.flush(other, 0, PAGE_SIZE)
    c.space.flush(other, 0, PAGE_SIZE)


def test_a_truncated_file_is_sigbus_past_its_end(hvm: VM, clients: Callable[[], Client], path: Path,
                                                 content: bytes) -> None:
    c = clients()
    at = c.map(path)
    assert c.read(at, 0, len(content)) == sha(content)
    os.truncate(path, CLUSTER + 100)
    assert c.space.size(at) == CLUSTER + 100  # taken up: the pages past the end are gone
    assert c.read(at, 0, CLUSTER + PAGE_SIZE) == sha(content[: CLUSTER + 100] + bytes(PAGE_SIZE - 100))
    faults = c.space.statistics().faults
    with pytest.raises(ClientGone):
        c.read(at, 2 * CLUSTER, 1)
    assert c.killed_by() == signal.SIGBUS  # the kernel's own: the memfd ends there
    assert c.space.statistics().faults == faults


def test_resize_truncates_file_object_and_memfd(hvm: VM, clients: Callable[[], Client], path: Path,
                                                content: bytes) -> None:
    c = clients()
    at = c.map(path)
    c.write(at, CLUSTER - 4, b"tail")
    c.space.resize(at, CLUSTER)
    assert os.path.getsize(path) == CLUSTER and c.space.size(at) == CLUSTER
    c.space.flush(at, 0, CLUSTER)
    assert path.read_bytes() == content[: CLUSTER - 4] + b"tail"
    with pytest.raises(ClientGone):
        c.read(at, CLUSTER, 1)
    assert c.killed_by() == signal.SIGBUS


def test_client_death_releases_its_references(hvm: VM, clients: Callable[[], Client], path: Path,
                                              content: bytes) -> None:
    c = clients()
    at = c.map(path)
    c.write(at, 0, b"kept")
    [uvn] = [m.file.uvn for m in c.space.maps.values()]
    assert uvn.uo_refs == 2  # the FileObject's hold and the map entry's
    c.proc.kill()
    assert c.killed_by() == signal.SIGKILL
    c.space.close()
    assert uvn.uo_refs == 0 and not c.space.maps
    assert hvm.frames.object_frames(uvn) is not None  # its dirty page keeps its memfd
    assert not c.space._reader.is_alive() and not c.space._worker.is_alive()
    hvm.close()  # writes the persisting object's dirty page back
    assert path.read_bytes()[:4] == b"kept"


def test_private_map_copies_on_write_in_the_client(hvm: VM, clients: Callable[[], Client], path: Path,
                                                   content: bytes) -> None:
    c, other = clients(), clients()
    priv = c.map(path, flags=MAP_PRIVATE)
    shared = other.map(path)
    c.write(priv, 0, b"mine")  # served as a read; the client's kernel copies the page
    assert c.read(priv, 0, PAGE_SIZE) == sha(b"mine" + content[4:PAGE_SIZE])
    assert c.space.statistics().writes == 0
    assert other.read(shared, 0, PAGE_SIZE) == sha(content[:PAGE_SIZE])  # not in the object
    other.write(shared, PAGE_SIZE, b"theirs")  # a shared write is seen by private pages not copied
    assert c.read(priv, PAGE_SIZE, 6) == sha(b"theirs")
    other.space.flush(shared, 0, len(content))
    assert path.read_bytes() == content[:PAGE_SIZE] + b"theirs" + content[PAGE_SIZE + 6 :]


def test_client_fork_child_is_served_on_its_own_space(hvm: VM, clients: Callable[[], Client], path: Path,
                                                      content: bytes) -> None:
    c = clients()
    at = c.map(path)
    c.write(at, 0, b"parent")
    echo, status = c.request(op="fork_write", at=at, off=5 * CLUSTER, data=b"missing".hex())  # type: ignore[misc]
    assert (bytes.fromhex(echo), status) == (b"missing", 0)
    assert c.space.statistics().forks == 1
    child = c.space.adopt_fork(0)
    assert child.statistics().writes == 1  # its fault, served on its own space
    want = bytearray(content)
    want[:6] = b"parent"
    want[5 * CLUSTER : 5 * CLUSTER + 7] = b"missing"
    assert c.read(at, 0, len(content)) == sha(bytes(want))  # in the shared object
    c.space.flush(at, 0, len(content))
    assert path.read_bytes() == want
    child.close()
    with pytest.raises(LookupError):
        c.space.adopt_fork(0, timeout=0.05)  # no fork left to adopt


def test_a_forked_childs_stores_are_seen_by_every_flush(hvm: VM, clients: Callable[[], Client], path: Path,
                                                        content: bytes) -> None:
    c = clients()
    at = c.map(path)
    c.write(at, 0, b"parent")  # mapped writable in the parent: the child inherits the PTE
    pid = int(c.request(op="fork_child", at=at))  # type: ignore[call-overload]
    child = c.space.adopt_fork(pid)
    c.request(op="child_write", off=100, data=b"one".hex())
    c.space.flush(at, 0, PAGE_SIZE)  # writes the page and protects it: in the child too
    assert path.read_bytes()[:103] == b"parent" + content[6:100] + b"one"
    c.request(op="child_write", off=200, data=b"two".hex())  # so this store faults, and is seen
    c.space.flush(at, 0, PAGE_SIZE)
    assert path.read_bytes()[200:203] == b"two"
    assert c.request(op="child_exit") == 0
    assert child.statistics().wp >= 1
    child.close()


def test_threads_of_a_client_fault_the_same_and_different_pages(clients: Callable[[], Client],
                                                                path: Path, content: bytes) -> None:
    c = clients()
    at = c.map(path)
    offs = [0, 0, PAGE_SIZE, CLUSTER, CLUSTER, 3 * CLUSTER + 5 * PAGE_SIZE, 7 * CLUSTER] * 2
    digests = c.request(op="threads_read", at=at, offs=offs, n=PAGE_SIZE)
    assert digests == [sha(content[o : o + PAGE_SIZE]) for o in offs]


def test_a_store_during_write_back_waits_for_it(hvm: VM, clients: Callable[[], Client], path: Path,
                                                content: bytes) -> None:
    plan = _faulty(hvm)
    c = clients()
    at = c.map(path)
    c.write(at, 0, b"first")
    [uvn] = [m.file.uvn for m in c.space.maps.values()]
    pg = uvn.memt[0]
    plan.delay("write", 0.5)
    flusher = threading.Thread(target=c.space.flush, args=(at, 0, PAGE_SIZE))
    flusher.start()
    pte = c.space.pmap.pm_pte  # the flush write-protects the client's page before it writes it

    def writing() -> bool:
        return bool(pg.pg_flags & PG_BUSY) and pte[at][1] != HW_WRITE

    wait_for(writing, "the write-back under way")
    c.write(at, 1, b"second")  # write-protected by the flush: served once the page is written
    flusher.join(DEADLINE)
    assert path.read_bytes()[:6] == b"first" + content[5:6]  # the write-back did not take it...
    assert pmap_is_modified(pg)  # ...and the page is dirty again
    c.space.flush(at, 0, PAGE_SIZE)
    assert path.read_bytes()[:7] == b"fsecond"


def test_clearing_a_reference_makes_the_next_touch_a_minor_fault(hvm: VM, clients: Callable[[], Client],
                                                                 path: Path, content: bytes) -> None:
    c = clients()
    at = c.map(path)
    assert c.read(at, 0, PAGE_SIZE) == sha(content[:PAGE_SIZE])
    [uvn] = [m.file.uvn for m in c.space.maps.values()]
    pg = uvn.memt[0]
    assert pmap_is_referenced(pg)
    with hvm.pageqlock:
        uvm_pagedeactivate(pg)  # the page daemon's second chance: PG_REF cleared, the client's PTE zapped
    assert not pmap_is_referenced(pg)
    # The PAGEOUTs wait for a batch, or for the client's next fault: one elsewhere.
    assert c.read(at, 4 * CLUSTER, PAGE_SIZE) == sha(content[4 * CLUSTER : 4 * CLUSTER + PAGE_SIZE])
    minor = c.space.statistics().minor
    assert c.read(at, 0, PAGE_SIZE) == sha(content[:PAGE_SIZE])
    stats = c.space.statistics()
    assert stats.minor == minor + 1 and stats.pmap.pageouts == 1
    assert pmap_is_referenced(pg)


def test_resize_grows_the_map_where_the_client_moved_it(hvm: VM, clients: Callable[[], Client], path: Path,
                                                       content: bytes) -> None:
    c = clients()
    at = c.map(path, length=CLUSTER)
    assert c.read(at, 0, CLUSTER) == sha(content[:CLUSTER])
    size = len(content) + CLUSTER
    c.space.resize(at, size)  # the file grows: zeros past the old end
    new = int(c.request(op="resize", at=at, n=size))  # type: ignore[call-overload]
    c.space.moved(at, new, size)  # registered again where mremap put it
    want = content + bytes(CLUSTER)
    assert c.read(new, 0, size) == sha(want)
    c.write(new, len(content), b"grown")
    c.space.flush(new, 0, size)
    assert path.read_bytes() == content + b"grown" + bytes(CLUSTER - 5)


def test_two_clients_write_and_read_under_eviction(tmp_path: Path) -> None:
    """Each client writes its own pages of a file 4 times larger than the VM
    and checks what it reads, both at once: pages are evicted dirty,
    written back and faulted in again, by either client."""
    size = 4 * 32 * PAGE_SIZE

    def run(c: Client, at: int, parity: int, want: bytearray) -> None:
        rng = random.Random(parity)
        mine = [i for i in range(size // PAGE_SIZE) if i % 2 == parity]
        for step in range(60):
            page = rng.choice(mine)
            data = bytes([step + 1]) * 64
            off = page * PAGE_SIZE + rng.randrange(PAGE_SIZE - 64)
            c.write(at, off, data)
            want[off : off + 64] = data
            check = rng.choice(mine) * PAGE_SIZE
            assert c.read(at, check, PAGE_SIZE) == sha(bytes(want[check : check + PAGE_SIZE]))

    _two_clients_at_once(tmp_path, 32, bytes(size), run)


def test_a_fault_the_server_fails_to_serve_is_sigbus(monkeypatch: pytest.MonkeyPatch, hvm: VM,
                                                     clients: Callable[[], Client], path: Path) -> None:
    import vnpager.server.space as space_module

    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    c = clients()
    at = c.map(path)
    monkeypatch.setattr(space_module, "uvm_fault", broken)
    with pytest.raises(ClientGone):
        c.read(at, 0, 1)
    assert c.killed_by() == signal.SIGBUS  # not a client hanging for ever


def test_a_page_past_the_end_still_in_the_memfd_is_sigbus(hvm: VM, clients: Callable[[], Client], path: Path,
                                                          content: bytes) -> None:
    c = clients()
    at = c.map(path)
    [uvn] = [m.file.uvn for m in c.space.maps.values()]
    c.space.resize(at, CLUSTER)
    of = hvm.frames.object_frames(uvn)
    assert of is not None
    of._truncate(len(content))  # as while a page past the new end is still busy (see frames)
    with pytest.raises(ClientGone):
        c.read(at, 2 * CLUSTER, 1)  # a fault past the object's end: BusError, answered POISON
    assert c.killed_by() == signal.SIGBUS
    assert c.space.statistics().poisoned == 1
