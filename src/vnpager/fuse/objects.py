"""The FUSE file system of a bucket: ``vnpager mount s3://bucket/prefix MNT``.

The namespace is the object store's: a file is an object, a directory is a
common prefix of a listing (``dir/...``) or an empty ``dir/`` marker object
(what ``mkdir`` makes, the convention of s3fs and rclone).  File data goes
through the pager as on the host mount (:mod:`vnpager.fuse.pager`), over
objfs vnodes (:mod:`vnpager.vfs.objfs`): a read of pages not resident is a
ranged GET, written pages are staged, and a new version is **published**
at fsync, at the last close of a writer (its flush, so that close(2)
reports a failure), and at unmount.  A file made by ``create`` becomes an
object at its first publish.

Names are cached for *dir_cache_time* seconds (``--dir-cache-time``, 300
by default, as rclone's): a directory is listed (one ``ListObjectsV2`` with
a ``/`` delimiter, page by page) at its first lookup or readdir, changed by
our own mkdir, create, unlink, rename, rmdir, and listed again at the first
lookup or readdir after its listing is that old.  The new listing is merged
(:meth:`ObjectsFS._merge`): names that appeared are added, names gone are
dropped unless the mount holds them (a file open, one made through us and
not yet published, one whose publish failed, a directory above one of
them), a name changes type only if nothing holds it, and the size and
mtime of an object replaced by somebody else are taken up when nobody has
it open.  The kernel is told to trust a name or its absence no longer than
its directory's listing is fresh, so it asks again when we would list
again.  Attributes come from the listing and from the pager (the size of a
file open or persisting); an open looks the object up (one HEAD, objfs's
close-to-open), so a version put by somebody else is seen at the next open.  Mode, owner and times live in the
server's memory for the mount's life (they are not object metadata: a
``chmod`` would otherwise be a copy of the object); a remount shows every
file 0644 and every directory 0755, owned by the server, with the object's
Last-Modified as its times.

What the store cannot be is refused with a clear errno: hard links,
symbolic links and special files (EPERM, as Linux's filesystems without
them), a rename of a non-empty directory (EXDEV: ``mv`` then copies it
file by file), ``RENAME_EXCHANGE`` (EINVAL), extended attributes (ENOSYS:
the kernel then answers EOPNOTSUPP itself, without asking again).  A file
is renamed by a server-side copy and a delete (objfs's ``rename``: a file
open meanwhile keeps its vnode, which follows the name).

=> the tables (nodes, directory entries, open files) are touched only on
   the event loop; store and pager calls run in worker threads.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, cast

import pyfuse3
import trio

from vnpager.fuse import pager
from vnpager.fuse.fs import _drop_kernel_cache
from vnpager.uvm.uvm_param import PROT_READ, PROT_WRITE
from vnpager.uvm.uvm_vnode import uvm_vnp_sync
from vnpager.vnmap import FileObject

if TYPE_CHECKING:
    from vnpager.fuse.profile import RequestProfile
    from vnpager.vfs.objfs import ObjMount
    from vnpager.vm import VM

T = TypeVar("T")
log = logging.getLogger(__name__)

# Seconds a directory's listing is trusted (names made or deleted by others
# are seen after that): rclone's --dir-cache-time, and what the kernel kept
# names for before listings expired.
DIR_CACHE_TIME = 300.0
# Attributes it asks every time (an answer from memory): an open may take up
# a version somebody else put, of another size, and the kernel reads no
# further than the size it trusts.
ATTR_TIMEOUT = 0.0
S3_PROTOCOLS = ("s3", "s3a")
BLOCK = 4096  # st_blksize and statfs's block: the store has no blocks


async def _worker(fn: Callable[..., T], *args: Any) -> T:
    """*fn* in a worker thread; its OSError becomes a FUSEError."""
    try:
        return await trio.to_thread.run_sync(fn, *args)
    except OSError as e:
        raise pyfuse3.FUSEError(e.errno or errno.EIO) from e


def _fail(err: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(err)


@dataclass(eq=False)
class Node:
    """A name the mount knows: an object, or a directory (a prefix).
    ``parent`` is None once the name is gone (unlinked, removed) and for
    the root; ``children`` is None until the directory is listed, at
    ``listed_at`` (time.monotonic() when the listing began).  ``changing``
    is, while a listing of the directory is in flight, the names we changed
    since it began (it must not undo them).  ``seen`` is the version (size,
    ETag) of the object last taken from a listing; None: ours (made or
    written through us), the next listing's is taken as it is."""

    ino: int
    name: str
    parent: Node | None
    mode: int
    size: int = 0
    mtime_ns: int = 0
    atime_ns: int = 0
    ctime_ns: int = 0
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    children: dict[str, Node] | None = None
    marker: bool = False  # a directory with a "key/" marker object
    listed_at: float = 0.0
    changing: set[str] | None = None
    seen: tuple[int, str] | None = None
    lookups: int = 0  # the kernel's references (forget drops them)
    opens: int = 0
    writers: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class Listed(NamedTuple):
    """One name of a listing."""

    directory: bool
    size: int = 0
    mtime_ns: int = 0
    etag: str = ""


@dataclass
class OpenObject:
    node: Node
    file: FileObject
    write: bool


class ObjectsFS(pyfuse3.Operations):
    """pyfuse3 operations over the objects under *url* (``s3://bucket/prefix``),
    file data through *vm*; *storage_options* make its fsspec filesystem
    (none: the environment and AWS config, as fsspec's users have them);
    a directory's listing is trusted for *dir_cache_time* seconds (0: listed
    at every lookup and readdir).  Raises OSError if the bucket cannot be
    reached."""

    enable_writeback_cache = False  # writes must reach the pager at once

    def __init__(self, vm: VM, url: str, storage_options: dict[str, Any] | None = None,
                 profile: RequestProfile | None = None, dir_cache_time: float = DIR_CACHE_TIME) -> None:
        super().__init__()
        if not dir_cache_time >= 0:
            raise ValueError(f"dir_cache_time must be a number of seconds >= 0, not {dir_cache_time!r}")
        self.dir_cache_time = dir_cache_time
        protocol = url.split("://", 1)[0]
        if protocol not in S3_PROTOCOLS:
            raise OSError(errno.EPROTONOSUPPORT, f"{url}: only s3:// URLs can be mounted")
        self.vm = vm
        self.objects: ObjMount = vm.mount_objects(protocol, **(storage_options or {}))
        self.fs = self.objects.fs
        bucket, _, prefix = self.objects.path_of(url).partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._check_bucket()
        now = time.time_ns()
        root = Node(pyfuse3.ROOT_INODE, "", None, stat.S_IFDIR | 0o755, mtime_ns=now, atime_ns=now,
                    ctime_ns=now)
        self.nodes: dict[int, Node] = {root.ino: root}
        self.files: dict[int, OpenObject] = {}
        self.dirs: dict[int, tuple[Node, list[str]]] = {}
        # files whose writes are not all in the store: new ones until their
        # first publish, and those whose last close failed to publish
        self.unpublished: set[Node] = set()
        self._ino = itertools.count(pyfuse3.ROOT_INODE + 1)
        self._fh = itertools.count(1)
        self._listing = trio.Lock()  # one listing at a time: two lookups at once need it once
        self.profile = profile
        if profile is not None:
            profile.install(self)

    def _check_bucket(self) -> None:
        """One HeadBucket, so that a wrong endpoint, key or bucket is an error
        at mount time rather than at the first lookup."""
        try:
            self.fs.call_s3("head_bucket", Bucket=self.bucket)
        except Exception as e:  # s3fs's OSErrors, botocore's (no credentials, no endpoint)
            err = (errno.ENOENT if isinstance(e, FileNotFoundError) else errno.EACCES
                   if isinstance(e, PermissionError) else getattr(e, "errno", None) or errno.EIO)
            raise OSError(err, f"bucket {self.bucket}: {os.strerror(err)} ({type(e).__name__}: {e})") from e

    # keys ------------------------------------------------------------------------
    def _key(self, node: Node) -> str:
        parts = []
        n: Node | None = node
        while n is not None and n.ino != pyfuse3.ROOT_INODE:
            parts.append(n.name)
            n = n.parent
        if n is None:
            raise _fail(errno.ENOENT)  # its name is gone
        return "/".join(([self.prefix] if self.prefix else []) + parts[::-1])

    def _child_key(self, parent: Node, name: str) -> str:
        base = self._key(parent)
        return f"{base}/{name}" if base else name

    def _url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _s3(self, method: str, **kwargs: Any) -> Any:
        """One S3 request on the bucket (in a worker thread)."""
        return self.fs.call_s3(method, Bucket=self.bucket, **kwargs)

    # the listing -----------------------------------------------------------------
    def _list(self, prefix: str) -> tuple[dict[str, Listed], bool]:
        """The names under *prefix* (``""`` or ending in ``/``), and whether
        its marker exists.  A name that is both an object and a prefix is
        the directory (the object is hidden, logged)."""
        names: dict[str, Listed] = {}
        marker = False
        kwargs: dict[str, Any] = {"Prefix": prefix, "Delimiter": "/"}
        while True:
            resp = self._s3("list_objects_v2", **kwargs)
            for c in resp.get("Contents", []):
                name = c["Key"][len(prefix):]
                if not name:
                    marker = True
                elif name not in (".", ".."):
                    names[name] = Listed(False, int(c["Size"]), int(c["LastModified"].timestamp() * 1e9),
                                         str(c.get("ETag", "")))
            for p in resp.get("CommonPrefixes", []):
                name = p["Prefix"][len(prefix):-1]
                if name and name not in (".", ".."):
                    if name in names:
                        log.warning("%s: both an object and a prefix: shown as a directory", prefix + name)
                    names[name] = Listed(True)
            if not resp.get("IsTruncated"):
                return names, marker
            kwargs["ContinuationToken"] = resp["NextContinuationToken"]

    async def _children(self, node: Node, refresh: bool = True) -> dict[str, Node]:
        """The entries of directory *node*, listed at the first need and,
        with *refresh*, again once the listing is older than dir_cache_time.
        A listing begun after this call is fresh enough for it: lookups
        waiting for one listing make no other."""
        if not node.is_dir:
            raise _fail(errno.ENOTDIR)
        if node.children is None or (refresh and self._stale(node)):
            asked = time.monotonic()
            async with self._listing:
                if node.children is None or (node.listed_at < asked and self._stale(node)):
                    await self._relist(node)
        assert node.children is not None
        return node.children

    def _stale(self, node: Node) -> bool:
        """Whether *node*'s listing has expired (a directory whose name is
        gone is not listed again: it has no key)."""
        attached = node.parent is not None or node.ino == pyfuse3.ROOT_INODE
        return attached and time.monotonic() >= node.listed_at + self.dir_cache_time

    def _fresh_for(self, parent: Node | None) -> float:
        """Seconds the kernel may trust a name in *parent*, or its absence:
        no longer than the listing is fresh, so that it asks us when we
        would list again."""
        if parent is None or parent.children is None:
            return 0.0
        return max(0.0, parent.listed_at + self.dir_cache_time - time.monotonic())

    async def _relist(self, node: Node) -> None:
        """List directory *node* (=> caller holds _listing) and take the
        listing in: whole the first time, merged after."""
        key = self._key(node)
        began = time.monotonic()
        if node.children is not None:
            node.changing = set()
        try:
            names, node.marker = await _worker(self._list, f"{key}/" if key else "")
            if node.children is None:
                node.children = {name: self._new(node, name, entry) for name, entry in names.items()}
            else:
                self._merge(node, names, node.changing or set())
        finally:
            node.changing = None
        node.listed_at = began

    def _merge(self, parent: Node, names: dict[str, Listed], ours: set[str]) -> None:
        """Take listing *names* of *parent* in, but for the names in *ours*
        (changed by us while it was made).  Names gone from the store go
        unless we hold them; a name changes type only if nothing holds it;
        a file nobody holds takes up a new version's size and mtime."""
        assert parent.children is not None
        held = self._held()
        changed = False
        for name, child in list(parent.children.items()):
            entry = names.get(name)
            if name in ours or child.ino in held:
                continue
            if entry is not None and entry.directory == child.is_dir:
                if not child.is_dir:
                    self._take_up(child, entry)
                continue
            self._drop(child)
            changed = True
        for name, entry in names.items():
            if name not in parent.children and name not in ours:
                parent.children[name] = self._new(parent, name, entry)
                changed = True
        if changed:
            self._touch(parent)

    def _held(self) -> set[int]:
        """The inode numbers of what the mount holds: open files, files not
        yet (or not all) published, and the directories above them."""
        held: set[int] = set()
        for node in itertools.chain((of.node for of in self.files.values()), self.unpublished):
            n: Node | None = node
            while n is not None and n.ino not in held:
                held.add(n.ino)
                n = n.parent
        return held

    @staticmethod
    def _take_up(node: Node, entry: Listed) -> None:
        """A version of file *node* in a listing: taken up if it is not the
        one last seen (someone replaced the object); ours (written through
        us) is taken as it is, so that the mtime set by utime stays."""
        version = (entry.size, entry.etag)
        if node.seen is not None and node.seen != version:
            node.size = entry.size
            node.mtime_ns = node.ctime_ns = entry.mtime_ns
        node.seen = version

    def _drop(self, node: Node) -> None:
        """*node*'s name is gone from the store (and all under it): out of
        our tables, and of the kernel's where it may have it."""
        parent = node.parent
        for child in list((node.children or {}).values()):
            self._drop(child)
        if parent is not None and node.lookups > 0:
            pyfuse3.invalidate_entry_async(parent.ino, os.fsencode(node.name), deleted=node.ino,
                                           ignore_enoent=True)
        self._detach(node)

    def _new(self, parent: Node, name: str, entry: Listed, mode: int = -1) -> Node:
        if mode < 0:
            mode = 0o755 if entry.directory else 0o644
        mtime_ns = entry.mtime_ns or parent.mtime_ns
        node = Node(next(self._ino), name, parent,
                    (stat.S_IFDIR if entry.directory else stat.S_IFREG) | mode,
                    entry.size, mtime_ns, mtime_ns, mtime_ns)
        if not entry.directory and entry.etag:
            node.seen = (entry.size, entry.etag)
        self.nodes[node.ino] = node
        return node

    def _made(self, parent: Node, name: str, directory: bool, mode: int, ctx: pyfuse3.RequestContext
              ) -> Node:
        """A node for the name just made in *parent* by the caller of *ctx*."""
        assert parent.children is not None
        node = self._new(parent, name, Listed(directory), mode=mode & 0o7777 & ~ctx.umask)
        node.uid, node.gid = ctx.uid, ctx.gid
        node.mtime_ns = node.atime_ns = node.ctime_ns = time.time_ns()
        if directory:
            node.children, node.marker, node.listed_at = {}, True, time.monotonic()
        else:
            self.unpublished.add(node)
        parent.children[name] = node
        self._changed(parent, name)
        return node

    def _detach(self, node: Node) -> None:
        """*node*'s name is gone."""
        parent = node.parent
        if parent is not None and parent.children is not None and parent.children.get(node.name) is node:
            del parent.children[node.name]
            self._changed(parent, node.name)
        node.parent = None
        self.unpublished.discard(node)  # never published now (objfs: removed)
        self._maybe_free(node)

    def _maybe_free(self, node: Node) -> None:
        if node.parent is None and node.lookups <= 0 and not node.opens and node.ino != pyfuse3.ROOT_INODE:
            self.nodes.pop(node.ino, None)

    @staticmethod
    def _touch(node: Node) -> None:
        node.mtime_ns = node.ctime_ns = time.time_ns()

    @classmethod
    def _changed(cls, parent: Node, name: str) -> None:
        """We changed *name* in directory *parent*: a listing in flight,
        begun before, must not undo it."""
        if parent.changing is not None:
            parent.changing.add(name)
        cls._touch(parent)

    async def _keep(self, parent: Node) -> None:
        """A directory just emptied through us stays a directory: its marker
        is made if it was only a prefix (the root needs none)."""
        if parent.ino != pyfuse3.ROOT_INODE and parent.parent is not None and not parent.children \
                and not parent.marker:
            await _worker(lambda: self._s3("put_object", Key=self._key(parent) + "/", Body=b""))
            parent.marker = True

    # attributes ------------------------------------------------------------------
    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.entry_timeout, a.attr_timeout = self._fresh_for(node.parent), ATTR_TIMEOUT
        a.st_mode, a.st_nlink = node.mode, 2 if node.is_dir else 1
        a.st_uid, a.st_gid = node.uid, node.gid
        a.st_size = node.size
        a.st_blksize, a.st_blocks = BLOCK, -(-node.size // 512)
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = node.atime_ns, node.mtime_ns, node.ctime_ns
        return a

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """*node*'s entry for a reply the kernel counts as a lookup."""
        node.lookups += 1
        return self._attr(node)

    def _node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise _fail(errno.ENOENT) from None

    async def _lookup_name(self, parent_ino: int, name: bytes, refresh: bool = False
                           ) -> tuple[Node, str, Node | None]:
        """(parent, name, the node it names or None).  Without *refresh* the
        listing is not renewed: the kernel's lookup before this call did it."""
        parent = self._node(parent_ino)
        text = os.fsdecode(name)
        return parent, text, (await self._children(parent, refresh)).get(text)

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        """An entry, or the name's absence for the kernel to remember (st_ino 0)."""
        parent, _, node = await self._lookup_name(parent_inode, name, refresh=True)
        if node is None:
            absent = pyfuse3.EntryAttributes()
            absent.st_ino, absent.entry_timeout = 0, self._fresh_for(parent)
            return absent
        return self._entry(node)

    async def forget(self, inode_list: Any) -> None:
        for ino, n in inode_list:
            node = self.nodes.get(ino)
            if node is not None:
                node.lookups -= n
                self._maybe_free(node)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self._node(inode))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """A size through the pager (published at once when no file is open,
        as truncate(2) of a path is an open and a close); mode, owner and
        times in memory."""
        node = self._node(inode)
        now = time.time_ns()
        if fields.update_size:
            if node.is_dir:
                raise _fail(errno.EISDIR)
            of = self.files.get(fh) if fh is not None else None
            if of is not None:
                await _worker(of.file.setsize, attr.st_size)
            else:
                await _worker(_truncate_closed, self.vm, self._url(self._key(node)), attr.st_size)
            node.size, node.mtime_ns, node.seen = attr.st_size, now, None
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        node.ctime_ns = now
        return self._attr(node)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """A store without a size: a large one, all free."""
        d = pyfuse3.StatvfsData()
        d.f_bsize = d.f_frsize = BLOCK
        d.f_blocks = d.f_bfree = d.f_bavail = 1 << 40
        d.f_files = d.f_ffree = d.f_favail = 1 << 32
        d.f_namemax = 255
        return d

    # what a bucket cannot hold
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EPERM)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EPERM)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """A regular file (an empty object, published at once); nothing else."""
        if not stat.S_ISREG(mode):
            raise _fail(errno.EPERM)
        fi, entry = await self.create(parent_inode, name, mode, os.O_WRONLY | os.O_EXCL, ctx)
        await self.flush(fi.fh)
        await self.release(fi.fh)
        return entry

    # directories -----------------------------------------------------------------
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
                    ) -> pyfuse3.EntryAttributes:
        """A ``name/`` marker object."""
        parent, text, node = await self._lookup_name(parent_inode, name)
        if node is not None:
            raise _fail(errno.EEXIST)
        key = self._child_key(parent, text) + "/"
        await _worker(lambda: self._s3("put_object", Key=key, Body=b""))
        return self._entry(self._made(parent, text, True, mode, ctx))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent, _, node = await self._lookup_name(parent_inode, name)
        if node is None:
            raise _fail(errno.ENOENT)
        if await self._children(node):
            raise _fail(errno.ENOTEMPTY)
        if node.marker:
            key = self._key(node) + "/"
            await _worker(lambda: self._s3("delete_object", Key=key))
        self._detach(node)
        await self._keep(parent)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        await self._children(node, refresh=False)  # readdir from the start renews it
        fh = next(self._fh)
        self.dirs[fh] = (node, [])  # listed by the first readdir
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        node, names = self.dirs[fh]
        children = await self._children(node, refresh=start_id == 0)
        if start_id == 0:  # from the start (rewinddir too): the directory as it is now
            names = sorted(children)
            self.dirs[fh] = (node, names)
        for i in range(start_id, len(names)):
            child = children.get(names[i])
            if child is None:
                continue  # gone since the listing
            if not pyfuse3.readdir_reply(token, os.fsencode(names[i]), self._attr(child), i + 1):
                return
            child.lookups += 1  # replied: a lookup

    async def releasedir(self, fh: int) -> None:
        del self.dirs[fh]

    # names of files ----------------------------------------------------------------
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """Delete the object; a file still open keeps its pages (never published)."""
        parent, _, node = await self._lookup_name(parent_inode, name)
        if node is None:
            raise _fail(errno.ENOENT)
        if node.is_dir:
            raise _fail(errno.EISDIR)
        key = self._key(node)
        await _worker(self.objects.removed, self._url(key))  # first: no publish may come after
        await _worker(lambda: self._s3("delete_object", Key=key))
        self._detach(node)
        await self._keep(parent)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        """A file: server-side copy, then delete.  A directory: only an empty
        one (its marker moves); a non-empty one is EXDEV, which mv answers
        by copying it file by file."""
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise _fail(errno.EINVAL)
        old_parent, _, node = await self._lookup_name(parent_inode_old, name_old)
        new_parent, new_name, target = await self._lookup_name(parent_inode_new, name_new)
        if node is None:
            raise _fail(errno.ENOENT)
        if target is node:
            return
        if target is not None and flags & pyfuse3.RENAME_NOREPLACE:
            raise _fail(errno.EEXIST)
        new_key = self._child_key(new_parent, new_name)
        if node.is_dir:
            await self._rename_dir(node, target, new_key)
        else:
            await self._rename_file(node, target, new_key)
        if target is not None:
            self._detach(target)
        self._detach_for_move(node)
        node.parent, node.name = new_parent, new_name
        assert new_parent.children is not None
        new_parent.children[new_name] = node
        self._changed(new_parent, new_name)
        node.ctime_ns = time.time_ns()
        await self._keep(old_parent)

    def _detach_for_move(self, node: Node) -> None:
        parent = node.parent
        if parent is not None and parent.children is not None:
            parent.children.pop(node.name, None)
            self._changed(parent, node.name)

    async def _rename_dir(self, node: Node, target: Node | None, new_key: str) -> None:
        if target is not None:
            if not target.is_dir:
                raise _fail(errno.ENOTDIR)
            if await self._children(target):
                raise _fail(errno.ENOTEMPTY)
        if await self._children(node):
            raise _fail(errno.EXDEV)
        old_key = self._key(node)

        def move() -> None:
            self._s3("put_object", Key=new_key + "/", Body=b"")
            if node.marker:
                self._s3("delete_object", Key=old_key + "/")

        await _worker(move)
        node.marker = True

    async def _rename_file(self, node: Node, target: Node | None, new_key: str) -> None:
        """objfs's rename: an open file's vnode follows its name."""
        if target is not None and target.is_dir:
            raise _fail(errno.EISDIR)
        await _worker(self.objects.rename, self._url(self._key(node)), self._url(new_key))

    # files -------------------------------------------------------------------------
    def _file_info(self, node: Node, f: FileObject, write: bool) -> pyfuse3.FileInfo:
        fh = next(self._fh)
        self.files[fh] = OpenObject(node, f, write)
        node.opens += 1
        node.writers += write
        if write:
            node.seen = None  # what it publishes is ours
        return pyfuse3.FileInfo(fh=fh, direct_io=False, keep_cache=False)

    async def _open(self, node: Node, flags: int, create: bool) -> pyfuse3.FileInfo:
        write = create or flags & os.O_ACCMODE != os.O_RDONLY
        url = self._url(self._key(node))
        prot = PROT_READ | (PROT_WRITE if write else 0)
        excl = create and bool(flags & os.O_EXCL)  # an object made behind our back is EEXIST
        try:
            f = await _worker(FileObject.open, self.vm, url, prot, create, excl)
        except pyfuse3.FUSEError as e:
            if e.errno == errno.ENOENT:  # deleted behind our back: the name is gone
                self._detach(node)
            raise
        try:
            if flags & os.O_TRUNC and f.uvn.u_size:
                await _worker(f.setsize, 0)
        except BaseException:
            await _worker(f.close)
            raise
        node.size = f.uvn.u_size  # the version this open took up (close-to-open)
        return self._file_info(node, f, write)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.is_dir:
            raise _fail(errno.EISDIR)
        return await self._open(node, flags, create=False)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """A new file: an object at its first publish (at the latest, its close)."""
        parent, text, node = await self._lookup_name(parent_inode, name)
        if node is not None:
            if flags & os.O_EXCL:
                raise _fail(errno.EEXIST)
            return await self._open(node, flags, create=False), self._entry(node)
        node = self._made(parent, text, False, mode, ctx)
        try:
            fi = await self._open(node, flags, create=True)
        except BaseException:
            self._detach(node)
            raise
        return fi, self._entry(node)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        # always a worker: a page-in is a GET, too long for the event loop
        return cast(bytes, await _worker(pager.read, self.files[fh].file.uvn, size, off))

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        of = self.files[fh]
        done = pager.write_nowait(of.file, buf, off)  # resident or free pages: never a request
        if done < len(buf):
            done += await _worker(pager.write, of.file, memoryview(buf)[done:], off + done)
        of.node.size = max(of.node.size, off + done)
        self._touch(of.node)
        return done

    async def flush(self, fh: int) -> None:
        """close(2): the last writer's publishes, and its failure is close's."""
        of = self.files[fh]
        if of.write and of.node.writers == 1:
            await _worker(of.file.sync)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await _worker(pager.fsync, self.files[fh].file)

    async def release(self, fh: int) -> None:
        """Detach; the last writer publishes what a flush did not (writes
        through a mapping since): a failure is logged, nobody is told."""
        of = self.files.pop(fh)
        node = of.node
        last_writer = of.write and node.writers == 1
        node.opens -= 1
        node.writers -= of.write
        try:
            await _worker(of.file.close, last_writer)
        except pyfuse3.FUSEError as e:
            log.warning("%s: not published at its last close: %s", self._name_of(node), os.strerror(e.errno))
            if node.parent is not None:
                self.unpublished.add(node)  # kept by listings until unmount publishes it
        else:
            if last_writer:
                self.unpublished.discard(node)
        if not node.opens:
            await trio.to_thread.run_sync(_drop_kernel_cache, node.ino)
            self._maybe_free(node)

    def _name_of(self, node: Node) -> str:
        try:
            return self._url(self._key(node))
        except pyfuse3.FUSEError:
            return f"inode {node.ino} (unlinked)"

    # unmount -----------------------------------------------------------------------
    def shutdown(self) -> list[tuple[str, OSError]]:
        """Unmount time: detach what is still open, write every dirty page,
        publish every staged object, close the VM; the publishes that failed."""
        for of in self.files.values():
            of.file.close()
        self.files.clear()
        uvm_vnp_sync(self.vm)
        # objfs's vnodes are named by "bucket/key"
        failed = [(f"s3://{vp.v_key}", OSError(err, os.strerror(err)))
                  for vp, err in self.vm.vfs.commit_all()]
        self.vm.close()  # commits again: nothing left but the failures (logged)
        return failed


def _truncate_closed(vm: VM, url: str, size: int) -> None:
    """truncate(2) of a file nobody has open: an open, the new size, a
    close that publishes it.  Raises OSError."""
    f = FileObject.open(vm, url, PROT_READ | PROT_WRITE)
    try:
        f.setsize(size)
    finally:
        f.close(sync=True)
