"""The hardware machine's lowest layer (vnpager.arch.uffd), on the real
kernel: userfaultfd, shmem minor faults, PAGEMAP_SCAN, PUNCH_HOLE, POISON.

The test process plays the pager server and never touches a registered
page itself; each client is a subprocess (uffd_client.py), because a
thread blocked in a fault holds the GIL until it is served.  Every wait
is bounded: a request gives up after DEADLINE seconds, and subprocesses
are waited for with timeouts and killed at the end.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vnpager.arch.uffd import (
    PAGE_SIZE,
    MemFile,
    Pagemap,
    Process,
    Uffd,
    UffdMsg,
    UffdUnavailable,
    fdpass,
    uapi,
)
from vnpager.arch.uffd.userfaultfd import open_fd, supported_features

CLIENT = Path(__file__).with_name("uffd_client.py")
CLUSTER = 16 * PAGE_SIZE
DEADLINE = 30.0
ALL_MODES = ("missing", "minor", "wp")


class ClientGone(Exception):
    """The client's socket reached end of file: it exited or died."""


def pattern(size: int, seed: int = 1) -> bytes:
    """Bytes that differ from page to page and from zero."""
    block = hashlib.sha256(str(seed).encode()).digest()
    out = bytearray()
    while len(out) < size:
        out += hashlib.sha256(block + len(out).to_bytes(8, "little")).digest()
    return bytes(out[:size])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Server:
    """The test's pager server for one client subprocess: it owns the
    file's memfd (frames), serves the client's faults from ``content``
    and counts them.  ``on_fault`` is the policy; the default fills the
    fault's cluster if it is missing and maps it write-protected."""

    def __init__(self, content: bytes, memfile: MemFile, modes: tuple[str, ...] = ALL_MODES, *,
                 anon: bool = False, features: int = 0, drop: int = 0) -> None:
        self.content = content
        self.memfile = memfile
        self.faults: list[UffdMsg] = []
        self.on_fault: Callable[[Uffd, UffdMsg], None] = self.fill_and_map
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([sys.executable, str(CLIENT), str(child.fileno())],
                                     pass_fds=[child.fileno()])
        child.close()
        self.sock.settimeout(DEADLINE)
        setup = {"length": len(content), "modes": modes, "anon": anon, "features": features, "drop": drop}
        fdpass.send(self.sock, json.dumps(setup).encode(), [memfile.fd])
        payload, fds = fdpass.recv(self.sock, 4096, 1)
        hello = json.loads(payload)
        self.uffd = Uffd(fds[0], hello["features"])
        self.uffds = [self.uffd]  # and those of the client's forked children
        self.pid: int = hello["pid"]
        self.base: int = hello["address"]
        if "wp" in modes:
            # Untouched pages have no PTE, which PAGEMAP_SCAN counts as
            # written: protect the whole range once so that they read clean.
            self.uffd.writeprotect(self.base, len(content))

    def fill_and_map(self, uffd: Uffd, msg: UffdMsg) -> None:
        off = (msg.address - self.base) // CLUSTER * CLUSTER
        end = min(off + CLUSTER, len(self.content))
        if not msg.is_minor:
            self.memfile.fill(off, self.content[off:end])
        uffd.resolve(self.base + off, end - off, wp=True)

    def request(self, **cmd: object) -> object:
        """Send *cmd* to the client and serve its faults until it answers."""
        self.sock.send(json.dumps(cmd).encode())
        deadline = time.monotonic() + DEADLINE
        while (left := deadline - time.monotonic()) > 0:
            poller = select.poll()
            for fd in [u.fd for u in self.uffds] + [self.sock.fileno()]:
                poller.register(fd, select.POLLIN)
            ready = {fd for fd, _ in poller.poll(int(left * 1000) + 1)}
            for uffd in [u for u in self.uffds if u.fd in ready]:
                for msg in uffd.read_events():
                    self.event(uffd, msg)
            if self.sock.fileno() in ready:
                reply = self.sock.recv(1 << 16)
                if not reply:
                    raise ClientGone
                return json.loads(reply)["ok"]
        raise TimeoutError(f"no answer to {cmd} in {DEADLINE} s")

    def event(self, uffd: Uffd, msg: UffdMsg) -> None:
        if msg.event == uapi.UFFD_EVENT_FORK:
            self.uffds.append(Uffd(msg.ufd, uffd.features))
            return
        assert msg.is_pagefault, msg
        self.faults.append(msg)
        self.on_fault(uffd, msg)

    def close(self) -> None:
        stop_client(self.sock, self.proc)
        self.sock.close()
        for uffd in self.uffds:
            uffd.close()


def stop_client(sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
    """Ask a client subprocess to exit; kill it if it does not, in time."""
    if proc.poll() is None:
        try:
            sock.send(json.dumps({"op": "exit"}).encode())
            proc.wait(timeout=DEADLINE)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait(timeout=DEADLINE)


@pytest.fixture
def content() -> bytes:
    return pattern(4 * CLUSTER)


@pytest.fixture
def memfile(content: bytes) -> Iterator[MemFile]:
    with MemFile.create("vnpager-test", len(content)) as mf:
        yield mf


@pytest.fixture
def server(content: bytes, memfile: MemFile) -> Iterator[Server]:
    srv = Server(content, memfile)
    try:
        yield srv
    finally:
        srv.close()


def test_uffd_open_has_the_server_features() -> None:
    with Uffd.open() as uffd:
        for feature in (uapi.UFFD_FEATURE_MINOR_SHMEM, uapi.UFFD_FEATURE_MISSING_SHMEM,
                        uapi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM, uapi.UFFD_FEATURE_WP_ASYNC,
                        uapi.UFFD_FEATURE_POISON):
            assert uffd.has(feature), hex(feature)
        assert not uffd.has(uapi.UFFD_FEATURE_SIGBUS)  # it would turn every fault into SIGBUS


def test_uffd_missing_fault_served_by_continue(server: Server, content: bytes) -> None:
    off = CLUSTER + 3 * PAGE_SIZE
    assert server.request(op="read", off=off, n=PAGE_SIZE) == sha(content[off : off + PAGE_SIZE])
    [msg] = server.faults
    assert msg.address == server.base + off and not msg.is_minor and not msg.is_write
    assert msg.ptid == server.pid  # UFFD_FEATURE_THREAD_ID: the client's main thread
    # The whole cluster was mapped: the rest of it reads with no fault.
    assert server.request(op="read", off=CLUSTER, n=CLUSTER) == sha(content[CLUSTER : 2 * CLUSTER])
    assert len(server.faults) == 1


def test_uffd_numpy_frombuffer_reads_through_faults(server: Server, content: bytes) -> None:
    total = sum(content)
    assert server.request(op="numpy_sum", off=0, n=len(content)) == total
    assert len(server.faults) == len(content) // CLUSTER


def test_uffd_fault_taken_by_the_kernel_is_served(server: Server, content: bytes) -> None:
    # os.write reads the page inside the kernel: served like a user fault
    # because the client's uffd is not UFFD_USER_MODE_ONLY.
    off = 2 * CLUSTER
    assert server.request(op="os_write", off=off, n=PAGE_SIZE) == sha(content[off : off + PAGE_SIZE])
    assert len(server.faults) == 1


def test_uffd_second_client_takes_minor_faults(server: Server, content: bytes, memfile: MemFile) -> None:
    server.request(op="read", off=0, n=CLUSTER)
    other = Server(content, memfile)
    try:
        assert other.request(op="read", off=0, n=PAGE_SIZE) == sha(content[:PAGE_SIZE])
        [msg] = other.faults
        assert msg.is_minor
        # MAP_SHARED of one memfd: a write by one client is seen by the other at once.
        other.request(op="write", off=100, data=b"shared".hex())
        assert server.request(op="read", off=0, n=PAGE_SIZE) == sha(
            content[:100] + b"shared" + content[106:PAGE_SIZE])
    finally:
        other.close()


def test_pagemap_scan_finds_each_write_and_reprotects(server: Server, content: bytes,
                                                      memfile: MemFile) -> None:
    start, end = server.base, server.base + len(content)
    server.request(op="read", off=0, n=CLUSTER)
    with Pagemap(server.pid) as pm:
        assert pm.written(start, end) == []  # mapped write-protected: clean
        page = start + 5 * PAGE_SIZE
        server.request(op="write", off=5 * PAGE_SIZE + 7, data=b"dirty".hex())
        assert pm.written(start, end) == [(page, page + PAGE_SIZE)]
        assert pm.written(start, end) == []  # the scan protected it again
        server.request(op="write", off=5 * PAGE_SIZE, data=b"again".hex())
        assert pm.written(start, end) == [(page, page + PAGE_SIZE)]
    # The write went to the frame, for the server's write-back to read.
    at = 5 * PAGE_SIZE
    assert memfile.read(at, 12) == b"again" + content[at + 5 : at + 7] + b"dirty"
    # Write-protect faults resolve in the kernel (WP_ASYNC): no event.
    assert len(server.faults) == 1


def test_pagemap_scan_write_to_missing_page(server: Server, content: bytes) -> None:
    off = 3 * CLUSTER + PAGE_SIZE
    server.request(op="write", off=off, data=b"x".hex())
    [msg] = server.faults
    assert msg.is_write and not msg.is_minor
    with Pagemap(server.pid) as pm:
        page = server.base + off
        assert pm.written(server.base, server.base + len(content)) == [(page, page + PAGE_SIZE)]


def test_punch_hole_makes_the_next_touch_fault_again(server: Server, content: bytes,
                                                     memfile: MemFile) -> None:
    server.request(op="read", off=0, n=2 * CLUSTER)
    assert len(server.faults) == 2
    memfile.punch(0, CLUSTER)  # evict the first cluster from every mapping
    assert server.request(op="read", off=0, n=2 * CLUSTER) == sha(content[: 2 * CLUSTER])
    assert len(server.faults) == 3
    assert not server.faults[2].is_minor and server.faults[2].address == server.base
    # An evicted page in a cluster whose other pages stay mapped: resolve
    # steps over them.
    memfile.punch(2 * PAGE_SIZE, PAGE_SIZE)
    off = 2 * PAGE_SIZE
    assert server.request(op="read", off=off, n=PAGE_SIZE) == sha(content[off : off + PAGE_SIZE])
    assert len(server.faults) == 4


def test_poison_gives_sigbus_to_the_faulting_client(server: Server) -> None:
    def poison(uffd: Uffd, msg: UffdMsg) -> None:
        uffd.writeprotect(msg.address, PAGE_SIZE, False, wake=False)  # the marker would be EEXIST
        uffd.poison(msg.address, PAGE_SIZE)

    server.on_fault = poison
    with pytest.raises(ClientGone):
        server.request(op="read", off=CLUSTER, n=PAGE_SIZE)
    assert server.proc.wait(timeout=DEADLINE) == -signal.SIGBUS


def test_uffd_copy_fills_anonymous_memory(content: bytes, memfile: MemFile) -> None:
    srv = Server(content, memfile, ("missing",), anon=True)
    src = ctypes.create_string_buffer(content, len(content))  # the server's own copy

    def copy(uffd: Uffd, msg: UffdMsg) -> None:
        off = (msg.address - srv.base) // CLUSTER * CLUSTER
        assert uffd.copy(srv.base + off, ctypes.addressof(src) + off, CLUSTER) == CLUSTER

    srv.on_fault = copy
    try:
        off = CLUSTER + 5  # two clusters, two faults
        assert srv.request(op="read", off=off, n=CLUSTER) == sha(content[off : off + CLUSTER])
        assert len(srv.faults) == 2
        assert srv.request(op="read", off=0, n=CLUSTER) == sha(content[:CLUSTER])
        assert memfile.read(0, 16) == b"\0" * 16  # private memory: the memfd was never involved
    finally:
        srv.close()


def test_uffd_sigbus_feature_faults_without_a_server(content: bytes, memfile: MemFile) -> None:
    # What a client's watchdog registers a range with once its server is
    # gone: every fault is SIGBUS at once, no event waits for anyone.
    srv = Server(content, memfile, ("missing", "minor"), features=uapi.UFFD_FEATURE_SIGBUS)
    try:
        assert srv.uffd.has(uapi.UFFD_FEATURE_SIGBUS)
        with pytest.raises(ClientGone):
            srv.request(op="read", off=0, n=PAGE_SIZE)
        assert srv.proc.wait(timeout=DEADLINE) == -signal.SIGBUS
        assert srv.faults == []
    finally:
        srv.close()


def test_uffd_watchdog_takeover_keeps_mapped_pages_and_sigbus_the_rest(server: Server,
                                                                        content: bytes) -> None:
    server.request(op="read", off=0, n=PAGE_SIZE)
    assert server.request(op="take_over") & uapi.UFFD_FEATURE_SIGBUS
    assert server.request(op="read", off=0, n=CLUSTER) == sha(content[:CLUSTER])  # mapped: still served
    with pytest.raises(ClientGone):
        server.request(op="read", off=CLUSTER, n=PAGE_SIZE)
    assert server.proc.wait(timeout=DEADLINE) == -signal.SIGBUS
    assert len(server.faults) == 1  # the server saw none after the take-over


def test_pageout_clears_references_and_the_next_touch_is_minor(server: Server, content: bytes) -> None:
    start, end = server.base, server.base + CLUSTER
    server.request(op="read", off=0, n=CLUSTER)
    server.request(op="write", off=PAGE_SIZE, data=b"w".hex())
    with Process(server.pid) as proc, Pagemap(server.pid) as pm:
        proc.pageout(start, CLUSTER)
        assert pm.scan(start, end, category_mask=uapi.PAGE_IS_PRESENT, return_mask=uapi.PAGE_IS_PRESENT) == []
        # The clean pages keep their write-protect markers; the written one
        # lost its PTE and counts as written.
        assert pm.written(start, end, reprotect=False) == [(start + PAGE_SIZE, start + 2 * PAGE_SIZE)]
        # The re-reference is a MINOR fault: the frames stayed in the memfd.
        expect = content[:PAGE_SIZE] + b"w" + content[PAGE_SIZE + 1 : CLUSTER]
        assert server.request(op="read", off=0, n=CLUSTER) == sha(expect)
        assert [(m.is_minor, m.address) for m in server.faults[1:]] == [(True, start)]
        # Mapped again write-protected, the page reads clean: a pmap must
        # harvest the written bits (PAGEMAP_SCAN) before it pages out.
        assert pm.written(start, end, reprotect=False) == []


def test_uffd_threads_fault_the_same_and_different_pages_at_once(server: Server, content: bytes) -> None:
    # hashlib drops the GIL over a page, so the threads fault concurrently;
    # a second event for a page already mapped is stepped over by resolve.
    offs = [0, 0, PAGE_SIZE, CLUSTER, CLUSTER, 3 * CLUSTER + 5 * PAGE_SIZE, 2 * CLUSTER] * 2
    digests = server.request(op="threads_read", offs=offs, n=PAGE_SIZE)
    assert digests == [sha(content[o : o + PAGE_SIZE]) for o in offs]
    assert {(m.address - server.base) // CLUSTER for m in server.faults} == {0, 1, 2, 3}


def test_uffd_fork_child_faults_on_its_own_uffd(server: Server, content: bytes, memfile: MemFile) -> None:
    off = 2 * CLUSTER
    digest, status = server.request(op="fork_read", off=off, n=PAGE_SIZE)
    assert (digest, status) == (sha(content[off : off + PAGE_SIZE]), 0)
    assert len(server.uffds) == 2  # the fork event brought the child's uffd
    [msg] = server.faults
    assert msg.address == server.base + off


def test_uffd_fork_without_fork_events_fills_the_memfd_with_zeros(content: bytes, memfile: MemFile) -> None:
    # Why SERVER_FEATURES has EVENT_FORK: the child's mapping is not
    # registered, and its touch allocates a page of zeros in the memfd.
    srv = Server(content, memfile, drop=uapi.UFFD_FEATURE_EVENT_FORK)
    try:
        digest, status = srv.request(op="fork_read", off=0, n=PAGE_SIZE)
        assert (digest, status) == (sha(b"\0" * PAGE_SIZE), 0)
        assert srv.faults == [] and memfile.read(0, PAGE_SIZE) == b"\0" * PAGE_SIZE
    finally:
        srv.close()


def test_client_death_is_seen_by_the_server(server: Server) -> None:
    server.on_fault = lambda uffd, msg: server.proc.kill()  # never served: the client dies waiting
    with Process(server.pid) as pidfd:
        with pytest.raises(ClientGone):
            server.request(op="read", off=0, n=PAGE_SIZE)
        poller = select.poll()
        poller.register(pidfd.fd, select.POLLIN)
        assert poller.poll(int(DEADLINE * 1000))  # the pidfd says so too
    assert server.proc.wait(timeout=DEADLINE) == -signal.SIGKILL
    # Its address space is gone: resolving for it says so.
    server.memfile.fill(0, b"\0" * PAGE_SIZE)
    with pytest.raises(OSError) as e:
        server.uffd.resolve(server.base, PAGE_SIZE)
    assert e.value.errno == errno.ESRCH


def test_fdpass_refuses_fds_that_do_not_fit() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        fdpass.send(a, b"two", [r, w])
        with pytest.raises(OSError, match="truncated"):
            fdpass.recv(b, 16, 1)
        fdpass.send(a, b"one", [r])
        payload, [fd] = fdpass.recv(b, 16, 1)
        assert payload == b"one" and os.path.sameopenfile(fd, r)
        os.close(fd)
        a.close()
        assert fdpass.recv(b, 16, 1) == (b"", [])
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


UNPRIVILEGED = """
import json, os, sys
from vnpager.arch.uffd import Uffd, UffdUnavailable
if os.geteuid() == 0:
    os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
try:
    Uffd.open().close()
    print(json.dumps({"ok": True}))
except UffdUnavailable as e:
    print(json.dumps({"errno": e.errno, "msg": str(e)}))
"""


def test_unavailable_for_a_user_names_the_fix() -> None:
    # A real refusal: the same code as an unprivileged user (uid nobody).
    out = subprocess.run([sys.executable, "-c", UNPRIVILEGED], capture_output=True, text=True,
                         timeout=DEADLINE, check=True)
    result = json.loads(out.stdout)
    uid = 65534 if os.geteuid() == 0 else os.geteuid()
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        allowed = f.read().strip() == "1"
    device = Path("/dev/userfaultfd")
    if allowed or (device.exists() and device.stat().st_mode & 0o006 == 0o006):
        assert result == {"ok": True}
        return
    assert result["errno"] in (errno.EPERM, errno.EACCES)
    assert "sysctl -w vm.unprivileged_userfaultfd=1" in result["msg"]
    assert "/dev/userfaultfd" in result["msg"] and f"uid {uid}" in result["msg"]
    assert "mmu='software'" in result["msg"]


def _refused(err: int) -> Callable[[int], int]:
    def syscall(flags: int) -> int:
        raise OSError(err, os.strerror(err))

    return syscall


def test_unavailable_without_syscall_or_device_names_the_kernel(tmp_path: Path) -> None:
    with pytest.raises(UffdUnavailable) as e:
        open_fd(syscall=_refused(errno.ENOSYS), device=str(tmp_path / "none"))
    assert e.value.errno == errno.ENOSYS and "CONFIG_USERFAULTFD" in str(e.value)
    with pytest.raises(UffdUnavailable) as e:
        supported_features(syscall=_refused(errno.EPERM), device=str(tmp_path / "none"))
    assert e.value.errno == errno.EPERM and "vm.unprivileged_userfaultfd" in str(e.value)
    assert "Linux 6.1" in str(e.value)


def test_unavailable_falls_back_to_the_device() -> None:
    # The syscall refused, the device grants: a working uffd.
    with Uffd.open(syscall=_refused(errno.EPERM)) as uffd:
        assert uffd.has(uapi.UFFD_FEATURE_MINOR_SHMEM)


def test_missing_feature_is_named() -> None:
    with pytest.raises(UffdUnavailable, match=r"lacks 0x10000000000"):
        Uffd.open(features=1 << 40)


def test_uffd_ioctl_errors_carry_errno() -> None:
    with Uffd.open() as uffd, pytest.raises(OSError) as e:
        uffd.register(PAGE_SIZE + 1, PAGE_SIZE, uapi.UFFDIO_REGISTER_MODE_MISSING)
    assert e.value.errno == errno.EINVAL and "UFFDIO_REGISTER" in str(e.value)
