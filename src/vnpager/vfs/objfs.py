"""objfs: objects of an object store (S3, HTTP, any fsspec filesystem) as vnodes.

An objfs mount (:class:`ObjMount`) serves the objects of one fsspec
filesystem; a vnode is one object, named by its URL (``s3://bucket/key``,
``https://host/path``), and the vnode pager pages it as it pages a file:

* **reads**: ``VOP_READ`` of a cluster or read-ahead window (one uvn_io) is
  one ranged GET of the bytes the pager asked for, whatever their number of
  pages, pinned to the version the vnode shows (:mod:`vnpager.vfs.objstore`),
  its body read into the uio's buffers, the page frames, where the store
  GETs by http.client (:mod:`vnpager.vfs.objhttp`); staged runs are read
  over them.
  objfs reads without the vnode lock (``unlocked_read``: uvn_io then calls
  VOP_STRATEGY), so the reads of several threads, on one object or many,
  are requests in flight at once.
* **attributes**: ``VOP_GETATTR`` is the size, and an mtime that is the
  object's Last-Modified in whole milliseconds plus, in its last six
  digits, a digest of its ETag and VersionId (``va_filerev`` in BSD's
  vattr): two versions made in one millisecond differ, which the pager's
  close-to-open check (size and mtime, uvm_vnp_revalidate) needs.  They
  are the store's as of the last lookup of the URL (one HEAD): a map or
  open of a URL looks it up, and mmap's size checks cost no request.
* **writes**: objects are immutable, so a page the pager writes back
  (``VOP_WRITE``, or VOP_STRATEGY from its aio daemon) goes into the
  vnode's **staging**, a sparse file on local disk (:class:`Staging`), and
  ``VOP_COMMIT`` (the front ends' sync, flush and close of a writer,
  vm.close) **publishes** a new version: the old version's clean ranges
  copied server-side, the staged ranges uploaded (S3: multipart upload with
  UploadPartCopy; other filesystems: the whole object).  A page written
  back is clean in the VM and may be freed, so the memory budget holds with
  any amount of unpublished data; reads see the staging over the old
  version.  A failed publish keeps the staging for the next commit and is
  reported through the object's errseq at that sync, to every map and open
  file once, as a failed write-back is (``vnpager.vnmap``).
* **consistency**: close-to-open.  A lookup of a URL whose vnode nobody in
  the VM holds takes up the store's current version, so an attach that
  finds the old version's pages persisting drops them (their mtime
  differs).  While the vnode is held, it shows the version it was opened
  at.  Two writers of an object: the last publish wins, whole; a publish
  whose old version is gone (replaced by someone else, on a bucket without
  versioning) fails with ESTALE rather than mix two versions, and keeps its
  staging until nothing holds the vnode: the next lookup then drops it
  (logged) and takes up the current version, as NFS's reopen after ESTALE.

=> ``ObjNode.lock`` guards a node's fields; ``ObjNode.wlock`` orders the
   staging's writers (VOP_WRITE, setsize) against a publish, which holds it
   throughout, so a publish sees one staging from start to end.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from sortedcontainers import SortedDict

from vnpager.vfs.mount import Mount, Vfs
from vnpager.vfs.objstore import FsspecStore, ObjInfo, PartPolicy, protocols, store_for
from vnpager.vfs.vnode import VREG, Uio, Vattr, Vnode, VnodeOps

log = logging.getLogger("vnpager.objfs")

IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers a preadv takes at once
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(target: object) -> bool:
    """Whether *target* names an object (``scheme://...``), not a host path."""
    return isinstance(target, str) and _URL.match(target) is not None


class Staging:
    """The bytes written since the last publish: a sparse temporary file
    (same offsets as the object) and its written runs, merged.

    => the owner's ``ObjNode.lock`` guards ``runs``; the file is read and
       written with positional I/O, outside it.
    """

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self._file: Any = None
        self.runs: SortedDict = SortedDict()  # start -> end, disjoint, not touching
        _stagings.add(self)

    def fileno(self) -> int:
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self.directory, prefix="vnpager-objfs-")  # noqa: SIM115
        return int(self._file.fileno())

    def write(self, offset: int, bufs: list[memoryview]) -> int:
        """Write *bufs* at *offset*; the bytes written.  Raises OSError.
        => caller adds the run (:meth:`add`) under the node's lock."""
        done = 0
        while bufs:
            n = os.pwritev(self.fileno(), bufs, offset + done)
            done += n
            bufs = _after(bufs, n)
        return done

    def add(self, a: int, b: int) -> None:
        """Record [a, b) as written, merging it with the runs it meets."""
        runs = self.runs
        i = runs.bisect_right(a) - 1
        if i >= 0 and runs.peekitem(i)[1] >= a:
            a = runs.peekitem(i)[0]
        for start in list(runs.irange(a, b)):
            b = max(b, runs.pop(start))
        runs[a] = b

    def cut(self, size: int) -> None:
        """Forget what lies at or past *size*."""
        for start in list(self.runs.irange(size, None)):
            del self.runs[start]
        i = self.runs.bisect_left(size) - 1
        if i >= 0:
            start, end = self.runs.peekitem(i)
            self.runs[start] = min(end, size)

    def within(self, a: int, b: int) -> list[tuple[int, int]]:
        """The written runs' parts inside [a, b), in order."""
        out = []
        i = max(0, self.runs.bisect_right(a) - 1)
        for start, end in self.runs.items()[i:]:
            if start >= b:
                break
            if end > a:
                out.append((max(start, a), min(end, b)))
        return out

    def pread_into(self, bufs: list[memoryview], offset: int) -> None:
        """Fill *bufs* with the staged bytes at *offset* (written ones only)."""
        _pread_full(self.fileno(), bufs, offset)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def copy_file(self) -> None:
        """Write on a copy of the file from now on (a forked child: the
        parent's file is the parent's).  => no write or read is under way."""
        if self._file is None:
            return
        old, self._file = self._file, None
        for a, b in self.runs.items():
            buf = bytearray(b - a)
            _pread_full(old.fileno(), [memoryview(buf)], a)
            self.write(a, [memoryview(buf)])
        old.close()


def _pread_full(fd: int, bufs: list[memoryview], offset: int) -> None:
    while bufs:
        n = os.preadv(fd, bufs[:IOV_MAX], offset)
        if n == 0:
            raise OSError(errno.EIO, "objfs staging file shorter than its runs")
        offset += n
        bufs = _after(bufs, n)


# every staging of this process, so that a forked child copies them (the fork
# gate has stopped every VM call: nothing writes them meanwhile).  The parent
# publishes before it forks (uvm.VM._fork_quiesce), so only what could not be
# published is copied.
_stagings: weakref.WeakSet[Staging] = weakref.WeakSet()


def _fork_child() -> None:
    for staging in list(_stagings):
        staging.copy_file()


os.register_at_fork(after_in_child=_fork_child)


def _after(bufs: list[memoryview], n: int) -> list[memoryview]:
    """*bufs* without their first *n* bytes."""
    out = list(bufs)
    while out and n >= len(out[0]):
        n -= len(out.pop(0))
    if out and n:
        out[0] = out[0][n:]
    return out


@dataclass(eq=False)
class ObjNode:
    """The private data of an objfs vnode.

    * ``base``: the version the vnode shows (None: a new object, never
      published); its bytes below ``clean_end`` are the object's, except
      where the staging has some (a truncation lowers ``clean_end``: bytes
      past it read as zeros until written).
    * ``size``: the object's size as the pager sees it.
    * ``dirty``: something to publish (a write, a size change, a new object).
    """

    path: str
    base: ObjInfo | None
    staging: Staging
    size: int = 0
    clean_end: int = 0
    dirty: bool = False
    stale: bool = False  # the last publish found the base replaced (ESTALE)
    removed: bool = False  # its object was deleted through us (ObjMount.removed): never published
    created_ns: int = field(default_factory=time.time_ns)
    lock: threading.Lock = field(default_factory=threading.Lock)
    wlock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.base is None:
            self.dirty = True
        else:
            self.size = self.clean_end = self.base.size

    def take_up(self, info: ObjInfo) -> None:
        """Show version *info* from now on (a lookup, or our own publish).
        => caller holds ``lock``; nothing is staged."""
        self.base, self.size, self.clean_end = info, info.size, info.size
        self.dirty = self.stale = False


def _mtime(node: ObjNode) -> int:
    """The vnode's mtime (see the module docstring).  => caller holds node.lock."""
    if node.base is None:
        return node.created_ns
    return node.base.mtime_ns // 1_000_000 * 1_000_000 + node.base.filerev % 1_000_000


class ObjFS(VnodeOps):
    """The vnode operations of the objects of one store."""

    name = "objfs"
    unlocked_read = True
    commits = True
    # a window is one request: a few MiB make a request's latency small
    # beside its transfer (the pager takes at most an eighth of its memory)
    ra_winsize_max = 4 << 20

    def __init__(self, store: FsspecStore) -> None:
        self.store = store
        self.readonly = store.readonly

    def getattr(self, vp: Vnode, vap: Vattr) -> int:
        node: ObjNode = vp.v_data
        with node.lock:
            vap.va_type, vap.va_size, vap.va_mtime_ns = VREG, node.size, _mtime(node)
            vap.va_mode = 0o444 if self.readonly else 0o644
        return 0

    def read(self, vp: Vnode, uio: Uio, ioflag: int) -> int:
        """One ranged GET of what the staging lacks of [offset, offset + resid),
        into uio's buffers (the page frames) themselves.

        A read that meets our own publish replacing the version it pinned
        (ESTALE) is read again from the new one."""
        node: ObjNode = vp.v_data
        for _ in range(2):
            with node.lock:
                base, staging = node.base, node.staging
                start, end = uio.offset, min(uio.offset + uio.resid, node.size)
                clean_end, runs = min(end, node.clean_end), staging.within(uio.offset, end)
            if end <= start:
                return 0  # at the end: the pager sees resid left
            bufs = uio.buffers() if end - start == uio.resid else _window(uio.buffers(), 0, end - start)
            try:
                self._fetch_into(node.path, base, staging, start, bufs, clean_end, runs)
            except OSError as e:
                if e.errno == errno.ESTALE and node.base is not base:
                    continue
                return e.errno or errno.EIO
            uio.advance(end - start)
            return 0
        return errno.ESTALE

    def _fetch_into(self, path: str, base: ObjInfo | None, staging: Staging, start: int,
                    bufs: list[memoryview], clean_end: int, runs: list[tuple[int, int]]) -> None:
        """Fill *bufs* with the bytes from *start* on: version *base*'s below
        *clean_end* where no staged run covers them (one GET, from the first
        such byte to the last, straight into *bufs*), zeros past it, the
        *staging*'s *runs* over all.  Raises OSError."""
        end = start + sum(len(b) for b in bufs)
        lo, hi = _uncovered(start, clean_end, runs)
        if lo < hi:
            self.store.get_into(path, lo, bufs if (lo, hi) == (start, end)
                                else _window(bufs, lo - start, hi - start), base)
        if clean_end < end:  # past the old version's bytes (a truncation): zeros
            for z in _window(bufs, max(clean_end, start) - start, end - start):
                z[:] = bytes(len(z))
        for a, b in runs:  # the bytes before lo and after hi are all in some run
            staging.pread_into(_window(bufs, a - start, b - start), a)

    def write(self, vp: Vnode, uio: Uio, ioflag: int) -> int:
        """Stage the pages; they reach the store at the next commit."""
        if self.readonly:
            return errno.EROFS
        node: ObjNode = vp.v_data
        off = uio.offset
        with node.wlock:
            try:
                n = node.staging.write(off, uio.buffers())
            except OSError as e:
                return e.errno or errno.EIO
            with node.lock:
                node.staging.add(off, off + n)
                node.size, node.dirty = max(node.size, off + n), True
        uio.advance(n)
        return 0

    def setsize(self, vp: Vnode, size: int) -> int:
        if self.readonly:
            return errno.EROFS
        node: ObjNode = vp.v_data
        with node.wlock, node.lock:
            if size < node.size:
                node.staging.cut(size)
                node.clean_end = min(node.clean_end, size)
            node.size, node.dirty = size, True
        return 0

    def commit(self, vp: Vnode) -> int:
        """Publish what was staged as a new version (see the module docstring)."""
        node: ObjNode = vp.v_data
        try:
            self.publish(node)
        except OSError as e:
            return e.errno or errno.EIO
        return 0

    def fsync(self, vp: Vnode) -> int:
        return self.commit(vp)

    def publish(self, node: ObjNode) -> None:
        """Publish *node* if it is dirty.  Raises OSError; the staging is
        then kept for the next try."""
        with node.wlock:
            with node.lock:
                if not node.dirty or node.removed:
                    return
                base, size, clean_end, staging = node.base, node.size, node.clean_end, node.staging
                dirty = list(staging.runs.items())

            def view(a: int, b: int) -> bytes:
                with node.lock:
                    runs = staging.within(a, b)
                buf = bytearray(b - a)
                self._fetch_into(node.path, base, staging, a, [memoryview(buf)], min(b, clean_end), runs)
                return bytes(buf)

            try:
                info = self.store.publish(node.path, base, size, clean_end, dirty, view)
            except OSError as e:
                node.stale = e.errno == errno.ESTALE
                raise
            with node.lock:
                # not closed here: a read may still be copying from it (it
                # closes when the last reference goes)
                node.staging = Staging(staging.directory)
                node.take_up(info)

    def reclaim(self, vp: Vnode) -> None:
        """Publish what is left (a vnode recycled with staged data), then let
        the staging go; a failure is logged: nobody is left to tell."""
        node: ObjNode | None = vp.v_data
        if node is None:
            return
        if node.base is None and node.size == 0:
            return  # a new object never written (or a vnode that lost a race to be made)
        try:
            self.publish(node)
        except OSError as e:
            log.warning("objfs: %s: unpublished writes lost at reclaim: %s", node.path,
                        os.strerror(e.errno or errno.EIO))
        node.staging.close()


def _uncovered(start: int, end: int, runs: list[tuple[int, int]]) -> tuple[int, int]:
    """The smallest range holding every byte of [start, end) outside *runs*
    (sorted, disjoint); empty (lo >= hi) if they cover it all."""
    lo, hi = start, end
    for a, b in runs:
        if a <= lo < b:
            lo = b
    for a, b in reversed(runs):
        if a < hi <= b:
            hi = a
    return lo, hi


def _window(bufs: list[memoryview], a: int, b: int) -> list[memoryview]:
    """The views of bytes [a, b) of *bufs* laid end to end (none if a >= b).
    A window's hundreds of frames are mostly whole: those are not sliced."""
    out: list[memoryview] = []
    pos = 0
    for buf in bufs if a < b else ():
        if pos >= b:
            break
        end = pos + len(buf)
        if end > a:
            out.append(buf if a <= pos and end <= b else buf[max(a - pos, 0):min(b, end) - pos])
        pos = end
    return out


class ObjMount:
    """An objfs mount: the objects of one fsspec filesystem in one Vfs.

    ``statistics()`` counts the requests made (objstore.ObjStats).
    """

    def __init__(self, vfs: Vfs, fs: Any, policy: PartPolicy | None = None,
                 staging_dir: str | None = None) -> None:
        self.store = store_for(fs, policy)
        self.ops = ObjFS(self.store)
        self.staging_dir = staging_dir
        self.mount: Mount = vfs.mount(self.ops, f"objfs:{protocols(fs)[0]}")

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (made anew in a forked child)."""
        return self.store.fs

    def statistics(self) -> dict[str, int]:
        return self.store.stats.snapshot()

    def path_of(self, url: str) -> str:
        return str(self.fs._strip_protocol(url))

    def vget(self, url: str, create: bool = False, excl: bool = False) -> Vnode:
        """The vnode of *url*, referenced, looked up in the store (one HEAD):
        close-to-open, a vnode nobody holds takes up the current version.
        *create*: a missing object is made (published at the first commit);
        with *excl*, an object that exists is EEXIST.  Raises OSError."""
        vfs, mp, path = self.mount.mnt_vfs, self.mount, self.path_of(url)
        try:
            info: ObjInfo | None = self.store.stat(path)
        except FileNotFoundError:
            info = None
        if info is not None and excl:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), url)
        vp = vfs.lookup(mp, path)
        if vp is not None:
            node: ObjNode = vp.v_data
            with node.lock:
                if info is None and node.base is not None and not create:
                    vfs.vrele(vp)
                    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), url)
                # held by nobody but us, nothing staged: close-to-open; staged
                # writes that can never be published (their base is gone) go
                if info is not None and vp.v_usecount == 1 and (not node.dirty or node.stale):
                    if node.dirty:
                        log.warning("objfs: %s: unpublished writes dropped: the object was "
                                    "replaced since they were made", url)
                    node.staging = Staging(self.staging_dir)
                    node.take_up(info)
            return vp
        if info is None and not create:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), url)
        if info is None and self.ops.readonly:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), url)
        return vfs.getnewvnode(mp, VREG, path, ObjNode(path, info, Staging(self.staging_dir)))

    def removed(self, url: str) -> None:
        """The object *url* was deleted by its caller (a FUSE mount's unlink or
        rename): its vnode, if any, answers to the name no more (the name's
        next lookup makes a new one) and never publishes; those holding it
        keep its pages and staging, as the open files of an unlinked file do."""
        vfs = self.mount.mnt_vfs
        vp = vfs.lookup(self.mount, self.path_of(url))
        if vp is None:
            return
        node: ObjNode = vp.v_data
        with node.lock:
            node.removed = True
        vfs.vunhash(vp)
        vfs.vrele(vp)

    def rename(self, old_url: str, new_url: str) -> None:
        """Rename the object *old_url* to *new_url* (a FUSE mount's rename): a
        copy on the server, then a delete; a vnode of *new_url* is removed
        first.  The vnode of *old_url*, if any, is the new name's from then
        on, showing the copy (the same bytes), so that those holding it go on
        reading and writing and what it has staged is published there; a
        new object not yet published has nothing to copy.  The vnode's
        ``wlock`` is held throughout, so that no publish to the old name
        comes between the copy and the delete.  Raises OSError."""
        vfs, mp = self.mount.mnt_vfs, self.mount
        old, new = self.path_of(old_url), self.path_of(new_url)
        self.removed(new_url)
        vp = vfs.lookup(mp, old)
        node: ObjNode | None = vp.v_data if vp is not None else None
        try:
            with node.wlock if node is not None else contextlib.nullcontext():
                copy = None
                if node is None or node.base is not None:
                    self.fs.invalidate_cache()  # s3fs's copy looks at its listings first
                    self.fs.cp_file(old, new)
                    copy = self.store.stat(new)
                if vp is not None and node is not None:
                    with node.lock:
                        node.path = new
                        node.base = copy if node.base is not None else None
                    self._rehash(vp, new)
                if copy is not None:
                    self.fs.rm_file(old)
        finally:
            if vp is not None:
                vfs.vrele(vp)

    def _rehash(self, vp: Vnode, key: str) -> None:
        """Find *vp* by *key* from now on (unless another vnode has it)."""
        vfs, mp = self.mount.mnt_vfs, self.mount
        with vfs.lock:
            if mp.mnt_vnodes.get(vp.v_key) is vp:
                del mp.mnt_vnodes[vp.v_key]
            mp.mnt_vnodes.setdefault(key, vp)
            vp.v_key = key


class ObjMounts:
    """The objfs mounts of one Vfs: by filesystem, and the one each protocol
    uses for URLs (the last mounted, else one made with fsspec's defaults:
    credentials and endpoints from the environment and AWS config)."""

    def __init__(self, vfs: Vfs) -> None:
        self._vfs = weakref.ref(vfs)
        self._lock = threading.Lock()
        self.by_fs: dict[int, ObjMount] = {}
        self.by_protocol: dict[str, ObjMount] = {}

    def mount(self, fs: Any, policy: PartPolicy | None = None, staging_dir: str | None = None) -> ObjMount:
        """The mount of *fs* (made once per filesystem), now the one its protocols' URLs use."""
        vfs = self._vfs()
        assert vfs is not None
        with self._lock:
            om = self.by_fs.get(id(fs))
            if om is None or policy is not None or staging_dir is not None:
                om = self.by_fs[id(fs)] = ObjMount(vfs, fs, policy, staging_dir)
            for p in protocols(fs):
                self.by_protocol[p] = om
            return om

    def for_url(self, url: str) -> ObjMount:
        protocol = url.split("://", 1)[0]
        with self._lock:
            om = self.by_protocol.get(protocol)
        if om is not None:
            return om
        import fsspec

        return self.mount(fsspec.filesystem(protocol))


_registries: weakref.WeakKeyDictionary[Vfs, ObjMounts] = weakref.WeakKeyDictionary()
_registries_lock = threading.Lock()


def objfs_mounts(vfs: Vfs) -> ObjMounts:
    """The objfs mounts of *vfs* (made on first use)."""
    with _registries_lock:
        reg = _registries.get(vfs)
        if reg is None:
            reg = _registries[vfs] = ObjMounts(vfs)
        return reg


def objfs_vget_url(vfs: Vfs, url: str, create: bool = False, excl: bool = False) -> Vnode:
    """The vnode of *url* on its protocol's mount, referenced (ObjMount.vget)."""
    return objfs_mounts(vfs).for_url(url).vget(url, create, excl)
