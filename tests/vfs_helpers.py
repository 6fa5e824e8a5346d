"""Helpers for the filesystem tests: VOP calls with the vnode locked, and a
page of a vnode object dirtied through a mapping, as a process would."""

from __future__ import annotations

from vnpager.kern.lock import RW_WRITE
from vnpager.uvm.pmap import Pmap, pmap_enter
from vnpager.uvm.uvm_page import VmPage, uvm_page_unbusy, uvm_pageactivate
from vnpager.uvm.uvm_pager import PageSlot
from vnpager.uvm.uvm_param import PROT_READ, PROT_WRITE
from vnpager.uvm.uvm_vnode import UvmVnode, uvn_get
from vnpager.vfs.vnode import (
    UIO_READ,
    UIO_WRITE,
    VOP_GETATTR,
    VOP_READ,
    VOP_UNLOCK,
    VOP_WRITE,
    Uio,
    Vattr,
    Vnode,
    vn_lock,
)


def vop_read(vp: Vnode, offset: int, length: int) -> tuple[int, bytes]:
    """(errno, the bytes read) for a VOP_READ of *length* bytes at *offset*."""
    buf = bytearray(length)
    uio = Uio([memoryview(buf)], offset, length, UIO_READ)
    vn_lock(vp)
    try:
        error = VOP_READ(vp, uio)
    finally:
        VOP_UNLOCK(vp)
    return error, bytes(buf[:length - uio.resid])


def vop_write(vp: Vnode, offset: int, data: bytes) -> tuple[int, int]:
    """(errno, bytes written) for a VOP_WRITE of *data* at *offset*."""
    uio = Uio([memoryview(data)], offset, len(data), UIO_WRITE)
    vn_lock(vp)
    try:
        error = VOP_WRITE(vp, uio)
    finally:
        VOP_UNLOCK(vp)
    return error, len(data) - uio.resid


def size_of(vp: Vnode) -> int:
    va = Vattr()
    assert VOP_GETATTR(vp, va) == 0
    return va.va_size


def get_page(uvn: UvmVnode, offset: int) -> tuple[int, VmPage | None]:
    """(pager result, the page, busy) of uvn_get's unlocked pass for one page.

    => caller holds no lock; none is held on return.
    """
    uvn.vmobjlock.rw_enter(RW_WRITE)
    pps: list[PageSlot] = [None]
    result, _ = uvn_get(uvn, offset, pps, 1, 0, PROT_READ, 0, 0)
    pg = pps[0]
    assert pg is None or isinstance(pg, VmPage)
    return result, pg


def release_page(uvn: UvmVnode, pg: VmPage) -> None:
    """Put a page got by :func:`get_page` on the active queue, unbusy.

    => caller holds no lock.
    """
    uvn.vmobjlock.rw_enter(RW_WRITE)
    _release(pg)
    uvn.vmobjlock.rw_exit()


def _release(pg: VmPage) -> None:
    with pg.vm.pageqlock:
        uvm_pageactivate(pg)
    uvm_page_unbusy([pg])


def dirty_page(uvn: UvmVnode, offset: int, data: bytes) -> VmPage:
    """Page in *offset*, map it writable and store *data* at its start.

    => caller holds no lock; none is held on return.
    """
    result, pg = get_page(uvn, offset)
    assert pg is not None, f"page-in failed: {result}"
    uvn.vmobjlock.rw_enter(RW_WRITE)
    _release(pg)
    pmap_enter(Pmap(uvn.vm), 0, pg, PROT_READ | PROT_WRITE, PROT_WRITE)
    pg.data[:len(data)] = data
    uvn.vmobjlock.rw_exit()
    return pg
