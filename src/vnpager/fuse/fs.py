"""The FUSE file system: a passthrough of the tree SRC whose file data goes
through the pager (UBC), on pyfuse3 and trio.

Names, directories and attributes pass straight through to the host; file
data never does: open attaches the file's VM object, read and write copy
to and from its pages, release detaches (the object persists with its
pages for the next open), fsync flushes it.  Pager calls may sleep, so they
run in worker threads (:func:`_pager`); plain host calls are short and run
on the event loop.

Kernel caching (see the README): by default the kernel's page cache is
used, so that programs can mmap files on the mount, but only while a file
is open: ``keep_cache=False`` drops it at each open and we drop it at the
last release, so the pager's pages are the one lasting cache.  With
``direct_io`` the kernel caches nothing at all, but then it refuses shared
mmaps (ENODEV): allowing them needs FUSE_DIRECT_IO_ALLOW_MMAP, which the
kernel has (6.6+) and the libfuse we build against (3.14) cannot ask for.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pyfuse3
import trio

from vnpager.fuse import pager
from vnpager.fuse.inodes import InodeTable
from vnpager.uvm.uvm_bio import ubc_read, ubc_write
from vnpager.vnmap import FileObject

if TYPE_CHECKING:
    from vnpager.uvm.uvm import VM

T = TypeVar("T")
TIMEOUT = 1.0  # seconds the kernel may trust an entry or attributes


async def _pager(fn: Callable[..., T], *args: Any) -> T:
    """Run a pager call in a worker thread; its OSError becomes a FUSEError."""
    try:
        return await trio.to_thread.run_sync(fn, *args)
    except OSError as e:
        raise pyfuse3.FUSEError(e.errno or errno.EIO) from e


def _host(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A host call; its OSError becomes a FUSEError."""
    try:
        return fn(*args, **kwargs)
    except OSError as e:
        raise pyfuse3.FUSEError(e.errno or errno.EIO) from e


@dataclass
class OpenFile:
    ino: int
    file: FileObject


class VnpagerFS(pyfuse3.Operations):
    """pyfuse3 operations over the tree *src*, file data through *vm*."""

    enable_writeback_cache = False  # writes must reach the pager at once

    def __init__(self, vm: VM, src: str, direct_io: bool = False) -> None:
        super().__init__()
        self.vm = vm
        self.src = os.path.realpath(src)
        self.direct_io = direct_io
        self.inodes = InodeTable(self.src)
        self.files: dict[int, OpenFile] = {}
        self.opens: Counter[int] = Counter()  # open files per inode
        self.dirs: dict[int, list[str]] = {}  # directory handle -> names
        self._fh = itertools.count(1)

    # attributes
    def _attr(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = TIMEOUT
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid = st.st_mode, st.st_nlink, st.st_uid, st.st_gid
        a.st_rdev, a.st_size, a.st_blksize, a.st_blocks = st.st_rdev, st.st_size, st.st_blksize, st.st_blocks
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        if stat.S_ISREG(st.st_mode):
            # dirty pages past the host file's end are the file's too
            a.st_size = max(st.st_size, pager.cached_size(self.vm, (st.st_dev, st.st_ino)))
        return a

    def _entry(self, path: str) -> pyfuse3.EntryAttributes:
        """The entry of *path* for a reply that the kernel counts as a lookup."""
        st = _host(os.lstat, path)
        ino = self.inodes.number(path, st)
        self.inodes.lookup(ino)
        return self._attr(ino, st)

    def _own(self, path: str, ctx: pyfuse3.RequestContext) -> None:
        """Give a new file to the caller, as the kernel would (we may be root)."""
        if os.geteuid() == 0:
            _host(os.chown, path, ctx.uid, ctx.gid, follow_symlinks=False)

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        return self._entry(self.inodes.child(parent_inode, name))

    async def forget(self, inode_list: Any) -> None:
        for ino, n in inode_list:
            self.inodes.forget(ino, n)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode, _host(os.lstat, self.inodes.path(inode)))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self.inodes.path(inode)
        if fields.update_size:
            of = self.files.get(fh) if fh is not None else None
            await _pager(pager.truncate, self.vm, path, attr.st_size, of.file if of else None)
        if fields.update_mode and not stat.S_ISLNK(_host(os.lstat, path).st_mode):
            _host(os.chmod, path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            _host(os.chown, path, attr.st_uid if fields.update_uid else -1,
                  attr.st_gid if fields.update_gid else -1, follow_symlinks=False)
        if fields.update_atime or fields.update_mtime:
            st = _host(os.lstat, path)
            if stat.S_ISREG(st.st_mode):
                await _pager(pager.flush_cached, self.vm, (st.st_dev, st.st_ino))
            ns = (attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                  attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns)
            _host(os.utime, path, ns=ns, follow_symlinks=False)
        return self._attr(inode, _host(os.lstat, path))

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = _host(os.statvfs, self.src)
        d = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                  "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(d, f, getattr(sv, f))
        return d

    # names
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(_host(os.readlink, self.inodes.path(inode)))

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
                    ) -> pyfuse3.EntryAttributes:
        path = self.inodes.child(parent_inode, name)
        _host(os.mkdir, path, mode & ~ctx.umask)
        self._own(path, ctx)
        return self._entry(path)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self.inodes.child(parent_inode, name)
        _host(os.symlink, target, path)
        self._own(path, ctx)
        return self._entry(path)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self.inodes.child(new_parent_inode, new_name)
        _host(os.link, self.inodes.path(inode), path, follow_symlinks=False)
        return self._entry(path)

    async def _remove(self, path: str, remove: Callable[[str], None]) -> None:
        st = _host(os.lstat, path)
        key = (st.st_dev, st.st_ino)
        if stat.S_ISREG(st.st_mode):
            await _pager(pager.uncache, self.vm, key)
        _host(remove, path)
        self.inodes.unlinked(path, key)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(self.inodes.child(parent_inode, name), os.unlink)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(self.inodes.child(parent_inode, name), os.rmdir)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        old = self.inodes.child(parent_inode_old, name_old)
        new = self.inodes.child(parent_inode_new, name_new)
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_EXCHANGE: not supported
        st = _host(os.lstat, old)
        try:
            target: os.stat_result | None = os.lstat(new)
        except FileNotFoundError:
            target = None
        if target is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise pyfuse3.FUSEError(errno.EEXIST)
            if stat.S_ISREG(target.st_mode):
                await _pager(pager.uncache, self.vm, (target.st_dev, target.st_ino))
        _host(os.rename, old, new)
        if target is not None:
            self.inodes.unlinked(new, (target.st_dev, target.st_ino))
        self.inodes.renamed(old, new, (st.st_dev, st.st_ino), stat.S_ISDIR(st.st_mode))

    # directories
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fh = next(self._fh)
        self.dirs[fh] = [self.inodes.path(inode), *sorted(_host(os.listdir, self.inodes.path(inode)))]
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        parent, *names = self.dirs[fh]
        for i in range(start_id, len(names)):
            path = os.path.join(parent, names[i])
            try:
                st = os.lstat(path)
            except OSError:
                continue  # gone since opendir
            ino = self.inodes.number(path, st)
            if not pyfuse3.readdir_reply(token, os.fsencode(names[i]), self._attr(ino, st), i + 1):
                return
            self.inodes.lookup(ino)

    async def releasedir(self, fh: int) -> None:
        del self.dirs[fh]

    # files
    def _file_info(self, ino: int, f: FileObject) -> pyfuse3.FileInfo:
        fh = next(self._fh)
        self.files[fh] = OpenFile(ino, f)
        self.opens[ino] += 1
        return pyfuse3.FileInfo(fh=fh, direct_io=self.direct_io, keep_cache=False)

    async def _open(self, ino: int, path: str, flags: int) -> pyfuse3.FileInfo:
        write = flags & os.O_ACCMODE != os.O_RDONLY
        f = await _pager(pager.open_object, self.vm, path, write)
        if flags & os.O_TRUNC:
            try:
                await _pager(pager.truncate, self.vm, path, 0, f)
            except pyfuse3.FUSEError:
                await _pager(f.close)
                raise
        return self._file_info(ino, f)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return await self._open(inode, self.inodes.path(inode), flags)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self.inodes.child(parent_inode, name)
        # made by the host; opened again by hostfs (read-write where it can)
        os.close(_host(os.open, path, os.O_CREAT | os.O_WRONLY | (flags & os.O_EXCL),
                       mode & ~ctx.umask))
        self._own(path, ctx)
        entry = self._entry(path)
        return await self._open(entry.st_ino, path, flags & ~os.O_CREAT), entry

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await _pager(ubc_read, self.files[fh].file.uvn, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await _pager(ubc_write, self.files[fh].file.uvn, buf, off)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await _pager(pager.fsync, self.files[fh].file)

    async def release(self, fh: int) -> None:
        of = self.files.pop(fh)
        await _pager(of.file.close)
        self.opens[of.ino] -= 1
        if not self.opens[of.ino]:
            del self.opens[of.ino]
            if not self.direct_io:
                # the last close: the pager's pages are the cache from now on
                await trio.to_thread.run_sync(_drop_kernel_cache, of.ino)

    def open_objects(self) -> list[FileObject]:
        """Take over the objects of the files still open (unmount time)."""
        objects = [of.file for of in self.files.values()]
        self.files.clear()
        return objects


def _drop_kernel_cache(ino: int) -> None:
    with contextlib.suppress(OSError):  # ENOENT: the kernel forgot it, nothing is cached
        pyfuse3.invalidate_inode(ino, attr_only=False)
