"""The hardware MMU's process boundary: protocol, sessions, client library.

The server runs as a thread of the test over a :class:`CopySpace`
(tests/hw_fakes.py: ClientSpace's API over memfds that hold whole copies of
their files), so the client's maps never fault into the server and the
test may touch them in its own process.  What faults and the real pager
add is tested in test_hw_mmap.py, with the server in a process of its own.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import mmap
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import vnpager
from hw_fakes import Calls, CopySpace
from vnpager.arch.uffd import Uffd, fdpass, uapi
from vnpager.client import HardwareVM, HwMmap, ServerGone, ServerTimeout
from vnpager.server import protocol
from vnpager.server.serve import Server, listen
from vnpager.uvm import uvm

DEADLINE = 30.0
SIZE = 5 * mmap.PAGESIZE + 123


def pattern(size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        out += hashlib.sha256(len(out).to_bytes(8, "little")).digest()
    return bytes(out[:size])


class Served:
    """A server thread over CopySpaces, at an abstract address."""

    def __init__(self) -> None:
        self.calls = Calls()
        self.files: dict[tuple[int, int], int] = {}
        self.path = f"@vnpager-test-{os.getpid()}-{secrets.token_hex(4)}"
        self.server = Server(uvm.VM("256K"), listen(self.path),
                             lambda vm, uffd, pid: CopySpace(uffd, pid, self.calls, self.files))
        self.thread = threading.Thread(target=self.server.serve_forever, name="test-server", daemon=True)
        self.thread.start()

    def ops(self) -> list[str]:
        return [op for op, _ in self.calls.ops]

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive()
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def hw(served: Served) -> Iterator[HardwareVM]:
    vm = HardwareVM.connect(served.path)
    try:
        yield vm
    finally:
        vm.close()


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.write_bytes(pattern(SIZE))
    return path


@pytest.fixture
def fd(data_file: Path) -> Iterator[int]:
    fd = os.open(data_file, os.O_RDWR)
    try:
        yield fd
    finally:
        os.close(fd)


# ---------------------------------------------------------------- protocol


def test_protocol_every_request_kind_round_trips() -> None:
    for op, kind in protocol.REQUESTS.items():
        args: list[object] = [b"\x00\xff" if name in kind.binary else i for i, name in enumerate(kind.args)]
        payload = protocol.encode_request(op, *args, seq=7)
        assert protocol.decode_request(payload, [0] * kind.fds_in) == (op, kind, args, 7)


@pytest.mark.parametrize("payload", [b"{", b'{"op": "nope", "args": []}', b'{"op": "unmap", "args": []}',
                                     b'{"op": "unmap"}', b"[]",
                                     b'{"op": "fwrite", "args": [1, 0, 5], "seq": 1}',
                                     b'{"op": "fwrite", "args": [1, 0, "not base64!"], "seq": 1}'])
def test_protocol_refuses_malformed_requests(payload: bytes) -> None:
    with pytest.raises(protocol.ProtocolError) as e:
        protocol.decode_request(payload, [])
    assert e.value.errno == errno.EPROTO


def test_protocol_refuses_wrong_fds() -> None:
    with pytest.raises(protocol.ProtocolError, match="fds"):
        protocol.decode_request(protocol.encode_request("unmap", 1), [5])
    with pytest.raises(protocol.ProtocolError, match="bad request"):
        protocol.encode_request("unmap")


@pytest.mark.parametrize("exc", [FileNotFoundError(errno.ENOENT, "No such file"), OSError(errno.EIO, "I/O"),
                                 BlockingIOError(errno.EAGAIN, "again"), ValueError("mmap closed or invalid"),
                                 TypeError("t"), OverflowError("o"), IndexError("i"), BufferError("b"),
                                 TimeoutError("VM busy"), LookupError("no fork to adopt")])
def test_protocol_errors_come_back_as_themselves(exc: Exception) -> None:
    with pytest.raises(type(exc)) as e:
        protocol.decode_reply(protocol.encode_error(exc)).result()
    assert str(e.value) == str(exc)
    if isinstance(exc, OSError):
        assert e.value.errno == exc.errno  # type: ignore[attr-defined]


def test_protocol_a_server_bug_is_a_server_error() -> None:
    with pytest.raises(protocol.ServerError, match="RuntimeError: bug"):
        protocol.decode_reply(protocol.encode_error(RuntimeError("bug"))).result()
    with pytest.raises(protocol.ServerError, match="KeyError: 3"):  # only the types listed keep theirs
        protocol.decode_reply(protocol.encode_error(KeyError(3))).result()
    assert protocol.decode_reply(protocol.encode_result({"a": [1]}, 5)) == protocol.Reply(5, {"a": [1]})


# ---------------------------------------------------------------- sessions


def test_session_knows_the_client_by_its_credentials(served: Served, hw: HardwareVM) -> None:
    assert hw.ping() == os.getpid() == hw.server_pid  # the server is a thread of ours
    [session] = served.server.sessions.values()
    assert session.pid == os.getpid() and session.id == hw.session
    assert hw.statistics() == {"maps": 0}
    assert hw.stats()["npages"] == 64 and hw.stats()["resident"] == 0  # the server VM's (256K)


def test_session_end_of_file_closes_the_space(served: Served) -> None:
    vm = HardwareVM.connect(served.path)
    [session] = served.server.sessions.values()
    vm.close()
    session.join(DEADLINE)
    assert served.calls.closed == [os.getpid()] and not served.server.sessions


def _raw(served: Served) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(DEADLINE)
    sock.connect(protocol.address(served.path))
    return sock


def test_session_refuses_a_request_before_attach(served: Served) -> None:
    with _raw(served) as sock:
        fdpass.send(sock, protocol.encode_request("unmap", 4096))
        payload, _ = protocol.recv(sock)
        with pytest.raises(OSError, match="before attach") as e:  # EPROTO, as the client sees it
            protocol.decode_reply(payload).result()
        assert e.value.errno == errno.EPROTO
        # a request that breaks the protocol ends the session
        fdpass.send(sock, b"garbage")
        payload, _ = protocol.recv(sock)
        with pytest.raises(OSError, match="malformed"):
            protocol.decode_reply(payload).result()
        assert protocol.recv(sock) == (b"", [])


def test_session_adopt_checks_the_parent(served: Served, hw: HardwareVM) -> None:
    with _raw(served) as sock:
        fdpass.send(sock, protocol.encode_request("adopt", 12345))
        with pytest.raises(ProcessLookupError):  # no such session
            protocol.decode_reply(protocol.recv(sock)[0]).result()
        # our own session is not our parent's: the kernel's word (SO_PEERCRED) says so
        fdpass.send(sock, protocol.encode_request("adopt", hw.session))
        with pytest.raises(PermissionError, match="not a child"):
            protocol.decode_reply(protocol.recv(sock)[0]).result()


# ---------------------------------------------------------------- maps


def test_hw_mmap_is_an_mmap_with_the_buffer_protocol(hw: HardwareVM, fd: int, data_file: Path) -> None:
    content = data_file.read_bytes()
    with vnpager.mmap(fd, 0, vm=hw) as m:
        assert isinstance(m, mmap.mmap) and isinstance(m, HwMmap) and len(m) == SIZE
        assert m[:] == content and m[7] == content[7]
        assert bytes(memoryview(m)[100:200]) == content[100:200]
        assert re.search(re.escape(content[3000:3010]), m).start() == 3000  # type: ignore[union-attr]
        assert hashlib.sha256(m).hexdigest() == hashlib.sha256(content).hexdigest()
        assert struct.unpack_from("<Q", m, 4096) == struct.unpack_from("<Q", content, 4096)
        arr = np.frombuffer(m, dtype=np.uint8)
        assert int(arr.sum()) == sum(content)
        arr_w = np.ndarray((SIZE,), np.uint8, buffer=m)  # zero copy: writes go to the map
        arr_w[5] = 0xAB
        assert m[5] == 0xAB and arr[5] == 0xAB
        del arr, arr_w
        r, w = os.pipe()
        try:
            assert os.write(w, memoryview(m)[:4096]) == 4096
            assert os.read(r, 4096) == m[:4096]
        finally:
            os.close(r)
            os.close(w)
        assert io.BytesIO(b"z" * 64).readinto(m) == 64 and m[:64] == b"z" * 64
        a, b = socket.socketpair()
        with a, b:
            a.sendall(memoryview(m)[:1000])
            assert b.recv(1000, socket.MSG_WAITALL) == m[:1000]


def test_hw_mmap_flush_writes_the_file(served: Served, hw: HardwareVM, fd: int, data_file: Path) -> None:
    m = vnpager.mmap(fd, 0, vm=hw)
    m[4096:4100] = b"flsh"
    m.flush()
    assert data_file.read_bytes()[4096:4100] == b"flsh"
    assert ("flush", (0, SIZE)) in served.calls.ops
    with pytest.raises(ValueError, match="flush values out of range"):
        m.flush(4096)  # CPython's size is the map's, whatever the offset
    m[:4] = b"clos"
    m.close()  # writes back, then unmaps
    assert data_file.read_bytes()[:4] == b"clos"
    assert served.ops()[-2:] == ["flush", "unmap"] and m.closed


def test_hw_mmap_flush_error_is_raised_and_close_still_closes(served: Served, hw: HardwareVM,
                                                              fd: int) -> None:
    m = vnpager.mmap(fd, 0, vm=hw)
    served.calls.fail_flush = errno.ENOSPC
    with pytest.raises(OSError) as e:
        m.flush(4096, 4096)
    assert e.value.errno == errno.ENOSPC
    served.calls.fail_flush = errno.EIO
    with pytest.raises(OSError) as e:
        m.close()
    assert e.value.errno == errno.EIO and m.closed and served.ops()[-1] == "unmap"
    with pytest.raises(ValueError, match="closed"):
        m.flush()


def test_hw_mmap_read_and_private_maps_never_write_back(served: Served, hw: HardwareVM, fd: int) -> None:
    for kwargs in ({"access": mmap.ACCESS_READ}, {"access": mmap.ACCESS_COPY}, {"flags": mmap.MAP_PRIVATE}):
        with vnpager.mmap(fd, 0, vm=hw, **kwargs) as m:  # type: ignore[arg-type]
            m.flush()
    assert "flush" not in served.ops()
    assert [args[2:] for op, args in served.calls.ops if op == "map"] == [
        (mmap.PROT_READ, mmap.MAP_SHARED), (mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE),
        (mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE)]


def test_hw_mmap_bad_arguments_are_cpythons_errors_before_the_server(served: Served, hw: HardwareVM, fd: int,
                                                                     data_file: Path) -> None:
    with pytest.raises(ValueError, match="mmap length is greater than file size"):
        vnpager.mmap(fd, SIZE + 1, vm=hw)
    with pytest.raises(OSError) as e:
        vnpager.mmap(fd, 4096, offset=100, vm=hw)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(TypeError):
        vnpager.mmap(fd, "4096", vm=hw)  # type: ignore[arg-type]
    ro = os.open(data_file, os.O_RDONLY)
    try:
        with pytest.raises(PermissionError):  # the descriptor's access mode, not the memfd's
            vnpager.mmap(ro, 0, vm=hw)
        vnpager.mmap(ro, 0, access=mmap.ACCESS_READ, vm=hw).close()
    finally:
        os.close(ro)
    with pytest.raises(OSError) as e:
        vnpager.mmap(12345, 4096, vm=hw)
    assert e.value.errno == errno.EBADF
    zero = os.open("/dev/zero", os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            vnpager.mmap(zero, 4096, vm=hw)
        assert e.value.errno == errno.ENODEV
    finally:
        os.close(zero)
    assert served.ops() == ["map", "mapped", "unmap"]  # only the ACCESS_READ one reached the server


def test_hw_mmap_anonymous_memory_is_the_hosts(served: Served, hw: HardwareVM) -> None:
    with vnpager.mmap(-1, 3 * mmap.PAGESIZE, vm=hw) as m:
        assert isinstance(m, HwMmap)
        m[:5] = b"anon!"
        np.frombuffer(m, dtype=np.uint8)[5] = 1
        assert m[:6] == b"anon!\x01"
        m.madvise(mmap.MADV_DONTNEED)
        m.resize(4 * mmap.PAGESIZE)
        with pytest.raises(OSError) as e:
            m.size()
        assert e.value.errno == errno.EBADF
    assert served.calls.ops == []


def test_hw_mmap_madvise_goes_to_the_pager(served: Served, hw: HardwareVM, fd: int, data_file: Path) -> None:
    with vnpager.mmap(fd, 0, vm=hw) as m:
        m.madvise(mmap.MADV_SEQUENTIAL, 4096)
        m.madvise(mmap.MADV_WILLNEED, 4096, 1 << 30)
        with pytest.raises(ValueError, match="madvise start out of bounds"):
            m.madvise(mmap.MADV_NORMAL, SIZE)
        with pytest.raises(OSError) as e:
            m.madvise(mmap.MADV_REMOVE)  # would punch the pager's memfd behind its back
        assert e.value.errno == errno.EINVAL
        assert m[:] == data_file.read_bytes()
    assert [args for op, args in served.calls.ops if op == "madvise"] == [
        (4096, SIZE - 4096, mmap.MADV_SEQUENTIAL), (4096, SIZE - 4096, mmap.MADV_WILLNEED)]


def test_hw_mmap_resize_changes_the_file_and_maps_again(served: Served, hw: HardwareVM, fd: int,
                                                        data_file: Path) -> None:
    m = vnpager.mmap(fd, 0, vm=hw)
    new = 40 * mmap.PAGESIZE
    m.resize(new)
    assert len(m) == new == m.size() == os.path.getsize(data_file)
    m[new - 3:] = b"end"
    m.flush()
    assert data_file.read_bytes()[-3:] == b"end"
    ops = served.ops()
    assert ops[ops.index("resize"):ops.index("resize") + 2] == ["resize", "moved"]
    m.close()
    with vnpager.mmap(fd, 0, vm=hw, access=mmap.ACCESS_READ) as r, pytest.raises(TypeError):
        r.resize(4096)


def test_hw_mmap_close_of_an_exported_map_keeps_it_open(served: Served, hw: HardwareVM, fd: int,
                                                        data_file: Path) -> None:
    m = vnpager.mmap(fd, 0, vm=hw)
    view = memoryview(m)
    view[:4] = b"kept"
    with pytest.raises(BufferError):
        m.close()
    assert not m.closed and "unmap" not in served.ops()  # still mapped, here and in the server
    assert data_file.read_bytes()[:4] == b"kept"  # but written back
    view.release()
    m.close()
    assert m.closed and served.ops()[-1] == "unmap"


def test_hw_vm_close_closes_its_maps_and_writes_back(served: Served, fd: int, data_file: Path) -> None:
    vm = HardwareVM.connect(served.path)
    m = vm.map(str(data_file))
    m[:3] = b"bye"
    vm.close()
    assert m.closed and data_file.read_bytes()[:3] == b"bye"
    with pytest.raises(ValueError, match="closed"):
        vnpager.mmap(fd, 0, vm=vm)


def test_server_gone_is_an_oserror_from_every_map_method(served: Served, hw: HardwareVM, fd: int) -> None:
    m = vnpager.mmap(fd, 0, vm=hw)
    served.stop()
    for call in (m.flush, m.size, lambda: m.madvise(mmap.MADV_RANDOM), lambda: m.resize(8192), hw.ping):
        with pytest.raises(ServerGone) as e:
            call()
        assert isinstance(e.value, OSError) and e.value.errno == errno.EPIPE
    assert not hw.alive
    with pytest.raises(ServerGone):
        m.close()
    assert m.closed


class Interrupted(Exception):
    pass


def test_a_request_cut_off_by_a_signal_keeps_replies_matched(served: Served, hw: HardwareVM, fd: int) -> None:
    m = vnpager.mmap(fd, 0, vm=hw)
    served.calls.gate = gate = threading.Event()

    def interrupt() -> None:  # once the server holds the request: a signal to the waiting client
        served.calls.entered.wait(DEADLINE)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)
        gate.set()

    def raise_interrupted(*_: object) -> None:
        raise Interrupted

    old = signal.signal(signal.SIGUSR1, raise_interrupted)
    helper = threading.Thread(target=interrupt)
    try:
        helper.start()
        with pytest.raises(Interrupted):
            m.madvise(mmap.MADV_RANDOM)
    finally:
        helper.join(DEADLINE)
        signal.signal(signal.SIGUSR1, old)
    served.calls.gate = None
    assert hw.ping() == os.getpid()  # not the reply to the madvise
    assert hw.request("size", m._addr) == SIZE
    m.close()


def test_a_server_that_stops_answering_times_a_request_out(served: Served, hw: HardwareVM, fd: int) -> None:
    """A server alive but stuck: the request fails (TimeoutError, naming it)
    instead of hanging the client, and the connection stays usable."""
    m = vnpager.mmap(fd, 0, vm=hw)
    served.calls.gate = gate = threading.Event()  # the server holds madvise until the gate opens
    hw.request_timeout = 0.2
    try:
        with pytest.raises(ServerTimeout) as e:
            m.madvise(mmap.MADV_RANDOM)
        assert isinstance(e.value, TimeoutError) and e.value.errno == errno.ETIMEDOUT
        assert "'madvise'" in str(e.value) and hw.path in str(e.value)
    finally:
        gate.set()
        served.calls.gate = None
    hw.request_timeout = DEADLINE
    assert hw.alive and hw.ping() == os.getpid()  # the late madvise reply was dropped
    assert hw.request("size", m._addr) == SIZE
    m.close()


def test_vm_mmu_argument() -> None:
    with pytest.raises(ValueError, match="mmu must be one of software, hardware"):
        vnpager.VM(mmu="quantum")
    vm = vnpager.VM("256K", mmu="software")
    assert isinstance(vm, vnpager.VM)
    vm.close()


UNPRIVILEGED = """
import json, os
import vnpager
from vnpager.arch.uffd import UffdUnavailable
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
try:
    vnpager.VM(physmem="4M", mmu="hardware")
    print(json.dumps({"ok": True}))
except UffdUnavailable as e:
    print(json.dumps({"errno": e.errno, "msg": str(e)}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_hardware_vm_where_userfaultfd_is_not_permitted_names_the_fix() -> None:
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        if f.read().strip() == "1":
            pytest.skip("unprivileged userfaultfd is allowed on this machine")
    out = subprocess.run([sys.executable, "-c", UNPRIVILEGED], capture_output=True, text=True,
                         timeout=DEADLINE, check=True)
    result = json.loads(out.stdout)
    assert result["errno"] in (errno.EPERM, errno.EACCES)
    assert "sysctl -w vm.unprivileged_userfaultfd=1" in result["msg"] and "mmu='software'" in result["msg"]


def test_uffd_of_a_client_is_opened_without_async_write_protect() -> None:
    with Uffd.open(protocol.CLIENT_FEATURES, protocol.CLIENT_OPTIONAL) as uffd:
        assert not uffd.has(uapi.UFFD_FEATURE_WP_ASYNC)
        assert uffd.has(uapi.UFFD_FEATURE_MINOR_SHMEM | uapi.UFFD_FEATURE_EVENT_FORK)
