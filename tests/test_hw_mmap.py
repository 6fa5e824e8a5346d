"""Hardware maps on the real pager server: memory faulted by the host's MMU
into the MI pager, shared by processes.

Every process that touches a hardware map here is a subprocess
(tests/hw_user.py, or a snippet run with ``python -c``): a thread that
faults holds the GIL until the server answers, so the test process only
drives, and every wait is bounded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hw_procs import DEADLINE, Client, ServerProc
from hw_user import peak_rss

PAGE = mmap.PAGESIZE
CLUSTER = 16 * PAGE


def pattern(size: int, seed: int = 1) -> bytes:
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < size:
        out += hashlib.sha256(block + len(out).to_bytes(8, "little")).digest()
    return bytes(out[:size])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def content() -> bytes:
    return pattern(8 * CLUSTER + 123)


@pytest.fixture
def path(tmp_path: Path, content: bytes) -> Path:
    p = tmp_path / "data"
    p.write_bytes(content)
    return p


@pytest.fixture
def server() -> Iterator[ServerProc]:
    srv = ServerProc("4M")
    try:
        yield srv
    finally:
        srv.stop()


def client(clients: list[Client], **connect: object) -> Client:
    c = Client()
    clients.append(c)
    c.do(op="connect", **connect)
    return c


def run(code: str, **env: str) -> object:
    """Run *code* in a fresh interpreter with *env* added; what it printed
    (JSON) on its last line."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE * 2,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


DROP_IN = """
import hashlib, io, json, mmap, os, re, socket, struct, sys
import numpy as np
import vnpager
path = sys.argv[1] if len(sys.argv) > 1 else {path!r}
fd = os.open(path, os.O_RDWR)
m = vnpager.mmap(fd, 0)                  # the default VM: VNPAGER_MMU=hardware
out = {{"isinstance": isinstance(m, mmap.mmap), "len": len(m)}}
arr = np.frombuffer(m, dtype=np.uint8)
out["numpy_sum"] = int(arr.sum(dtype=np.uint64))
w = np.ndarray((len(m),), np.uint8, buffer=m)
w[10] = 0xEE                              # zero copy: a store into the map itself
out["numpy_writes_through"] = bool(m[10] == 0xEE and arr[10] == 0xEE)
out["numpy_shares"] = bool(np.shares_memory(arr, w))
del arr, w
out["memoryview"] = hashlib.sha256(memoryview(m)[4096:8192]).hexdigest()
out["re"] = re.search(rb"\\xee", m).start()
out["hashlib"] = hashlib.sha256(m).hexdigest()
out["struct"] = struct.unpack_from("<QQ", m, 5 * 4096 + 8)
r, wfd = os.pipe()
os.write(wfd, memoryview(m)[:4096])
out["os_write"] = hashlib.sha256(os.read(r, 4096)).hexdigest()
a, b = socket.socketpair()
a.sendall(memoryview(m)[3 * 65536:3 * 65536 + 65536])
got = bytearray()
while len(got) < 65536:
    got += b.recv(65536)
out["sendall"] = hashlib.sha256(got).hexdigest()
with open(path, "rb") as f:
    f.readinto(memoryview(m)[-100:])     # readinto a map: the file's first 100 bytes at its end
m[:5] = b"hello"
m.flush()
out["stats"] = vnpager.default_vm().statistics()
m.close()
print(json.dumps(out))
"""


def test_hw_drop_in_cases(path: Path, content: bytes) -> None:
    out = run(DROP_IN.format(path=str(path)), VNPAGER_MMU="hardware", VNPAGER_PHYSMEM="4M")
    assert isinstance(out, dict)
    modified = bytearray(content)
    modified[10] = 0xEE
    assert out["isinstance"] and out["len"] == len(content)
    assert out["numpy_sum"] == sum(content)
    assert out["numpy_writes_through"] and out["numpy_shares"]
    assert out["memoryview"] == sha(content[PAGE:2 * PAGE])
    assert out["re"] == bytes(modified).find(b"\xee")
    assert out["hashlib"] == sha(bytes(modified))
    assert out["struct"] == list(__import__("struct").unpack_from("<QQ", content, 5 * PAGE + 8))
    assert out["os_write"] == sha(bytes(modified[:PAGE]))
    assert out["sendall"] == sha(content[3 * CLUSTER:4 * CLUSTER])
    # written through the map, in the file after flush() (and close)
    data = path.read_bytes()
    assert data[:5] == b"hello" and data[10] == 0xEE and data[-100:] == content[:100]
    assert data[5:10] == content[5:10] and data[11:-100] == content[11:-100]


def test_hw_budget_a_file_64_times_physmem(tmp_path: Path, clients: list[Client]) -> None:
    size, physmem = 1 << 30, 16 << 20  # the issue's: 1 GiB through a 16 MiB VM
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(size)  # sparse: the host reads zeros fast, the pager pages every page of it
    server = ServerProc(str(physmem))
    try:
        c = client(clients, path=server.path)
        base_client, base_server = c.do(op="peak_rss"), peak_rss(server.proc.pid)
        c.do(op="map", file=str(big))
        c.send(op="numpy_sum", off=0, n=size)  # every page touched, in order
        assert json.loads(c.lines.readline(timeout=300)) == {"ok": 0}
        assert c.do(op="stats")["faults"] > 1
        vmstats = c.do(op="vmstats")
        assert vmstats["npages"] == physmem // PAGE and vmstats["frames_resident"] <= vmstats["npages"]
        assert vmstats["pageins"] >= size // PAGE
        # the memfd pages are counted in both (VmHWM includes shared memory): a few physmems at most
        assert c.do(op="peak_rss") - base_client < 8 * physmem
        assert peak_rss(server.proc.pid) - base_server < 12 * physmem
    finally:
        server.stop()


def test_hw_two_processes_on_one_server_see_each_others_writes(server: ServerProc, path: Path,
                                                               content: bytes, clients: list[Client]) -> None:
    a = client(clients, path=server.path)
    b = client(clients, path=server.path)
    a.do(op="map", file=str(path))
    b.do(op="map", file=str(path))
    assert a.do(op="read", off=0, n=PAGE) == sha(content[:PAGE])
    a.do(op="write", off=PAGE + 5, data=b"from a".hex())
    # no flush: the same page, at once (MAP_SHARED of one memfd)
    expect = content[PAGE:PAGE + 5] + b"from a" + content[PAGE + 11:2 * PAGE]
    assert b.do(op="read", off=PAGE, n=PAGE) == sha(expect)
    b.do(op="write", off=7 * CLUSTER, data=b"from b".hex())
    at = 7 * CLUSTER
    assert a.do(op="read", off=at, n=PAGE) == sha(b"from b" + content[at + 6:at + PAGE])
    assert path.read_bytes() == content  # nobody flushed yet
    b.do(op="flush")  # b's flush writes the object's dirty pages of its range: a's too
    data = path.read_bytes()
    assert data[PAGE + 5:PAGE + 11] == b"from a" and data[at:at + 6] == b"from b"


def test_hw_sigkill_of_a_client_loses_nothing_flushed(server: ServerProc, path: Path, content: bytes,
                                                      clients: list[Client]) -> None:
    c = client(clients, path=server.path)
    c.do(op="map", file=str(path))
    c.do(op="write", off=3 * PAGE, data=b"acknowledged".hex())
    c.do(op="flush")
    c.do(op="write", off=5 * PAGE, data=b"not flushed".hex())
    c.proc.kill()
    assert c.proc.wait(DEADLINE) == -signal.SIGKILL
    assert path.read_bytes()[3 * PAGE:3 * PAGE + 12] == b"acknowledged"
    # the server released the client's space: another client maps the file and finds the page
    other = client(clients, path=server.path)
    other.do(op="map", file=str(path))
    assert other.do(op="read", off=5 * PAGE, n=11) == sha(b"not flushed")


def test_hw_sigkill_of_the_server_sigbus_and_every_acknowledged_flush_in_the_file(
        server: ServerProc, path: Path, content: bytes, clients: list[Client]) -> None:
    c = client(clients, path=server.path)
    c.do(op="map", file=str(path))
    c.do(op="write", off=0, data=b"first".hex())
    c.do(op="flush")
    c.do(op="write", off=2 * CLUSTER, data=b"second".hex())
    c.do(op="flush")
    server.kill()
    name, err, _ = c.error(op="flush")
    assert (name, err) == ("ServerGone", errno.EPIPE)
    c.send(op="read", off=6 * CLUSTER, n=PAGE)  # never touched: faults, and the server is dead
    assert c.proc.wait(DEADLINE) == -signal.SIGBUS
    data = path.read_bytes()
    assert data[:5] == b"first" and data[2 * CLUSTER:2 * CLUSTER + 6] == b"second"


def test_hw_fork_of_a_client(path: Path, content: bytes, clients: list[Client]) -> None:
    c = client(clients, physmem="4M")
    c.do(op="map", file=str(path))
    assert c.do(op="read", off=0, n=PAGE) == sha(content[:PAGE])
    c.send(op="fork", off=4 * CLUSTER, n=PAGE, woff=5 * CLUSTER, data=b"child".hex())
    assert c.answer() == {"child": sha(content[4 * CLUSTER:4 * CLUSTER + PAGE])}
    assert c.answer() == {"ok": 0}  # the child's exit status
    # the child's write is in the parent's map at once, and its flush in the file
    at = 5 * CLUSTER
    assert c.do(op="read", off=at, n=5) == sha(b"child")
    assert path.read_bytes()[at:at + 5] == b"child"


def test_hw_threads_fault_the_same_and_different_pages(path: Path, content: bytes,
                                                       clients: list[Client]) -> None:
    c = client(clients, physmem="4M")
    c.do(op="map", file=str(path))
    offs = [0, 0, PAGE, CLUSTER, CLUSTER, 3 * CLUSTER + 5 * PAGE, 7 * CLUSTER, 2 * CLUSTER] * 2
    assert c.do(op="threads_read", offs=offs, n=PAGE) == [sha(content[o:o + PAGE]) for o in offs]


def test_hw_embedded_server_dies_with_its_client(path: Path, clients: list[Client]) -> None:
    c = Client()
    clients.append(c)
    server_pid = c.do(op="connect", physmem="4M")["server"]
    c.do(op="map", file=str(path))
    c.do(op="write", off=0, data=b"unflushed".hex())
    c.proc.kill()
    c.proc.wait(DEADLINE)
    assert _pid_gone(server_pid)
    # it stopped cleanly: what the client wrote was written back (the kernel's MAP_SHARED keeps it too)
    assert path.read_bytes()[:9] == b"unflushed"


def test_hw_embedded_server_sigkill_gives_its_client_sigbus(path: Path, clients: list[Client]) -> None:
    c = Client()
    clients.append(c)
    info = c.do(op="connect", physmem="4M")
    assert info["server"] != info["pid"]  # the private server is a process of its own
    c.do(op="map", file=str(path))
    c.do(op="read", off=0, n=PAGE)
    os.kill(info["server"], signal.SIGKILL)
    assert _pid_gone(info["server"])
    c.send(op="read", off=5 * CLUSTER, n=PAGE)
    assert c.proc.wait(DEADLINE) == -signal.SIGBUS


POOL = """
import hashlib, json, multiprocessing, os, sys, vnpager
fd = os.open(sys.argv[1], os.O_RDWR)
m = vnpager.mmap(fd, 0)               # the default VM: VNPAGER_MMU=hardware


def work(i):
    m[i * 65536] = i                   # each worker writes a byte of its own, and reads its slice
    return hashlib.sha256(memoryview(m)[i * 65536 + 1:(i + 1) * 65536]).hexdigest()


if __name__ == "__main__":
    with multiprocessing.get_context("fork").Pool(3) as pool:
        digests = pool.map(work, range(8))
    print(json.dumps([digests, list(m[::65536][:8])]))
"""


def test_hw_fork_pool_workers_share_the_parents_map(path: Path, content: bytes) -> None:
    out = subprocess.run([sys.executable, "-c", POOL, str(path)], capture_output=True, text=True,
                         timeout=DEADLINE * 2, env={**os.environ, "VNPAGER_MMU": "hardware",
                                                    "VNPAGER_PHYSMEM": "4M"})
    assert out.returncode == 0, out.stderr
    digests, firsts = json.loads(out.stdout)
    assert digests == [sha(content[i * CLUSTER + 1:(i + 1) * CLUSTER]) for i in range(8)]
    assert firsts == list(range(8))  # the workers' stores are in the parent's map at once


REVOKED = """
import os, sys, numpy as np, vnpager
vm = vnpager.VM("4M", mmu="hardware")
fd = os.open(sys.argv[1], os.O_RDWR)
m = vnpager.mmap(fd, 0, vm=vm)
arr = np.frombuffer(m, dtype=np.uint8)
first = int(arr[:4096].sum())
try:
    vm.close()
except BufferError:
    print("BufferError", flush=True)
print(int(arr[-4096:].sum()), flush=True)  # never faulted in: zeros, were it not revoked
"""


def test_hw_map_outliving_its_vm_is_revoked_not_zeros(path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", REVOKED, str(path)], capture_output=True, text=True,
                         timeout=DEADLINE)
    assert out.stdout == "BufferError\n" and out.returncode == -signal.SIGSEGV, (out.stdout, out.stderr)


RACE = """
import os, sys, threading, vnpager
files, errors = sys.argv[1:], []
vm = vnpager.VM("1M", mmu="hardware")
def work(i):
    fd = os.open(files[i], os.O_RDWR)
    try:
        for _ in range(300):
            with vnpager.mmap(fd, 0, vm=vm) as m:
                if m[3 * 4096] != i + 1:
                    errors.append(f"map of file {i} read {m[3 * 4096]}")
    except Exception as e:
        errors.append(repr(e))
    finally:
        os.close(fd)
threads = [threading.Thread(target=work, args=(i,)) for i in range(len(files))]
for t in threads:
    t.start()
for t in threads:
    t.join(60)
vm.close()
print(errors[:3])
"""


def test_hw_threads_mapping_and_closing_at_once_keep_their_maps(tmp_path: Path) -> None:
    # A close munmaps, and another thread's new map may get the address the server still names the
    # old one by: before the client's space_lock this ran into ValueError "no map at", or SIGBUS.
    files = []
    for i in range(6):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(bytes([i + 1]) * (8 * PAGE))
    out = subprocess.run([sys.executable, "-c", RACE, *map(str, files)], capture_output=True, text=True,
                         timeout=DEADLINE * 4)
    assert out.returncode == 0 and out.stdout == "[]\n", (out.returncode, out.stdout, out.stderr[-2000:])


def test_demo_runs_on_the_hardware_mmu() -> None:
    cmd = [sys.executable, "-m", "vnpager", "demo", "--mmu", "hardware", "--physmem", "256K", "--ops", "300"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE * 4,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "300 mixed reads and writes, every read checked (0 wrong)" in out
    assert "plain file reads see all 2.0 MiB as written" in out
    assert "the first touch of page 1 faults; uvn_get reads it through uvn_io: faults +1, pageins +1" in out
    assert re.search(r"│ frames_resident +│ +[\d,]+ │", out)


def test_vnpager_serve_sigterm_writes_back_and_removes_its_socket(tmp_path: Path, path: Path,
                                                                  clients: list[Client]) -> None:
    sock = tmp_path / "pager.sock"
    server = ServerProc("4M", path=str(sock))
    try:
        assert sock.is_socket()
        c = client(clients, path=str(sock))
        c.do(op="map", file=str(path))
        c.do(op="write", off=3 * CLUSTER, data=b"never flushed".hex())
        server.proc.terminate()
        assert server.proc.wait(DEADLINE) == 0
        assert path.read_bytes()[3 * CLUSTER:3 * CLUSTER + 13] == b"never flushed"  # the VM's close wrote it
        assert not sock.exists()
        name, err, _ = c.error(op="flush")
        assert (name, err) == ("ServerGone", errno.EPIPE)
        c.send(op="read", off=6 * CLUSTER, n=PAGE)  # a server stopped cleanly is gone too: SIGBUS, not zeros
        assert c.proc.wait(DEADLINE) == -signal.SIGBUS
    finally:
        server.stop()


def test_vnpager_serve_refuses_a_socket_in_use(server: ServerProc) -> None:
    cmd = [sys.executable, "-m", "vnpager", "serve", "--socket", server.path, "--physmem", "1M"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE)
    assert out.returncode != 0 and "Address already in use" in out.stderr


def _pid_gone(pid: int) -> bool:
    """Whether *pid* exits (or is a zombie nobody reaped yet) within DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_hw_pread_pwrite_and_open_are_the_software_vms(tmp_path: Path, content: bytes) -> None:
    """The hardware VM's pread, pwrite and open go through the server's
    pages as the software VM's go through its own: a read sees a map's
    unflushed stores, a write is in the map at once and grows the file past
    its end, and all of it is in the file once the map and files close."""
    import vnpager

    results: dict[str, list[object]] = {}
    for mmu in ("software", "hardware"):
        p, new = tmp_path / f"{mmu}.bin", tmp_path / f"{mmu}.new"
        p.write_bytes(content)
        with vnpager.VM("1M", mmu=mmu) as vm:
            fd = os.open(p, os.O_RDWR)
            m = vm.map(fd)
            m[5:10] = b"HELLO"
            out: list[object] = [vm.pread(p, 3 * CLUSTER, 0)]  # the map's store, never flushed
            out.append(vm.pwrite(fd, b"written", 100))
            out.append(m[100:107])  # in the map at once
            out.append(vm.pwrite(p, b"tail", len(content) + 10))  # grows the file
            out.append(vm.pread(fd, 100, len(content) - 5))
            with vm.open(p, "r+b") as f:
                out += [f.seek(0, os.SEEK_END), f.seek(3), f.read(6), f.write(b"XY"), f.tell()]
            with vm.open(new, "w+") as f:
                out += [f.write(pattern(70_000, seed=4)), f.seek(0), f.read(), f.truncate(65_537)]
            with vm.open(new, "a") as f:
                out.append(f.write(b"appended"))
            m.close()
            os.close(fd)
        results[mmu] = [*out, p.read_bytes(), new.read_bytes()]
    assert results["hardware"] == results["software"]
    assert results["software"][0][5:10] == b"HELLO" and results["software"][2] == b"written"
