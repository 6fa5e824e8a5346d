"""A client process of the hardware MMU, driven by the tests.

``python hw_user.py``: one JSON command per line on stdin, one JSON
answer per line on stdout (``{"ok": ...}``, or ``{"error": [type, errno,
message]}`` for an OSError/ValueError the command raised).  It runs in a
process of its own because a touch of a map may fault, and a faulting
thread holds the GIL until the server answers -- or, with the server dead,
until the watchdog's SIGBUS ends the process (the test sees -SIGBUS).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from typing import Any

import numpy as np

import vnpager
from vnpager.client import HardwareVM, HwMmap
from vnpager.client.vm import ObjectMount
from vnpager.vfs.objstore import PartPolicy

vm: HardwareVM | None = None
maps: dict[int, HwMmap] = {}
mounts: list[ObjectMount] = []


def peak_rss(pid: int) -> int:
    """VmHWM of *pid*: its peak resident set, shared memory (memfd pages) included, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise LookupError("no VmHWM")


def sha(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def do(cmd: dict[str, Any]) -> Any:
    global vm
    op = cmd["op"]
    if op == "connect":
        vm = HardwareVM.connect(cmd["path"]) if "path" in cmd else vnpager.VM(cmd["physmem"], mmu="hardware")
        return {"pid": os.getpid(), "server": vm.server_pid}
    if op == "peak_rss":
        return peak_rss(os.getpid())
    assert vm is not None
    if op == "mount":  # an object store: {"protocol", "options", "policy"?}
        policy = PartPolicy(**cmd["policy"]) if "policy" in cmd else None
        mounts.append(vm.mount_objects(cmd["protocol"], policy=policy, **cmd.get("options", {})))
        return len(mounts) - 1
    if op == "objstats":
        return mounts[cmd.get("mount", 0)].statistics()
    if op == "map" and "url" in cmd:
        maps[len(maps)] = vm.map(cmd["url"], cmd.get("length", 0), access=cmd.get("access", 0))
        return len(maps) - 1
    if op == "map":
        fd = os.open(cmd["file"], os.O_RDWR)
        try:
            m = vnpager.mmap(fd, cmd.get("length", 0), vm=vm)
        finally:
            os.close(fd)
        maps[len(maps)] = m
        return len(maps) - 1
    m = maps[cmd.get("map", 0)]
    off, n = cmd.get("off", 0), cmd.get("n", 0)
    if op == "read":
        return sha(memoryview(m)[off:off + n])
    if op == "numpy_sum":
        return int(np.frombuffer(m, dtype=np.uint8, count=n, offset=off).sum(dtype=np.uint64))
    if op == "write":
        data = bytes.fromhex(cmd["data"])
        m[off:off + len(data)] = data
        return len(data)
    if op == "flush":
        m.flush()
        return None
    if op == "close":
        m.close()
        return None
    if op == "stats":
        return vm.statistics()
    if op == "vmstats":
        return vm.stats()
    if op == "threads_read":
        out = [""] * len(cmd["offs"])

        def read(i: int, at: int) -> None:
            out[i] = sha(memoryview(m)[at:at + n])

        threads = [threading.Thread(target=read, args=(i, at)) for i, at in enumerate(cmd["offs"])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return out
    if op == "fork":
        # the child reads, writes and flushes through the maps it inherited, then exits
        pid = os.fork()
        if pid == 0:
            try:
                digest = sha(memoryview(m)[off:off + n])
                data = bytes.fromhex(cmd["data"])
                m[cmd["woff"]:cmd["woff"] + len(data)] = data
                m.flush()
                print(json.dumps({"child": digest}), flush=True)
                os._exit(0)
            except BaseException as e:
                print(json.dumps({"child_error": repr(e)}), flush=True)
                os._exit(1)
        return os.waitpid(pid, 0)[1]
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            break
        try:
            answer = {"ok": do(cmd)}
        except (OSError, ValueError) as e:
            answer = {"error": [type(e).__name__, getattr(e, "errno", None), str(e)]}
        print(json.dumps(answer), flush=True)
    if vm is not None and cmd.get("close", True):
        vm.close()


if __name__ == "__main__":
    main()
