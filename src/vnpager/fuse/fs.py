"""The FUSE file system: a passthrough of the tree SRC whose file data goes
through the pager (UBC), on pyfuse3 and trio.

Names, directories and attributes pass straight through to the host, each
request worked from the O_PATH descriptors of the inode table, never from a
host path (see :mod:`vnpager.fuse.inodes`); file data never does: open
attaches the file's VM object, read and write copy to and from its pages,
release detaches (the object persists with its pages for the next open),
fsync flushes it.  Pager calls may sleep, so they
run in worker threads (:meth:`VnpagerFS._pager`); plain host calls are short and run
on the event loop.  So do a read or a write that the resident pages (and
free memory) serve at once (``pager.read_nowait``, ``pager.write_nowait``,
which never sleep): a hop to a worker thread and back costs more than such
a request, and a worker's Python work holds the GIL the loop would need anyway.

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
import ctypes
import errno
import itertools
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pyfuse3
import trio

from vnpager.fuse import pager
from vnpager.fuse.inodes import InodeTable, proc_path
from vnpager.vnmap import FileObject

if TYPE_CHECKING:
    from vnpager.fuse.profile import RequestProfile
    from vnpager.uvm.uvm import VM

T = TypeVar("T")
log = logging.getLogger(__name__)
# Seconds the kernel may trust an entry or a name's absence: long, because the
# mount is SRC's only writer (see the README), so names change only through us,
# and the kernel drops the entries our calls remove or make by itself.
ENTRY_TIMEOUT = 300.0
# Seconds it may trust attributes: short, because a program serving the mount
# in-process (mount.mounted) may change a size through the VM (vm.pwrite), not
# through the kernel, and the kernel reads no further than the size it trusts.
ATTR_TIMEOUT = 1.0
# xattr namespaces whose every name a listing shows us (trusted.*, listed only
# to root, reads as absent to others anyway): an absent name needs no host call
LISTED_XATTRS = (b"user.", b"trusted.", b"security.", b"system.posix_acl_")


_libc = ctypes.CDLL(None, use_errno=True)


def _renameat2(old_fd: int, old: bytes, new_fd: int, new: bytes, flags: int) -> None:
    """renameat2(2), which the os module lacks.  Raises OSError."""
    if _libc.renameat2(old_fd, old, new_fd, new, flags):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


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

    def __init__(self, vm: VM, src: str, direct_io: bool = False,
                 profile: RequestProfile | None = None) -> None:
        super().__init__()
        self.vm = vm
        self.src = os.path.realpath(src)
        self.direct_io = direct_io
        self.inodes = InodeTable(self.src)
        self.files: dict[int, OpenFile] = {}
        self.opens: Counter[int] = Counter()  # open files per inode
        self.dirs: dict[int, tuple[int, list[str]]] = {}  # directory handle -> inode, names
        self._fh = itertools.count(1)
        self.profile = profile  # times every request (see vnpager.fuse.profile)
        if profile is not None:
            profile.install(self)

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run *fn* in a worker thread (timed, when profiling)."""
        if self.profile is not None:
            return await self.profile.hop(fn, *args)
        return await trio.to_thread.run_sync(fn, *args)

    async def _pager(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a pager call in a worker thread; its OSError becomes a FUSEError."""
        try:
            return await self._thread(fn, *args)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from e

    # attributes
    def _attr(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout, a.attr_timeout = ENTRY_TIMEOUT, ATTR_TIMEOUT
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid = st.st_mode, st.st_nlink, st.st_uid, st.st_gid
        a.st_rdev, a.st_size, a.st_blksize, a.st_blocks = st.st_rdev, st.st_size, st.st_blksize, st.st_blocks
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        if stat.S_ISREG(st.st_mode):
            # dirty pages past the host file's end are the file's too
            a.st_size = max(st.st_size, pager.cached_size(self.vm, (st.st_dev, st.st_ino)))
        return a

    def _stat(self, ino: int) -> os.stat_result:
        """The host attributes of *ino*, from its descriptor: with or without a name."""
        return _host(os.stat, self.inodes.fd(ino))

    def _has_object(self, st: os.stat_result) -> bool:
        """Whether the pager has an object of the regular file *st*: only then
        is there something to flush or uncache, worth a worker thread's hop.
        Read on the event loop, as :func:`pager.cached_size` allows: an open
        making the object meanwhile is racing the caller's call anyway."""
        return stat.S_ISREG(st.st_mode) and pager.cached_size(self.vm, (st.st_dev, st.st_ino)) >= 0

    def _lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        """The entry of *name* in *parent* for a reply that the kernel counts as a lookup."""
        ino, st = _host(self.inodes.lookup, parent, name)
        return self._attr(ino, st)

    def _made(self, parent: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
              ) -> pyfuse3.EntryAttributes:
        """The entry of the file *name* just made in *parent*, given to the caller first."""
        ino, st = _host(self.inodes.lookup, parent, name)
        self._own(ino, st, parent, mode, ctx)
        return self._attr(ino, self._stat(ino))

    def _own(self, ino: int, st: os.stat_result, parent: int, mode: int, ctx: pyfuse3.RequestContext) -> None:
        """Give the new file *ino* to the caller with the *mode* it asked for, as the
        kernel would (we may be root): the group of a set-gid parent (and its set-gid
        bit, for a directory), else the caller's; the mode less the caller's umask but
        not ours, which the host applied on top.  chown before chmod: chown clears
        the set-id bits."""
        where = self.inodes.proc(ino)
        setgid_parent = self._stat(parent).st_mode & stat.S_ISGID
        if os.geteuid() == 0:
            _host(os.chown, where, ctx.uid, -1 if setgid_parent else ctx.gid)
        if stat.S_ISLNK(st.st_mode):
            return  # a symlink's mode is always 0777
        want = mode & 0o7777 & ~ctx.umask
        if setgid_parent and stat.S_ISDIR(st.st_mode):
            want |= stat.S_ISGID
        if stat.S_IMODE(self._stat(ino).st_mode) != want:
            _host(os.chmod, where, want)

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        """An entry, or the name's absence for the kernel to remember (st_ino 0):
        a name appears only through us, and the kernel drops the absence then."""
        try:
            ino, st = self.inodes.lookup(parent_inode, name)
        except FileNotFoundError:
            absent = pyfuse3.EntryAttributes()
            absent.st_ino, absent.entry_timeout = 0, ENTRY_TIMEOUT
            return absent
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from e
        return self._attr(ino, st)

    async def forget(self, inode_list: Any) -> None:
        for ino, n in inode_list:
            self.inodes.forget(ino, n)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode, self._stat(inode))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        # the magic link reaches the file itself, even a symlink or a file with no name
        where = self.inodes.proc(inode)
        if fields.update_size:
            of = self.files.get(fh) if fh is not None else None
            await self._pager(pager.truncate, self.vm, where, attr.st_size, of.file if of else None)
        if fields.update_uid or fields.update_gid:
            _host(os.chown, where, attr.st_uid if fields.update_uid else -1,
                  attr.st_gid if fields.update_gid else -1)
        if fields.update_mode and not stat.S_ISLNK(self._stat(inode).st_mode):
            _host(os.chmod, where, stat.S_IMODE(attr.st_mode))
        if fields.update_atime or fields.update_mtime:
            st = self._stat(inode)
            if self._has_object(st):
                await self._pager(pager.flush_cached, self.vm, (st.st_dev, st.st_ino))
            ns = (attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                  attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns)
            _host(os.utime, where, ns=ns)
        return self._attr(inode, self._stat(inode))

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = _host(os.statvfs, self.src)
        d = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                  "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(d, f, getattr(sv, f))
        return d

    # extended attributes: the host's, of the file itself (through its magic link)
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.inodes.xattrs_changed(inode)
        _host(os.setxattr, self.inodes.proc(inode), name, value)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        """ENODATA from the inode table's list of names, for a name it proves
        absent; the host's answer otherwise."""
        if name.startswith(LISTED_XATTRS):
            names = self.inodes.xattr_names(inode)
            if names is not None and name not in names:
                raise pyfuse3.FUSEError(errno.ENODATA)
        return _host(os.getxattr, self.inodes.proc(inode), name)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in _host(os.listxattr, self.inodes.proc(inode))]

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.inodes.xattrs_changed(inode)
        _host(os.removexattr, self.inodes.proc(inode), name)

    # names: each relative to its directory's descriptor
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(_host(os.readlink, "", dir_fd=self.inodes.fd(inode)))

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
                    ) -> pyfuse3.EntryAttributes:
        _host(os.mkdir, name, mode & 0o7777, dir_fd=self.inodes.fd(parent_inode))
        return self._made(parent_inode, name, mode, ctx)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """Regular files, FIFOs, sockets and devices alike: made on the host
        (the pager pages only what is opened as a regular file)."""
        _host(os.mknod, name, mode, rdev, dir_fd=self.inodes.fd(parent_inode))
        return self._made(parent_inode, name, mode, ctx)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        _host(os.symlink, target, name, dir_fd=self.inodes.fd(parent_inode))
        return self._made(parent_inode, name, 0, ctx)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        _host(os.link, self.inodes.proc(inode), new_name, dst_dir_fd=self.inodes.fd(new_parent_inode))
        return self._lookup(new_parent_inode, new_name)

    def _lost_a_name(self, st: os.stat_result) -> None:
        """The file *st* has just lost a name (unlink, rename over).  If the
        pager has an object of it, stop the object persisting, so that it dies
        now or at its last close: in a worker thread, after the reply, for no
        caller needs to wait for it (its death may write dirty pages, to a file
        whose other names and open files see the same pages meanwhile; the
        object's vnode holds the file open, so its key names no other file).
        Unmount waits for it: trio ends no run before its system tasks."""
        if self._has_object(st):
            trio.lowlevel.spawn_system_task(self._uncache, (st.st_dev, st.st_ino))

    async def _uncache(self, key: tuple[int, int]) -> None:
        try:
            await self._thread(pager.uncache, self.vm, key)
        except Exception:  # a system task that raises ends the loop: the mount with it
            log.exception("uncache of the object of %s failed", key)

    async def _remove(self, parent: int, name: bytes, remove: Callable[..., None]) -> None:
        dir_fd = self.inodes.fd(parent)
        st = _host(os.stat, name, dir_fd=dir_fd, follow_symlinks=False)
        _host(remove, name, dir_fd=dir_fd)
        self._lost_a_name(st)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, os.unlink)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, os.rmdir)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        """renameat2 with the caller's flags: RENAME_NOREPLACE and RENAME_EXCHANGE
        are the host's, atomic.  A regular file renamed over loses a name."""
        old_fd, new_fd = self.inodes.fd(parent_inode_old), self.inodes.fd(parent_inode_new)
        target = None
        if not flags & (pyfuse3.RENAME_NOREPLACE | pyfuse3.RENAME_EXCHANGE):
            with contextlib.suppress(OSError):  # no target (or a rename that is about to fail)
                target = os.stat(name_new, dir_fd=new_fd, follow_symlinks=False)
        _host(_renameat2, old_fd, name_old, new_fd, name_new, flags)
        if target is not None:
            self._lost_a_name(target)

    # directories
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fh = next(self._fh)
        self.dirs[fh] = (inode, [])  # listed by the first readdir
        return fh

    def _names(self, inode: int) -> list[str]:
        fd = _host(os.open, ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.inodes.fd(inode))
        try:
            return sorted(_host(os.listdir, fd))
        finally:
            os.close(fd)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        parent, names = self.dirs[fh]
        if start_id == 0:  # from the start (rewinddir too): the directory as it is now
            names = self._names(parent)
            self.dirs[fh] = (parent, names)
        for i in range(start_id, len(names)):
            name = os.fsencode(names[i])
            try:
                ino, st = self.inodes.lookup(parent, name)
            except OSError:
                continue  # gone since the listing
            if not pyfuse3.readdir_reply(token, name, self._attr(ino, st), i + 1):
                self.inodes.forget(ino, 1)  # not replied: not a lookup
                return

    async def releasedir(self, fh: int) -> None:
        del self.dirs[fh]

    # files
    def _file_info(self, ino: int, f: FileObject) -> pyfuse3.FileInfo:
        fh = next(self._fh)
        self.files[fh] = OpenFile(ino, f)
        self.opens[ino] += 1
        return pyfuse3.FileInfo(fh=fh, direct_io=self.direct_io, keep_cache=False)

    async def _open(self, ino: int, flags: int) -> pyfuse3.FileInfo:
        write = flags & os.O_ACCMODE != os.O_RDONLY
        # hostfs opens the file itself through its magic link: named or not
        f = await self._pager(pager.open_object, self.vm, self.inodes.proc(ino), write)
        if flags & os.O_TRUNC:
            try:
                await self._pager(pager.truncate, self.vm, self.inodes.proc(ino), 0, f)
            except pyfuse3.FUSEError:
                await self._pager(f.close)
                raise
        return self._file_info(ino, f)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return await self._open(inode, flags)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fd = _host(os.open, name, os.O_CREAT | os.O_RDONLY | os.O_CLOEXEC | (flags & os.O_EXCL),
                   mode & 0o7777, dir_fd=self.inodes.fd(parent_inode))
        try:  # the inode of what we made, not of whatever the name names by now
            ino, st = _host(self.inodes.adopt, os.open(proc_path(fd), os.O_PATH | os.O_CLOEXEC))
        finally:
            os.close(fd)
        try:
            self._own(ino, st, parent_inode, mode, ctx)
            entry = self._attr(ino, self._stat(ino))
            return await self._open(ino, flags & ~os.O_CREAT), entry
        except BaseException:
            self.inodes.forget(ino, 1)  # no entry replied
            raise

    async def read(self, fh: int, off: int, size: int) -> bytes:
        uvn = self.files[fh].file.uvn
        data: bytes | bytearray | None = _host(pager.read_nowait, uvn, size, off)  # no worker thread
        if data is None:
            data = await self._pager(pager.read, uvn, size, off)
        return cast(bytes, data)  # pyfuse3 replies with any buffer: no copy to bytes

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        f = self.files[fh].file
        done = _host(pager.write_nowait, f, buf, off)  # resident or free pages: no worker thread
        if done < len(buf):
            rest = memoryview(buf)[done:]
            return done + await self._pager(pager.write, f, rest, off + done)
        return done

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._pager(pager.fsync, self.files[fh].file)

    async def release(self, fh: int) -> None:
        of = self.files.pop(fh)
        await self._pager(of.file.close)
        self.opens[of.ino] -= 1
        if not self.opens[of.ino]:
            del self.opens[of.ino]
            if not self.direct_io:
                # the last close: the pager's pages are the cache from now on
                await self._thread(_drop_kernel_cache, of.ino)

    def open_objects(self) -> list[FileObject]:
        """Take over the objects of the files still open (unmount time)."""
        objects = [of.file for of in self.files.values()]
        self.files.clear()
        return objects


def _drop_kernel_cache(ino: int) -> None:
    with contextlib.suppress(OSError):  # ENOENT: the kernel forgot it, nothing is cached
        pyfuse3.invalidate_inode(ino, attr_only=False)
