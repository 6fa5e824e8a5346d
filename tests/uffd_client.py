"""A client of the hardware MMU's lowest layer, driven by test_arch_uffd.

Run as ``python uffd_client.py FD``: FD is a SOCK_SEQPACKET socket to the
test, which plays the pager server.  The first message brings a memfd; the
client maps it MAP_SHARED, registers the mapping with a userfaultfd of its
own (MISSING | MINOR | WP) and sends the uffd back with its pid and the
mapping's address.  Then it obeys one JSON command per message, touching
the mapping as a user's code would (each touch may fault, and blocks until
the server resolves it), and answers each.  It runs in its own process
because a thread that faults holds the GIL until the fault is served.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import socket
import sys
import threading

import numpy as np

from vnpager.arch.uffd import SERVER_FEATURES, Uffd, fdpass, uapi
from vnpager.arch.uffd.shm import SharedMapping, buffer_address

MODES = {
    "missing": uapi.UFFDIO_REGISTER_MODE_MISSING,
    "minor": uapi.UFFDIO_REGISTER_MODE_MINOR,
    "wp": uapi.UFFDIO_REGISTER_MODE_WP,
}


class AnonMapping:
    """A MAP_PRIVATE anonymous mapping and its address, shaped like
    SharedMapping for touch()."""

    def __init__(self, length: int) -> None:
        self.mmap = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.length = length
        self.address = buffer_address(self.mmap)


def touch(m: SharedMapping | AnonMapping, cmd: dict[str, object]) -> object:
    """Do what *cmd* says to the mapping; the answer."""
    op, off, n = cmd["op"], int(cmd.get("off", 0)), int(cmd.get("n", 0))  # type: ignore[call-overload]
    view = memoryview(m.mmap)
    if op == "read":
        return hashlib.sha256(view[off : off + n]).hexdigest()
    if op == "numpy_sum":
        return int(np.frombuffer(m.mmap, dtype=np.uint8, count=n, offset=off).sum(dtype=np.uint64))
    if op == "write":
        data = bytes.fromhex(str(cmd["data"]))
        view[off : off + len(data)] = data
        return len(data)
    if op == "os_write":
        # The kernel reads the page on our behalf (copy_from_user): a fault
        # raised inside the kernel, not by a user-mode load.
        r, w = os.pipe()
        try:
            os.write(w, view[off : off + n])
            return hashlib.sha256(os.read(r, n)).hexdigest()
        finally:
            os.close(r)
            os.close(w)
    if op == "threads_read":
        offs = [int(o) for o in cmd["offs"]]  # type: ignore[attr-defined]
        out: list[str] = [""] * len(offs)

        def read(i: int) -> None:
            out[i] = hashlib.sha256(view[offs[i] : offs[i] + n]).hexdigest()

        threads = [threading.Thread(target=read, args=(i,)) for i in range(len(offs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out
    if op == "fork_read":
        # The child reads through the mapping it inherited.
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.write(w, hashlib.sha256(view[off : off + n]).hexdigest().encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            digest = f.read().decode()
        return [digest, os.waitpid(pid, 0)[1]]
    raise ValueError(f"unknown op {op!r}")


def take_over(m: SharedMapping | AnonMapping, uffd: Uffd) -> Uffd:
    """What a client's watchdog does when its server is gone: move the
    range to a uffd with UFFD_FEATURE_SIGBUS, so that the pages mapped
    keep working and every other touch is SIGBUS instead of a hang."""
    sigbus = Uffd.open(features=uapi.UFFD_FEATURE_SIGBUS, optional=0)
    uffd.unregister(m.address, m.length)
    sigbus.register(m.address, m.length, MODES["missing"] | MODES["minor"])
    return sigbus


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    payload, fds = fdpass.recv(sock, 4096, 1)
    setup = json.loads(payload)
    length = int(setup["length"])
    # Private anonymous memory has no memfd: the server fills it by UFFDIO_COPY.
    m = AnonMapping(length) if setup["anon"] else SharedMapping(fds[0], length)
    uffd = Uffd.open(features=(SERVER_FEATURES | int(setup["features"])) & ~int(setup["drop"]))
    mode = 0
    for name in setup["modes"]:
        mode |= MODES[name]
    uffd.register(m.address, m.length, mode)
    reply = {"pid": os.getpid(), "address": m.address, "features": uffd.features}
    fdpass.send(sock, json.dumps(reply).encode(), [uffd.fd])
    while True:
        payload, _ = fdpass.recv(sock, 1 << 20, 0)
        if not payload:
            return
        cmd = json.loads(payload)
        if cmd["op"] == "exit":
            return
        if cmd["op"] == "take_over":
            uffd = take_over(m, uffd)
            sock.send(json.dumps({"ok": uffd.features}).encode())
            continue
        sock.send(json.dumps({"ok": touch(m, cmd)}).encode())


if __name__ == "__main__":
    main()
