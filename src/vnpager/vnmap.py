"""The mapping core: one front end's hold on a file's VM object.

``vnpager.mmap``, ``vm.pread``/``vm.pwrite``/``vm.open`` (:mod:`vnpager.ubc`)
and the FUSE server (:mod:`vnpager.fuse.pager`) each hold a file's object
through a :class:`FileObject`, which does for all of them, one way, what an
open file description does for a kernel's callers:

* **attach**, close-to-open: the object of a host path, a descriptor or a
  vnode, attached with the access asked for; an object found persisting
  (nobody held it since its last close) is revalidated against the file's
  size and mtime first, so that what another program wrote since is read
  again (``uvm_vnp_revalidate`` with *drop_stale*);
* **errseq**: a cursor of its own into the object's write-back errors, so
  that each open is told once of each error that happened while it was
  open, whoever did the write (Linux's errseq for file descriptions);
* **sync** (msync MS_SYNC, fsync): write back a range and wait, record the
  mtime our write gave the file (each write-back records it), raise the error;
* **size**: every size change (truncate, resize, a write past the end) and
  every look at a size changed from outside goes through
  :mod:`vnpager.uvm.uvm_bio`, in one order under the object's size lock;
* **map and unmap** ranges of the object in an address space, and
  **close**: sync if asked, unmap what is still mapped, detach.

A target is a host path (looked up on the VM's hostfs), a descriptor of an
open host file, a URL of an object (``s3://bucket/key``, ``https://...``:
a vnode of the objfs mount of its protocol, :mod:`vnpager.vfs.objfs`), or a
vnode the caller holds a reference to; :func:`vnode_of` is where a name
becomes a vnode.  A filesystem that ``commits`` (objfs) gets VOP_COMMIT
after every sync's flush: that is when its writes reach other users, and a
failed commit is a write-back error like any other (errseq).
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from vnpager.kern.proc import curproc
from vnpager.uvm.uvm_bio import ubc_revalidate, ubc_setsize
from vnpager.uvm.uvm_map import Vmspace, uvm_map, uvm_unmap
from vnpager.uvm.uvm_pager import PGO_ALLPAGES, PGO_CLEANIT, PGO_SYNCIO
from vnpager.uvm.uvm_param import PROT_WRITE
from vnpager.uvm.uvm_vnode import (
    UVM_VNODE_VALID,
    UvmVnode,
    uvm_vnp_wrote,
    uvn_attach,
    uvn_errseq_check,
    uvn_errseq_sample,
    uvn_flush,
    uvn_record_error,
)
from vnpager.vfs.hostfs import HostNode, hostfs_vget_fd, hostfs_vget_path
from vnpager.vfs.objfs import is_url, objfs_vget_url
from vnpager.vfs.vnode import VOP_COMMIT, Vnode

if TYPE_CHECKING:
    from vnpager.uvm.uvm import VM

Target = str | os.PathLike[str] | int | Vnode


def _oserror(err: int, what: str = "") -> OSError:
    return OSError(err, os.strerror(err) + (f": {what}" if what else ""))


def vnode_of(vm: VM, target: Target, create: bool = False, excl: bool = False) -> Vnode:
    """The vnode *target* names, with a reference for the caller.  Raises
    OSError (the host's, for a path or descriptor; the store's, for a URL).
    *create* and *excl* are O_CREAT and O_EXCL, for a URL only (a host file
    is made by the host: ubc's _create)."""
    if isinstance(target, Vnode):
        vm.vfs.vref(target)
        return target
    if isinstance(target, int):
        return hostfs_vget_fd(vm.vfs, vm.hostfs, target)
    if is_url(target):
        return objfs_vget_url(vm.vfs, str(target), create, excl)
    return hostfs_vget_path(vm.vfs, vm.hostfs, os.fspath(target))


def _read_only(vp: Vnode) -> bool:
    return vp.v_op.readonly or (isinstance(vp.v_data, HostNode) and not vp.v_data.writable)


class FileObject:
    """One hold on a vnode's object: a reference, an errseq cursor and the
    mappings made through it.  Not thread-safe against its own close().

    => the methods take no VM lock from the caller, and may sleep.
    """

    __slots__ = ("_cursor", "_maps", "uvn")

    uvn: UvmVnode
    _cursor: int  # the write-back errors this hold was told of (uvn_errseq_check)
    _maps: dict[tuple[Vmspace, int], int]  # (space, address) -> length, of the live mappings

    def __init__(self, uvn: UvmVnode) -> None:
        """Hold *uvn*, taking over the caller's reference to it."""
        self.uvn = uvn
        self._cursor = uvn_errseq_sample(uvn)
        self._maps = {}

    @classmethod
    def open(cls, vm: VM, target: Target, prot: int, create: bool = False,
             excl: bool = False) -> FileObject:
        """Attach the object of *target* (see :meth:`attach`; *create* and
        *excl* as for :func:`vnode_of`)."""
        vp = vnode_of(vm, target, create, excl)
        try:
            if prot & PROT_WRITE and _read_only(vp):
                raise _oserror(errno.EACCES, f"{target!r} is read-only")
            return cls.attach(vp, prot)
        finally:
            vm.vfs.vrele(vp)  # the object holds its own reference

    @classmethod
    def attach(cls, vp: Vnode, prot: int) -> FileObject:
        """Attach *vp*'s object with *prot* (PROT_WRITE puts it on the
        writeable list), revalidating it first if it was persisting.
        Raises OSError (the attach's errno, or ENODEV)."""
        uvn: UvmVnode = vp.v_uvm
        with uvn.vmobjlock:
            persisting = uvn.u_flags & UVM_VNODE_VALID and uvn.uo_refs == 0
        if uvn_attach(vp, prot) is None:  # it clears p_errno on entry
            raise _oserror(curproc().p_errno or errno.ENODEV, f"cannot attach {vp!r}")
        self = cls(uvn)
        if persisting:
            err = ubc_revalidate(uvn, drop_stale=True)
            if err:
                self.close()
                raise _oserror(err)
        return self

    def __enter__(self) -> FileObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def follow_size(self) -> None:
        """Take up a size the file was given from outside (a truncation makes
        the pages past the new end a bus error).  Raises OSError."""
        err = ubc_revalidate(self.uvn, drop_stale=False)
        if err:
            raise _oserror(err)

    def setsize(self, size: int) -> None:
        """Truncate or extend the file and the object to *size*."""
        ubc_setsize(self.uvn, size)

    def sync(self, start: int = 0, stop: int | None = None) -> None:
        """Write back the dirty pages of [start, stop) (the whole object if
        *stop* is None) and wait.  Raises OSError with the errno of this
        write-back, or else of one that failed since this hold was last
        told (whoever wrote); the pages that failed stay dirty."""
        uvn = self.uvn
        whole = PGO_ALLPAGES if stop is None else 0
        with uvn.vmobjlock:
            ok = uvn_flush(uvn, start, stop or 0, PGO_CLEANIT | PGO_SYNCIO | whole)
            err = 0 if ok else uvn.u_error or errno.EIO
        if not err and uvn.u_vnode.v_op.commits:
            err = _commit(uvn)
        seen, self._cursor = uvn_errseq_check(uvn, self._cursor)
        if err or seen:
            raise _oserror(err or seen)

    def map(self, space: Vmspace, size: int, offset: int, prot: int, maxprot: int, flags: int,
            va: int | None = None) -> int:
        """Map *size* bytes of the object from *offset* into *space* (an
        entry with a reference of its own), at *va* if given; return the
        address."""
        uvn = self.uvn
        uvn.pgops.pgo_reference(uvn)
        try:
            va = uvm_map(space, size, uvn, offset, prot, maxprot, flags, va=va)
        except BaseException:
            uvn.pgops.pgo_detach(uvn)
            raise
        self._maps[space, va] = size
        return va

    def unmap(self, space: Vmspace, va: int) -> None:
        """Remove the mapping at *va* that :meth:`map` made."""
        size = self._maps.pop((space, va))
        uvm_unmap(space, va, va + space.vm.round_page(size))

    def close(self, sync: bool = False) -> None:
        """Sync first if *sync*; then, whatever the sync's result, unmap
        what is still mapped and drop the reference (the object persists
        with its pages, or dies).  Raises the sync's OSError."""
        try:
            if sync:
                self.sync()
        finally:
            for space, va in list(self._maps):
                self.unmap(space, va)
            uvn = self.uvn
            uvn.pgops.pgo_detach(uvn)


def _commit(uvn: UvmVnode) -> int:
    """VOP_COMMIT the object's vnode: 0, or its errno, recorded as a
    write-back error (errseq).  Success records the file's new mtime, so
    that the next attach keeps our pages.  => caller holds no VM lock."""
    vp = uvn.u_vnode
    err = VOP_COMMIT(vp)
    if err:
        with uvn.vmobjlock:
            uvn_record_error(uvn, err)
    else:
        uvm_vnp_wrote(vp)
    return err
