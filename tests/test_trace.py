"""VNPAGER_TRACE=1: a fault prints its calls nested, from uvm_fault down to
uvn_io and back, with flags and pager codes by name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

# one cold read fault on page 1 of an 8-page file, then the VM is closed
SCRIPT = textwrap.dedent("""
    import os, sys
    from vnpager import VM
    from vnpager.kern.trace import tracing
    from vnpager.uvm.uvm_fault import uvm_copyin
    from vnpager.uvm.uvm_map import MAP_SHARED, uvm_map
    from vnpager.uvm.uvm_param import PROT_READ, PROT_WRITE
    from vnpager.uvm.uvm_vnode import uvn_attach
    from vnpager.vfs.hostfs import hostfs_vget_path

    rw = PROT_READ | PROT_WRITE
    with tracing(False):  # set-up is not what we look at
        vm = VM(physmem=16 * 4096)
        vp = hostfs_vget_path(vm.vfs, vm.hostfs, sys.argv[1])
        uobj = uvn_attach(vp, rw)
        vm.vfs.vrele(vp)
        va = uvm_map(vm.vmspace, 8 * 4096, uobj, 0, rw, rw, MAP_SHARED)
    buf = bytearray(16)
    uvm_copyin(vm.vmspace, va + 4096 + 100, memoryview(buf))
    with tracing(False):
        vm.close()
    print(buf.hex())
""")

LINE = re.compile(r"^\[(?P<thread>[^\]]+)\] (?P<pad> *)(?P<text>\S.*)$")


def run(tmp_path: Path, env_trace: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 128)  # 8 pages
    env = dict(os.environ, VNPAGER_TRACE=env_trace)
    return subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, capture_output=True,
                          text=True, timeout=60, check=True)


def events(stderr: str) -> list[tuple[int, str]]:
    """(depth, text) of the main thread's trace lines."""
    out = []
    for line in stderr.splitlines():
        m = LINE.match(line)
        if m and m["thread"] == "MainThread":
            out.append((len(m["pad"]) // 2, m["text"]))
    return out


def test_fault_trace_is_nested_down_to_uvn_io_and_back(tmp_path: Path) -> None:
    proc = run(tmp_path, "1")
    assert proc.stdout.strip() == bytes(range(100, 116)).hex()  # the data came through
    ev = events(proc.stderr)
    calls = [(d, t.split("(")[0].split(" ")[0]) for d, t in ev]
    assert calls == [
        (0, "uvm_fault"),
        (1, "uvn_get"), (1, "uvn_get"),  # PGO_LOCKED pass: not resident
        (1, "uvn_get"),  # the unlocked pass reads
        (2, "uvn_io"), (2, "uvn_io"),
        (1, "uvn_get"),
        (0, "uvm_fault"),
    ]
    texts = [t for _, t in ev]
    assert texts[0] == "uvm_fault(<Vmspace>, vaddr=0x100001000, access_type=PROT_READ)"
    assert "flags=PGO_LOCKED" in texts[1]
    assert texts[2] == "uvn_get -> (VM_PAGER_UNLOCK, 0)"
    assert "offset=0x1000" in texts[3]
    assert "pps=[pg@0x1000]" in texts[4] and "rw=UIO_READ" in texts[4]
    assert texts[5] == "uvn_io -> VM_PAGER_OK"
    assert texts[6] == "uvn_get -> (VM_PAGER_OK, 1)"
    assert texts[7] == "uvm_fault -> None"


def test_no_trace_when_off(tmp_path: Path) -> None:
    proc = run(tmp_path, "0")
    assert proc.stdout.strip() == bytes(range(100, 116)).hex()
    assert events(proc.stderr) == []


def test_off_means_the_functions_are_not_wrapped() -> None:
    # an entry point's fork gate (kern.lock.gated) is not the tracer's wrapper: look inside it
    check = ("from vnpager.uvm import uvm_fault as f, uvm_vnode as v\n"
             "fns = (f.uvm_fault, v.uvn_get, v.uvn_io, v.uvn_flush)\n"
             "fns = [getattr(fn, '__gated__', fn) for fn in fns]\n"
             "print([hasattr(fn, '__wrapped__') for fn in fns])")
    for setting, wrapped in (("0", "False"), ("1", "True")):
        env = dict(os.environ, VNPAGER_TRACE=setting)
        out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True,
                             timeout=60, check=True).stdout
        assert out.strip() == f"[{', '.join([wrapped] * 4)}]"
