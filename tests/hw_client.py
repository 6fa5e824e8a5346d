"""A client process of the uffd machine, driven by test_uffd_machine.

Run as ``python hw_client.py FD``: FD is a SOCK_SEQPACKET socket to the
test, which plays the pager server (a ``uvm.VM(machine="uffd")`` and a
ClientSpace).  The client opens its own userfaultfd (MACHINE_FEATURES:
synchronous write-protect) and sends it with its pid; then it obeys one
JSON command per message: ``map`` brings an object's memfd, which it maps
as the user asked (MAP_SHARED or MAP_PRIVATE) and answers with the
address; the other commands touch a map (``at``: its address) as a user's
code would, through uffd_client.touch, and may fault into the server.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import sys
import time

import numpy as np

from uffd_client import touch
from vnpager.arch.uffd import MACHINE_FEATURES, Uffd, fdpass


class Map:
    """A client's map of a memfd: the mmap object and its address."""

    def __init__(self, fd: int, length: int, offset: int, prot: int, flags: int) -> None:
        self.mmap = mmap.mmap(fd, length, flags=flags, prot=prot, offset=offset)
        self.address = int(np.frombuffer(self.mmap, dtype=np.uint8).ctypes.data)


def fork_write(m: Map, cmd: dict[str, object]) -> list[object]:
    """The child of a fork writes through the map it inherited, and reads
    back; the parent answers with the child's digest and status."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        off = int(cmd["off"])  # type: ignore[call-overload]
        data = bytes.fromhex(str(cmd["data"]))
        m.mmap[off : off + len(data)] = data
        os.write(w, m.mmap[off : off + len(data)].hex().encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        echo = f.read().decode()
    return [echo, os.waitpid(pid, 0)[1]]


def time_touch(m: Map, cmd: dict[str, object]) -> float:
    """Seconds to load one byte of each page of [off, off+n) (for measurements)."""
    off, n = int(cmd["off"]), int(cmd["n"])  # type: ignore[call-overload]
    view = memoryview(m.mmap)
    t = time.perf_counter()
    for i in range(off, off + n, mmap.PAGESIZE):
        view[i]
    return time.perf_counter() - t


class Child:
    """A forked child that stays: it writes what it is told through the map
    it inherited, one command at a time over a pair of pipes."""

    def __init__(self, m: Map) -> None:
        cmd_r, self.cmd_w = os.pipe()
        self.ack_r, ack_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(self.cmd_w)
            os.close(self.ack_r)
            with os.fdopen(cmd_r, "r") as cmds:
                for line in cmds:
                    off, data = line.split()
                    m.mmap[int(off) : int(off) + len(data) // 2] = bytes.fromhex(data)
                    os.write(ack_w, b"k")
            os._exit(0)
        os.close(cmd_r)
        os.close(ack_w)

    def write(self, off: int, data: str) -> None:
        os.write(self.cmd_w, f"{off} {data}\n".encode())
        if os.read(self.ack_r, 1) != b"k":
            raise OSError("the child died")

    def exit(self) -> int:
        os.close(self.cmd_w)
        os.close(self.ack_r)
        return os.waitpid(self.pid, 0)[1]


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    uffd = Uffd.open(features=MACHINE_FEATURES)
    fdpass.send(sock, json.dumps({"pid": os.getpid(), "features": uffd.features}).encode(), [uffd.fd])
    maps: dict[int, Map] = {}
    child: Child | None = None
    while True:
        payload, fds = fdpass.recv(sock, 1 << 20, 1)
        if not payload:
            return
        cmd = json.loads(payload)
        op = cmd["op"]
        if op == "exit":
            return
        if op == "map":
            m = Map(fds[0], cmd["length"], cmd["offset"], cmd["prot"], cmd["flags"])
            os.close(fds[0])
            maps[m.address] = m
            reply: object = m.address
        elif op == "munmap":
            maps.pop(cmd["at"]).mmap.close()
            reply = None
        elif op == "resize":  # CPython's resize: ftruncate (the server did it already) and mremap
            m = maps.pop(cmd["at"])
            m.mmap.resize(cmd["n"])
            m.address = int(np.frombuffer(m.mmap, dtype=np.uint8).ctypes.data)
            maps[m.address] = m
            reply = m.address
        elif op == "time_touch":
            reply = time_touch(maps[cmd["at"]], cmd)
        elif op == "fork_child":
            child = Child(maps[cmd["at"]])
            reply = child.pid
        elif op == "child_write":
            assert child is not None
            child.write(cmd["off"], cmd["data"])
            reply = None
        elif op == "child_exit":
            assert child is not None
            reply, child = child.exit(), None
        elif op == "fork_write":
            reply = fork_write(maps[cmd["at"]], cmd)
        else:
            reply = touch(maps[cmd["at"]], cmd)  # type: ignore[arg-type]
        sock.send(json.dumps({"ok": reply}).encode())


if __name__ == "__main__":
    main()
