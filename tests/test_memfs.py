"""memfs keeps file data sparsely: holes cost nothing and read as zeros."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfs_helpers import dirty_page, size_of, vop_read, vop_write
from vnpager import VM
from vnpager.kern.lock import RW_WRITE
from vnpager.uvm.uvm_pager import PGO_ALLPAGES, PGO_CLEANIT, PGO_SYNCIO
from vnpager.uvm.uvm_param import PROT_READ, PROT_WRITE
from vnpager.uvm.uvm_vnode import uvn_attach, uvn_detach, uvn_flush
from vnpager.vfs.memfs import MEM_CHUNK, MemData, memfs_create
from vnpager.vfs.mount import vrele
from vnpager.vfs.specfs import BlockDevice, bdevvp
from vnpager.vfs.vnode import UIO_WRITE, Uio

GiB = 1 << 30


def test_create_holds_data_and_reads_stop_at_eof(vm: VM) -> None:
    vp = memfs_create(vm.vfs, vm.memfs, b"hello world")
    assert size_of(vp) == 11
    assert vop_read(vp, 0, 100) == (0, b"hello world")
    assert vop_read(vp, 6, 3) == (0, b"wor")
    assert vop_read(vp, 11, 10) == (0, b"")
    assert vop_read(vp, 50, 10) == (0, b"")
    vrele(vp)


def test_a_big_file_costs_nothing_until_written(vm: VM) -> None:
    vp = memfs_create(vm.vfs, vm.memfs, size=GiB)
    data: MemData = vp.v_data.data
    assert size_of(vp) == GiB
    assert data.stored == 0
    assert vop_read(vp, GiB // 2, 4096) == (0, bytes(4096))
    assert vop_write(vp, GiB // 2 + 10, b"xyz") == (0, 3)
    assert data.stored == MEM_CHUNK
    assert size_of(vp) == GiB
    assert vop_read(vp, GiB // 2 + 8, 7) == (0, b"\0\0xyz\0\0")
    vrele(vp)


def test_size_cuts_or_extends_the_initial_data() -> None:
    assert bytes(MemData(b"abcdef", size=3)) == b"abc"
    assert bytes(MemData(b"ab", size=5)) == b"ab\0\0\0"


def test_zeros_written_into_a_hole_leave_the_hole() -> None:
    data = MemData(size=4 * MEM_CHUNK)
    data.write(Uio([memoryview(bytes(2 * MEM_CHUNK))], MEM_CHUNK, 2 * MEM_CHUNK, UIO_WRITE))
    assert data.stored == 0
    data.write(Uio([memoryview(bytes(MEM_CHUNK))], 4 * MEM_CHUNK, MEM_CHUNK, UIO_WRITE))
    assert (data.size, data.stored) == (5 * MEM_CHUNK, 0)  # it still grows the file


def test_write_across_chunks_from_several_buffers() -> None:
    data = MemData()
    a, b = b"A" * (MEM_CHUNK - 3), b"B" * (MEM_CHUNK + 7)
    uio = Uio([memoryview(a), memoryview(b)], 5, len(a) + len(b), UIO_WRITE)
    data.write(uio)
    assert uio.resid == 0 and uio.offset == 5 + len(a) + len(b)
    assert bytes(data) == bytes(5) + a + b
    assert data.stored == 3 * MEM_CHUNK


def test_shrink_forgets_the_bytes_past_the_end(vm: VM) -> None:
    vp = memfs_create(vm.vfs, vm.memfs, b"x" * (3 * MEM_CHUNK))
    data: MemData = vp.v_data.data
    for newsize in (2 * MEM_CHUNK + 100, 2 * MEM_CHUNK, 10):
        assert vp.v_op.setsize(vp, newsize) == 0
        assert size_of(vp) == newsize
        assert data.stored == -(-newsize // MEM_CHUNK) * MEM_CHUNK
    assert vp.v_op.setsize(vp, 3 * MEM_CHUNK) == 0
    assert vop_read(vp, 0, 4 * MEM_CHUNK) == (0, b"x" * 10 + bytes(3 * MEM_CHUNK - 10))
    vrele(vp)


def test_negative_size_is_refused() -> None:
    with pytest.raises(ValueError):
        MemData().truncate(-1)


ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 4 * MEM_CHUNK), st.binary(min_size=1, max_size=MEM_CHUNK + 9)),
    st.tuples(st.just("zeros"), st.integers(0, 4 * MEM_CHUNK), st.integers(1, 2 * MEM_CHUNK)),
    st.tuples(st.just("truncate"), st.integers(0, 5 * MEM_CHUNK), st.none()),
), max_size=12)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_behaves_as_a_flat_file(script: list[tuple[str, int, bytes | int | None]]) -> None:
    data, model = MemData(), bytearray()
    for op, n, arg in script:
        if op == "truncate":
            data.truncate(n)
            del model[n:]
            model.extend(bytes(n - len(model)))
            continue
        chunk = arg if isinstance(arg, bytes) else bytes(arg or 0)
        data.write(Uio([memoryview(chunk)], n, len(chunk), UIO_WRITE))
        model.extend(bytes(max(0, n + len(chunk) - len(model))))
        model[n:n + len(chunk)] = chunk
    assert data.size == len(model)
    assert bytes(data) == model
    assert data.pread(len(model) // 2, MEM_CHUNK) == model[len(model) // 2:][:MEM_CHUNK]
    assert data.stored <= -(-len(model) // MEM_CHUNK) * MEM_CHUNK


def test_block_device_is_sparse_and_bounded(vm: VM) -> None:
    dev = BlockDevice("sd0", 512, (4 * GiB) // 512)
    vp = bdevvp(vm.vfs, vm.specfs, dev)
    assert vop_write(vp, 3 * GiB, b"sector") == (0, 6)
    assert vop_read(vp, 3 * GiB, 6) == (0, b"sector")
    assert dev.data.stored == MEM_CHUNK
    assert vop_write(vp, 4 * GiB - 2, b"past") == (errno.ENOSPC, 0)
    vrele(vp)


def test_pager_writes_one_page_of_a_huge_file(vm: VM) -> None:
    """A page dirtied in the middle of a 1 GiB file costs one chunk of the file."""
    vp = memfs_create(vm.vfs, vm.memfs, size=GiB)
    uvn = uvn_attach(vp, PROT_READ | PROT_WRITE)
    assert uvn is not None
    off = GiB // 2
    pg = dirty_page(uvn, off, b"page")
    assert bytes(pg.data[4:]) == vm.zero_page[4:]
    uvn.vmobjlock.rw_enter(RW_WRITE)
    assert uvn_flush(uvn, 0, 0, PGO_CLEANIT | PGO_SYNCIO | PGO_ALLPAGES)
    uvn.vmobjlock.rw_exit()
    data: MemData = vp.v_data.data
    assert data.pread(off, 5) == b"page\0"
    assert data.stored == MEM_CHUNK
    vrele(vp)
    uvn_detach(uvn)
