"""Bad input, table-driven (issue 4, point 7).

Each row of vnpager.mmap is run against CPython's mmap too, in this test:
vnpager must raise the same exception type (and errno) as the stdlib.
Rows below the map front end (a block device that is not a disk, a VM
too small for one cluster, the map layer's own checks) have no stdlib
twin and state what they expect.  The VM's invariants hold after each.
"""

from __future__ import annotations

import errno
import mmap as std_mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

import vnpager
from rel_helpers import Mapping
from vnpager import VM, SegvError
from vnpager.uvm.uvm_map import MAP_SHARED, uvm_map
from vnpager.uvm.uvm_param import MAXBSIZE, PROT_READ, PROT_WRITE
from vnpager.uvm.uvm_vnode import uvn_attach
from vnpager.vfs.memfs import memfs_create
from vnpager.vfs.specfs import D_TAPE, BlockDevice, bdevvp

PS = vnpager.PAGESIZE
SIZE = 2 * PS + 100


@dataclass
class Fds:
    rw: int  # a file of SIZE bytes, read-write
    ro: int  # the same, read-only
    empty: int
    closed: int  # a descriptor number just closed
    directory: int
    devnull: int


@pytest.fixture
def fds(tmp_path: Path) -> Iterator[Fds]:
    path, empty = tmp_path / "f", tmp_path / "empty"
    path.write_bytes(os.urandom(SIZE))
    empty.touch()
    opened = [os.open(path, os.O_RDWR), os.open(path, os.O_RDONLY), os.open(empty, os.O_RDWR),
              os.open(tmp_path, os.O_RDONLY), os.open(os.devnull, os.O_RDWR)]
    rw, ro, em, d, dn = opened
    closed = os.dup(rw)
    os.close(closed)  # the highest number: no other descriptor of ours reuses it
    yield Fds(rw, ro, em, closed, d, dn)
    for fd in opened:
        os.close(fd)


Ctor = Callable[..., Any]


def _closed(c: Ctor, f: Fds) -> Any:
    m = c(f.rw, 0)
    m.close()
    return m


def _readonly(c: Ctor, f: Fds) -> Any:
    return c(f.ro, 0, access=std_mmap.ACCESS_READ)


Row = Callable[[Ctor, Fds], object]


def _row(what: str, fn: Row) -> Any:
    return pytest.param(what, fn, id=what)


ROWS = [
    _row("negative length", lambda c, f: c(f.rw, -1)),
    _row("huge length", lambda c, f: c(f.rw, 2**63)),
    _row("length past the end of the file", lambda c, f: c(f.rw, SIZE + PS)),
    _row("negative offset", lambda c, f: c(f.rw, PS, offset=-PS)),
    _row("huge offset", lambda c, f: c(f.rw, 0, offset=2**62)),
    _row("offset past the end of the file", lambda c, f: c(f.rw, 0, offset=4 * PS)),
    _row("offset not a multiple of ALLOCATIONGRANULARITY", lambda c, f: c(f.rw, PS, offset=100)),
    _row("bad descriptor", lambda c, f: c(987_654, PS)),
    _row("closed descriptor", lambda c, f: c(f.closed, PS)),
    _row("empty file, length 0", lambda c, f: c(f.empty, 0)),
    _row("a directory", lambda c, f: c(f.directory, PS)),
    _row("a directory, read-only", lambda c, f: c(f.directory, PS, access=std_mmap.ACCESS_READ)),
    _row("a character device", lambda c, f: c(f.devnull, PS)),
    _row("bad access", lambda c, f: c(f.rw, PS, access=7)),
    _row("access and prot both", lambda c, f: c(f.rw, PS, prot=std_mmap.PROT_READ,
                                            access=std_mmap.ACCESS_READ)),
    _row("shared writable map of a read-only descriptor", lambda c, f: c(f.ro, 0)),
    _row("ACCESS_WRITE of a read-only descriptor",
     lambda c, f: c(f.ro, 0, access=std_mmap.ACCESS_WRITE)),
    _row("write to a read-only map", lambda c, f: _readonly(c, f).write(b"x")),
    _row("slice store to a read-only map", lambda c, f: _readonly(c, f).__setitem__(slice(0, 1), b"x")),
    _row("item store to a read-only map", lambda c, f: _readonly(c, f).__setitem__(0, 1)),
    _row("write past the end", lambda c, f: c(f.rw, 0).write(b"x" * (SIZE + 1))),
    _row("index past the end", lambda c, f: c(f.rw, 0)[SIZE]),
    _row("seek past the end", lambda c, f: c(f.rw, 0).seek(SIZE + 1)),
    _row("unaligned flush", lambda c, f: c(f.rw, 0).flush(100, 10)),
    _row("flush past the end", lambda c, f: c(f.rw, 0).flush(0, SIZE + 1)),
    _row("read after close", lambda c, f: _closed(c, f).read(1)),
    _row("index after close", lambda c, f: _closed(c, f)[0]),
    _row("write after close", lambda c, f: _closed(c, f).write(b"x")),
    _row("flush after close", lambda c, f: _closed(c, f).flush()),
]


def _outcome(fn: Callable[[], object]) -> tuple[type[BaseException], int | None] | None:
    """The exception *fn* raises (type, errno), or None."""
    try:
        fn()
    except Exception as e:  # the row's subject
        return type(e), getattr(e, "errno", None)
    return None


@pytest.mark.parametrize(("what", "row"), ROWS)
def test_bad_input_raises_as_the_stdlib(vm: VM, fds: Fds, what: str, row: Row) -> None:
    std = _outcome(lambda: row(std_mmap.mmap, fds))
    assert std is not None, f"{what}: not bad input for the stdlib"
    assert _outcome(lambda: row(partial(vnpager.mmap, vm=vm), fds)) == std
    vm.check_invariants()


def test_a_block_device_that_is_not_a_disk(vm: VM) -> None:
    vp = bdevvp(vm.vfs, vm.specfs, BlockDevice("st0", 512, 1024, d_type=D_TAPE))
    assert uvn_attach(vp, PROT_READ) is None
    vm.vfs.vrele(vp)
    vm.check_invariants()


@pytest.mark.parametrize(("physmem", "page_size"), [(MAXBSIZE - 4096, 4096), (MAXBSIZE // 2, 8192),
                                                    (4 * MAXBSIZE, 1000), (4 * MAXBSIZE, 256)])
def test_a_vm_that_cannot_be(physmem: int, page_size: int) -> None:
    with pytest.raises(ValueError):
        VM(physmem=physmem, page_size=page_size)


@pytest.mark.parametrize(("what", "call", "exc"), [
    ("zero bytes", lambda vm, uobj: uvm_map(vm.vmspace, 0, uobj, 0, PROT_READ, PROT_READ, MAP_SHARED),
     ValueError),
    ("negative bytes", lambda vm, uobj: uvm_map(vm.vmspace, -PS, uobj, 0, PROT_READ, PROT_READ,
                                                MAP_SHARED), ValueError),
    ("offset not a page boundary", lambda vm, uobj: uvm_map(vm.vmspace, PS, uobj, 100, PROT_READ,
                                                            PROT_READ, MAP_SHARED), OSError),
    ("negative offset", lambda vm, uobj: uvm_map(vm.vmspace, PS, uobj, -PS, PROT_READ, PROT_READ,
                                                 MAP_SHARED), OSError),
    ("protection beyond the maximum", lambda vm, uobj: uvm_map(vm.vmspace, PS, uobj, 0,
                                                               PROT_READ | PROT_WRITE, PROT_READ,
                                                               MAP_SHARED), PermissionError),
])
def test_bad_map_layer_input(vm: VM, what: str, call: Callable[[VM, Any], object],
                             exc: type[Exception]) -> None:
    vp = memfs_create(vm.vfs, vm.memfs, b"x" * PS)
    uobj = uvn_attach(vp, PROT_READ)
    with pytest.raises(exc):
        call(vm, uobj)
    assert uobj is not None
    uobj.pgops.pgo_detach(uobj)
    vm.vfs.vrele(vp)
    vm.check_invariants()


def test_map_layer_access_faults(vm: VM) -> None:
    vp = memfs_create(vm.vfs, vm.memfs, b"x" * PS)
    m = Mapping(vm, vp, PS, prot=PROT_READ)
    vm.vfs.vrele(vp)
    with pytest.raises(SegvError) as exc:
        m.write(0, b"y")  # a store to a read-only mapping
    assert exc.value.errno == errno.EACCES
    with pytest.raises(SegvError):
        m.read(PS, 1)  # past the mapping: the guard page
    assert m.read(0, 1) == b"x"  # still usable
    assert m.close() == 0
    m2 = Mapping(vm, memfs_create(vm.vfs, vm.memfs, b"z" * PS), PS)
    assert m2.close() == 0
    with pytest.raises(SegvError):
        m2.read(0, 1)  # use after unmap
    vm.check_invariants()
