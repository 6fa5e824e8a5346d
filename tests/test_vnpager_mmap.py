"""vnpager.mmap: each API against the stdlib's mmap, and what it does better
(errors instead of signals, bounded memory, close-to-open, shared objects)."""

from __future__ import annotations

import errno
import json
import mmap as std
import os
import pickle
import re
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import vnpager
from vnpager import VM, BusError
from vnpager.uvm.uvm_pager import PGO_ALLPAGES, PGO_CLEANIT
from vnpager.uvm.uvm_param import parse_size
from vnpager.uvm.uvm_vnode import uvn_flush
from vnpager.vfs.faultfs import FaultFS, FaultPlan

PS = 4096


@pytest.fixture
def datafile(tmp_path: Path) -> Path:
    """Eight pages and a bit, each page recognisable."""
    p = tmp_path / "data"
    p.write_bytes(b"".join(bytes([65 + i]) * PS for i in range(8)) + b"tail\nline\n")
    return p


@pytest.fixture
def rw(datafile: Path) -> Iterator[Any]:
    with open(datafile, "r+b") as f:
        yield f


def outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as e:  # compared with the stdlib's outcome
        return type(e).__name__, str(e)


# ------------------------------------------------------------ same as the stdlib

BAD_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("negative length", {"length": -1}),
    ("negative offset", {"offset": -PS}),
    ("offset not aligned", {"offset": 1}),
    ("offset past the end", {"length": 5, "offset": 16 * PS}),
    ("length past the end", {"length": 9 * PS}),
    ("access and prot", {"access": vnpager.ACCESS_READ, "prot": vnpager.PROT_READ}),
    ("access and flags", {"access": vnpager.ACCESS_WRITE, "flags": vnpager.MAP_PRIVATE}),
    ("bad access", {"access": 4}),
    ("no sharing flag", {"flags": 0}),
    ("float length", {"length": 1.5}),
    ("None offset", {"offset": None}),
]


@pytest.mark.parametrize(("what", "kwargs"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_fail_as_the_stdlib(vm: VM, rw: Any, what: str, kwargs: dict[str, Any]) -> None:
    args = {"length": PS, **kwargs}
    expected = outcome(std.mmap, rw.fileno(), **args)
    assert expected[0] != "ok"
    assert outcome(vnpager.mmap, rw.fileno(), **args, vm=vm) == expected


def test_descriptor_checks_as_the_kernel(vm: VM, datafile: Path, tmp_path: Path) -> None:
    with open(datafile, "rb") as ro:
        with pytest.raises(PermissionError):
            vnpager.mmap(ro.fileno(), PS, vm=vm)  # shared and writable on a read-only file
        with vnpager.mmap(ro.fileno(), PS, access=vnpager.ACCESS_COPY, vm=vm) as m:
            m[0] = 0
            assert m[:2] == b"\0A"
        with vnpager.mmap(ro.fileno(), PS, access=vnpager.ACCESS_READ, vm=vm) as m:
            assert m[PS - 1] == 65
    with pytest.raises(OSError) as bad:
        vnpager.mmap(-2, PS, vm=vm)
    assert bad.value.errno == errno.EBADF
    dfd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as notfile:
            vnpager.mmap(dfd, PS, access=vnpager.ACCESS_READ, vm=vm)
        assert notfile.value.errno == errno.ENODEV
    finally:
        os.close(dfd)
    (tmp_path / "empty").write_bytes(b"")
    with open(tmp_path / "empty", "rb") as f, pytest.raises(ValueError, match="cannot mmap an empty file"):
        vnpager.mmap(f.fileno(), 0, access=vnpager.ACCESS_READ, vm=vm)


def _unqualified(result: tuple[str, Any]) -> str:
    """The outcome, the class named 'mmap' whatever its module (Python's
    own messages print a Python class unqualified)."""
    return re.sub(r"'(vnpager\.)?mmap(\.mmap)?'", "'mmap'", repr(result))


@contextmanager
def _both(vm: VM, path: Path, access: int) -> Iterator[tuple[Any, Any]]:
    """A stdlib map of *path* and a vnpager map of its twin copy."""
    twin = path.with_name("twin")
    twin.write_bytes(path.read_bytes())
    with open(path, "r+b") as f, open(twin, "r+b") as g, \
            std.mmap(f.fileno(), 0, access=access) as ref, \
            vnpager.mmap(g.fileno(), 0, access=access, vm=vm) as ours:
        yield ref, ours


SCRIPT: list[tuple[str, Callable[[Any], Any]]] = [
    ("repr", repr),
    ("len", len),
    ("size", lambda m: m.size()),
    ("readline", lambda m: [m.seek(8 * PS), m.readline(), m.readline(), m.readline(), m.tell()]),
    ("read", lambda m: [m.seek(PS - 2), m.read(4), m.read(0), m.read(-1)[-5:], m.read()]),
    ("read_byte past the end", lambda m: [m.seek(0, 2), m.read_byte()]),
    ("seek", lambda m: [m.seek(10), m.seek(-3, 1), m.tell(), m.seek(-1, 2), m.tell(), m.seek(1, 2)]),
    ("bad whence", lambda m: m.seek(0, 3)),
    ("index", lambda m: [m[0], m[-1], m[PS], m[2**70]]),
    ("index out of range", lambda m: m[len(m)]),
    ("bad index", lambda m: m["a"]),
    ("slices", lambda m: [m[PS - 3:PS + 3], m[-4:], m[::PS], m[::-PS], m[5:2], m[PS:0:-1000]]),
    ("find", lambda m: [m.find(b"B"), m.find(b"AB"), m.rfind(b"A"), m.find(b"line", -20),
                        m.find(b"", 3), m.rfind(b"", 3, 9), m.find(b"C", 1, -1), m.find(b"zz")]),
    ("find from pos", lambda m: [m.seek(3 * PS), m.find(b"A"), m.find(b"D")]),
    ("find str", lambda m: m.find("A")),
    ("iteration", lambda m: [list(m)[PS - 1:PS + 1], list(reversed(m))[:3], b"t" in m, b"z" in m]),
    ("write", lambda m: [m.seek(PS - 1), m.write(b"xyz"), m.tell(), m[PS - 2:PS + 3]]),
    ("write too much", lambda m: [m.seek(-2, 2), m.write(b"xyz")]),
    ("write str", lambda m: m.write("xyz")),
    ("write_byte", lambda m: [m.write_byte(1), m[0], m.write_byte(256)]),
    ("setitem", lambda m: [m.__setitem__(-1, 7), m[-1], m.__setitem__(0, 256)]),
    ("setitem bytes", lambda m: m.__setitem__(0, b"a")),
    ("setslice", lambda m: [m.__setitem__(slice(PS - 1, PS + 1), b"()"), m[PS - 2:PS + 2]]),
    ("setslice wrong size", lambda m: m.__setitem__(slice(0, 3), b"ab")),
    ("extended setslice", lambda m: [m.__setitem__(slice(None, None, -PS), bytes(range(9))),
                                     m[::PS]]),
    ("delitem", lambda m: m.__delitem__(0)),
    ("move", lambda m: [m.move(1, PS, 3 * PS), m[:5], m[3 * PS:3 * PS + 3], m.move(0, 0, 1 << 20)]),
    ("flush", lambda m: [m.flush(), m.flush(PS, PS), m.flush(0, 1 << 30)]),
    ("flush unaligned", lambda m: m.flush(1, 5)),
    ("madvise", lambda m: [m.madvise(vnpager.MADV_SEQUENTIAL), m.madvise(vnpager.MADV_RANDOM, PS, 5),
                           m.madvise(vnpager.MADV_DONTNEED, 0, 1 << 30), m[5]]),
    ("madvise out of bounds", lambda m: m.madvise(vnpager.MADV_NORMAL, len(m))),
    ("madvise unaligned", lambda m: m.madvise(vnpager.MADV_NORMAL, 1)),
    ("resize", lambda m: [m.resize(3 * PS + 5), len(m), m.size(), m[-5:], m.resize(0)]),
    ("concat", lambda m: m + m),
    ("pickle", pickle.dumps),
    ("closed", lambda m: [m.close(), m.closed, repr(m), m.close(), m.__exit__(None, None, None)]),
    ("closed len", lambda m: [m.close(), len(m)]),
    ("closed read", lambda m: [m.close(), m.read(1)]),
    ("closed tell", lambda m: [m.close(), m.tell()]),
    ("closed enter", lambda m: [m.close(), m.__enter__()]),
    ("closed iter", lambda m: [m.close(), list(m)]),
]


@pytest.mark.parametrize("access", [vnpager.ACCESS_DEFAULT, vnpager.ACCESS_READ, vnpager.ACCESS_WRITE,
                                    vnpager.ACCESS_COPY])
@pytest.mark.parametrize(("what", "script"), SCRIPT, ids=[s[0] for s in SCRIPT])
def test_api_as_the_stdlib(vm: VM, datafile: Path, access: int, what: str,
                           script: Callable[[Any], Any]) -> None:
    with _both(vm, datafile, access) as (ref, ours):
        assert _unqualified(outcome(script, ours)) == _unqualified(outcome(script, ref))
        if not ref.closed:
            ref.flush()
            ours.flush()
    assert datafile.with_name("twin").read_bytes() == datafile.read_bytes()


def test_object_protocols(vm: VM) -> None:
    class Sub(vnpager.mmap):
        def __new__(cls, length: int) -> Sub:
            return super().__new__(cls, -1, length, vm=vm)  # type: ignore[return-value]

    m = Sub(PS)
    assert repr(m).startswith("<Sub closed=False, access=ACCESS_DEFAULT, length=4096,")
    ref = weakref.ref(m)
    with m:
        assert not m.closed
        assert m[:] == bytes(PS)
    assert m.closed
    del m
    assert ref() is None
    with pytest.raises(TypeError):
        memoryview(vnpager.mmap(-1, 1, vm=vm))  # no buffer protocol: documented
    assert vnpager.mmap(-1, 1, vm=vm).seekable()


def test_anonymous_memory(vm: VM) -> None:
    with vnpager.mmap(-1, 3 * PS, flags=vnpager.MAP_PRIVATE | vnpager.MAP_ANONYMOUS, vm=vm) as m:
        assert m[:] == bytes(3 * PS)
        m[PS:PS + 3] = b"abc"
        with pytest.raises(OSError) as size:
            m.size()  # as CPython's: fstat(-1)
        assert size.value.errno == errno.EBADF
        m.resize(100 * PS)  # CPython's grown anonymous pages are SIGBUS; ours are memory
        m[-1] = 9
        assert (m[PS:PS + 3], m[-1], m[50 * PS]) == (b"abc", 9, 0)
        assert vm.stats()["resident"] > 0
    assert vm.stats()["persisting"] == 0  # anonymous memory goes with its map


def test_prot_none_is_segv_not_a_signal(vm: VM) -> None:
    m = vnpager.mmap(-1, PS, prot=0, vm=vm)
    with pytest.raises(vnpager.SegvError):
        m[0]
    m.close()


def test_trackfd_false(vm: VM, rw: Any) -> None:
    with vnpager.mmap(rw.fileno(), PS, trackfd=False, vm=vm) as m:
        with pytest.raises(OSError) as size:
            m.size()
        assert size.value.errno == errno.EBADF
        with pytest.raises(ValueError, match="trackfd=False"):
            m.resize(2 * PS)
        assert m[0] == 65


def test_private_resize_keeps_private_pages(vm: VM, datafile: Path) -> None:
    with open(datafile, "r+b") as f, vnpager.mmap(f.fileno(), 2 * PS, flags=vnpager.MAP_PRIVATE,
                                                    vm=vm) as m:
        m[0] = 0
        m.resize(3 * PS)
        assert m[:2] == b"\0A" and m[2 * PS] == 67
    assert datafile.read_bytes()[0] == 65 and datafile.stat().st_size == 3 * PS


# ------------------------------------------------------------ sharing and caching

def test_vm_map_of_a_path(vm: VM, datafile: Path) -> None:
    with vm.map(datafile) as m:
        m[:3] = b"abc"
        assert m[PS] == 66 and m.size() == len(m) == datafile.stat().st_size
    assert datafile.read_bytes()[:4] == b"abcA"
    datafile.chmod(0o444)
    with vm.map(datafile, access=vnpager.ACCESS_READ) as m:
        assert m[:4] == b"abcA"


def test_two_maps_of_a_file_share_pages(vm: VM, rw: Any) -> None:
    with vnpager.mmap(rw.fileno(), 0, vm=vm) as a, vnpager.mmap(rw.fileno(), PS, offset=PS, vm=vm) as b:
        a[PS:PS + 3] = b"xyz"
        assert b[:3] == b"xyz"
        b[-1] = 0
        assert a[2 * PS - 1] == 0


def test_close_writes_back_and_the_pages_persist(vm: VM, datafile: Path, rw: Any) -> None:
    with vnpager.mmap(rw.fileno(), 0, vm=vm) as m:
        m[:4] = b"WXYZ"
        data = m[:]
    assert datafile.read_bytes() == data  # close wrote it: close-to-open
    assert vm.stats()["persisting"] == 1
    reads = vm.uvmexp.read_ios
    with vnpager.mmap(rw.fileno(), 0, vm=vm) as m:
        assert m[:] == data
    assert vm.uvmexp.read_ios == reads, "the persisting pages were read again"


def test_a_file_changed_on_disk_is_read_again(vm: VM, datafile: Path, rw: Any) -> None:
    with vnpager.mmap(rw.fileno(), 0, vm=vm) as m:
        assert m[:3] == b"AAA"
    st = datafile.stat()
    with open(datafile, "r+b") as other:
        other.write(b"new")
    os.utime(datafile, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a coarse clock
    with vnpager.mmap(rw.fileno(), 0, vm=vm) as m:
        assert m[:4] == b"newA"


# ------------------------------------------------------------ errors instead of signals

def test_truncated_from_outside_raises_bus_error(vm: VM, datafile: Path, rw: Any) -> None:
    m = vnpager.mmap(rw.fileno(), 0, vm=vm)
    assert m[7 * PS] == 72  # resident, and mapped
    os.truncate(datafile, 2 * PS + 100)
    with pytest.raises(BusError):
        m[7 * PS]
    with pytest.raises(BusError):
        m[3 * PS:3 * PS + 1] = b"x"
    with pytest.raises(BusError):
        m.find(b"tail")
    assert m[2 * PS + 99] == 67
    assert m[2 * PS + 100] == 0  # past the end in the last page: zeros, as the kernel's
    vm.check_invariants()
    os.truncate(datafile, 8 * PS)  # grown again: the pages come back, as zeros
    assert m[7 * PS:7 * PS + 2] == b"\0\0"
    m.close()
    vm.check_invariants()


def test_resize_frees_the_pages_before_the_file_shrinks(vm: VM, datafile: Path, rw: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A pageout while resize shrinks the file writes nothing back past the
    new end: the pages there are gone before the file shrinks (one order
    for every front end, ubc_setsize's)."""
    before = datafile.read_bytes()
    m = vnpager.mmap(rw.fileno(), 0, vm=vm)
    m[7 * PS:7 * PS + 4] = b"gone"  # a dirty page past the new end
    uvn = m._uobj
    ftruncate = os.ftruncate

    def ftruncate_then_pageout(fd: int, length: int) -> None:
        ftruncate(fd, length)
        with uvn.vmobjlock:  # the page daemon cleans the object now, asynchronously
            uvn_flush(uvn, 0, 0, PGO_CLEANIT | PGO_ALLPAGES)
        vm.aiodaemon.drain()

    monkeypatch.setattr(os, "ftruncate", ftruncate_then_pageout)
    m.resize(2 * PS)
    monkeypatch.undo()
    assert datafile.stat().st_size == 2 * PS
    m.close()
    assert datafile.read_bytes() == before[:2 * PS]
    vm.check_invariants()


def _faulty(m: Any) -> FaultPlan:
    plan = FaultPlan(seed=1)
    vp = m._vp
    vp.v_op = FaultFS(vp.v_op, plan)
    return plan


def test_flush_raises_the_write_error_and_a_later_flush_writes(vm: VM, datafile: Path, rw: Any) -> None:
    with vnpager.mmap(rw.fileno(), 0, vm=vm) as m:
        plan = _faulty(m)
        plan.fail("write", errno.ENOSPC)
        m[PS] = 0
        with pytest.raises(OSError) as err:
            m.flush()
        assert err.value.errno == errno.ENOSPC
        assert datafile.read_bytes()[PS] == 66
        plan.clear()
        m.flush()
        assert datafile.read_bytes()[PS] == 0


def test_read_error_raises_the_backend_errno(vm: VM, rw: Any) -> None:
    with vnpager.mmap(rw.fileno(), 0, vm=vm) as m:
        plan = _faulty(m)
        plan.fail("read", errno.EIO)
        with pytest.raises(OSError) as err:
            m[3 * PS]
        assert err.value.errno == errno.EIO
        plan.clear()
        assert m[3 * PS] == 68


def test_close_raises_the_write_error(vm: VM, rw: Any) -> None:
    m = vnpager.mmap(rw.fileno(), 0, vm=vm)
    plan = _faulty(m)
    plan.fail("write", errno.EIO)
    m[0] = 0
    with pytest.raises(OSError):
        m.close()
    assert m.closed
    plan.clear()
    vm.close()  # the page stayed dirty in the persisting object: sync writes it


# ------------------------------------------------------------ the machine

def test_stats_keys(vm: VM) -> None:
    with vnpager.mmap(-1, 2 * PS, vm=vm) as m:
        m[PS] = 1
    stats = vm.stats()
    for key in ("faults", "faultahead", "pageins", "pageouts", "read_ios", "write_ios", "resident",
                "free", "active", "inactive", "persisting"):
        assert isinstance(getattr(stats, key), int) and stats[key] == getattr(stats, key), key
    assert stats.free + stats.resident == vm.npages
    assert stats.faults >= 1
    with pytest.raises(KeyError):
        stats["nonsense"]


def test_parse_size() -> None:
    assert [parse_size(s) for s in ("4096", "64M", "1G", "2k", "3MiB", "1gb", " 8 K ", "512B")] == \
        [4096, 64 << 20, 1 << 30, 2048, 3 << 20, 1 << 30, 8192, 512]
    for bad in ("lots", "4X", "-1M", "1.5M", "", "4MiBB"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)


def test_vm_takes_sizes_as_the_cli_does(monkeypatch: pytest.MonkeyPatch) -> None:
    with VM(physmem="1M") as vm:
        assert vm.physmem == 1 << 20
    with pytest.raises(ValueError, match="not a size"):
        VM(physmem="a lot")
    monkeypatch.setenv("VNPAGER_PHYSMEM", "2MiB")  # a VM made without physmem, as the default VM
    with VM() as vm:
        assert vm.physmem == 2 << 20
    monkeypatch.setenv("VNPAGER_PHYSMEM", "plenty")
    with pytest.raises(ValueError, match="VNPAGER_PHYSMEM: not a size"):
        VM()


def _run(code: str, env: dict[str, str] | None = None) -> Any:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=110, check=True)
    return json.loads(out.stdout)


def test_default_vm_sized_by_environment() -> None:
    code = """
        import json, vnpager
        m = vnpager.mmap(-1, 10)
        print(json.dumps([vnpager.default_vm().physmem, m._vm is vnpager.default_vm()]))
    """
    assert _run(code, {"VNPAGER_PHYSMEM": "8M"}) == [8 << 20, True]
    assert _run(code, {"VNPAGER_PHYSMEM": ""}) == [256 << 20, True]


def test_reading_1gib_through_16mib(tmp_path: Path) -> None:
    """A sparse 1 GiB file read in 1 MiB slices: resident pages never
    exceed physmem and the process's peak RSS stays under 200 MiB.

    Measured in a child, so that the test runner's memory does not count,
    as VmHWM (the peak RSS of the child's own memory): ru_maxrss would not
    do, since Linux carries the parent's peak over a vfork and exec.
    """
    path = tmp_path / "big"
    code = f"""
        import json, os, vnpager
        path, size, chunk = {str(path)!r}, 1 << 30, 1 << 20
        os.truncate(path, size)
        vm = vnpager.VM(physmem=16 << 20)
        peak, zeros = 0, bytes(chunk)
        with open(path, "rb") as f, vnpager.mmap(f.fileno(), 0, access=vnpager.ACCESS_READ, vm=vm) as m:
            m.madvise(vnpager.MADV_SEQUENTIAL)
            for off in range(0, size, chunk):
                assert m[off:off + chunk] == zeros
                peak = max(peak, vm.stats()["resident"])
        vm.check_invariants()
        with open("/proc/self/status") as status:
            hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        print(json.dumps({{"peak": peak, "npages": vm.npages, "pageins": vm.uvmexp.pageins,
                          "maxrss_kib": hwm}}))
    """
    path.touch()
    got = _run(code)
    assert got["pageins"] == (1 << 30) // PS
    assert got["peak"] <= got["npages"]
    assert got["maxrss_kib"] < 200 * 1024
