"""The object stores under objfs: an fsspec filesystem as versions of objects.

objfs (:mod:`vnpager.vfs.objfs`) asks three things of a store, each a
request or a few, and counts every one in :class:`ObjStats`:

* ``stat(path)``: an :class:`ObjInfo` (size, ETag, VersionId, mtime), one
  HEAD;
* ``get_into(path, start, bufs, pin)``: the bytes of the version *pin*
  from *start* on into the caller's buffers (the page frames), one ranged
  GET, whatever the length;
* ``publish(path, ...)``: a new version made of the old one's clean ranges
  and the dirty bytes staged since, returning its ObjInfo.

:class:`FsspecStore` does it for any fsspec filesystem: ``info``,
``cat_file(path, start, end)`` and, to publish, ``pipe_file`` of the whole
object (a filesystem with no server-side copy has nothing better).
:class:`S3Store` does it for s3fs through the S3 API itself: a GET pinned
to its version (VersionId on a versioned bucket, else ``If-Match`` the
ETag: a replaced object fails with ESTALE instead of mixing two versions),
and a publish whose cost follows the dirty data: a multipart upload whose
clean ranges are UploadPartCopy of the old version (CopySourceRange,
pinned by VersionId or CopySourceIfMatch) and whose dirty ranges are
uploaded (:func:`plan_parts`, under a :class:`PartPolicy`).

**The direct path of GETs.**  A GET through fsspec costs several times
more client CPU than the server takes to answer it (botocore, aiohttp, the
hop to fsspec's loop: 10 ms for a 4 KiB GET from RGW on localhost, against
3 ms), so both stores GET through :mod:`vnpager.vfs.objhttp` where they
can: ``http.client`` on connections kept alive per thread, the body read
into the page frames.

* S3Store: a URL presigned by the s3fs client (``generate_presigned_url``
  of get_object, with the VersionId on a versioned bucket, else the GET
  sends ``If-Match`` the ETag, which a presigned URL leaves unsigned and
  RGW honours), cached per (path, VersionId) and signed again before it
  expires (at three quarters of ``presign_expires``), and once after a 403
  on a cached URL (RGW's answer to an expired one is a bare AccessDenied).
  TLS as the client's ``verify`` (False, True, or a CA bundle) and client
  certificate say; timeouts its connect and read timeouts.
* FsspecStore of fsspec's HTTPFileSystem: the URL itself, with a Range.

fsspec's path stays for everything else: other filesystems; an s3fs
client that is anonymous (unsigned), has a proxy (its config's or the
environment's), extra GET parameters (``s3_additional_kwargs``,
``requester_pays``: SSE-C keys and the like go in signed headers), or an
HTTP session we do not know; an HTTPFileSystem with request options
(``client_kwargs``, headers, auth, a ``get_client`` of its own); a URL
http.client cannot send as it is; and any answer that is not a range (200,
a redirect), or on S3 a 400 (botocore mends some: a bucket in another
region).  Event handlers registered on the botocore client run for
the presigning only, not per GET: whoever needs them per request sets
``store.direct_get = False``.  Errors map as fsspec's: 412 (and
NoSuchVersion) ESTALE, 404 ENOENT, 403 EACCES, others EIO with the
server's message; a short body or a wrong Content-Range is EIO.

The other requests are made on the calling thread for a synchronous
filesystem and, for an asynchronous one (s3fs), as coroutines on fsspec's
IO loop, the calling thread waiting for its own: callers on several
threads (the pager's faulting threads, its aio daemon) have as many
requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import hashlib
import itertools
import os
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from vnpager.vfs.objhttp import NotRanged, RangeReader, StatusError, Target

GiB = 1 << 30
MiB = 1 << 20
HTTP_TIMEOUT = 60.0  # seconds of a direct GET's connect, or of silence in its answer
USER_AGENT = {"User-Agent": "vnpager-objhttp"}  # names the direct path's GETs in a server's log
PRESIGN_EXPIRES = 3600  # seconds a presigned URL is good for
PRESIGN_CACHE = 4096  # presigned URLs kept (per store), the least recently used dropped


@dataclass(frozen=True)
class ObjInfo:
    """One version of an object, as a HEAD gives it."""

    size: int
    etag: str = ""  # "" where the server gives none
    version: str | None = None  # the VersionId, on a versioned bucket
    mtime_ns: int = 0

    @property
    def filerev(self) -> int:
        """A number that changes with the version (BSD's va_filerev): a
        digest of the ETag and VersionId."""
        digest = hashlib.blake2b(f"{self.etag}\0{self.version}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big")


@dataclass
class ObjStats:
    """What a store asked of its server.  => ``lock`` guards every field."""

    gets: int = 0  # ranged GETs (reads of pages, and of clean bytes a publish uploads)
    bytes_fetched: int = 0
    heads: int = 0
    puts: int = 0  # whole-object PUTs
    parts_uploaded: int = 0
    bytes_uploaded: int = 0  # bodies of PUTs and of uploaded parts
    parts_copied: int = 0  # UploadPartCopy: server-side copies of clean ranges
    bytes_copied: int = 0
    publishes: int = 0  # new versions made
    signs: int = 0  # URLs presigned for the direct path's GETs
    errors: int = 0  # requests that failed
    in_flight: int = 0  # requests under way now
    max_in_flight: int = 0  # the most ever at once
    gets_in_flight: int = 0  # GETs of pages under way now
    max_gets_in_flight: int = 0  # the most ever at once (readers overlapping)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def snapshot(self) -> dict[str, int]:
        """The counters as a dict (a copy)."""
        with self.lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "lock"}

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    @contextlib.contextmanager
    def request(self, get: bool = False) -> Iterator[None]:
        """Count one request (a GET of pages, with *get*) in flight for as
        long as it runs, and its failure."""
        g = int(get)
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.gets_in_flight += g
            self.max_gets_in_flight = max(self.max_gets_in_flight, self.gets_in_flight)
        try:
            yield
        except BaseException:
            self.add(errors=1)
            raise
        finally:
            self.add(in_flight=-1, gets_in_flight=-g)


@dataclass(frozen=True)
class PartPolicy:
    """The server's limits on a multipart upload (AWS's by default): every
    part but the last at least *min_part* bytes, at most *max_part*, at most
    *max_parts* parts.  Ceph's RGW takes others (rgw_multipart_min_part_size,
    rgw_multipart_part_upload_limit)."""

    min_part: int = 5 * MiB
    max_part: int = 5 * GiB
    max_parts: int = 10_000
    concurrency: int = 8  # parts uploaded or copied at once
    # longer uploads are cut into parts of about this size, while max_parts
    # allows: each is read into memory whole, so concurrency of them at most
    upload_part: int = 8 * MiB
    # a publish may upload up to this many times its dirty bytes to make
    # fewer parts: the shortest clean gaps join the uploads around them.  A
    # copied part costs the server more than uploading its bytes (RGW: about
    # 2x an upload, 3.5x the GET that reads the gap for the upload)
    upload_ratio: float = 2.0

    def __post_init__(self) -> None:
        if (not 0 < self.min_part <= self.max_part or self.max_parts < 1 or self.concurrency < 1
                or self.upload_ratio < 1):
            raise ValueError(f"bad part policy {self}")


@dataclass(frozen=True)
class Part:
    """One part of a new version: [start, end), copied from the old version
    or uploaded (its clean bytes read from the old version, its dirty bytes
    from the staging)."""

    start: int
    end: int
    copy: bool


def plan_parts(size: int, clean_end: int, dirty: list[tuple[int, int]], policy: PartPolicy) -> list[Part]:
    """The parts of a new version of *size* bytes, whose bytes below
    *clean_end* are the old version's except the *dirty* runs (sorted,
    disjoint); bytes at or past *clean_end* are uploaded.

    Each dirty run grows to a part of min_part bytes (into its clean
    neighbours); clean gaps too short to be a part of their own (all but
    the last must be min_part) join the uploads around them; then the
    shortest gaps join while the bytes uploaded stay within upload_ratio
    times the dirty ones; and while the parts are more than max_parts, the
    shortest gaps join too.  So the bytes uploaded are the dirty bytes, what
    the limits force and what the ratio allows to save parts.
    => *size* >= policy.min_part.
    """
    m = policy.min_part
    runs = [(a, min(b, size)) for a, b in dirty if a < min(b, size)]
    if clean_end < size:
        runs.append((clean_end, size))
    ups: list[list[int]] = []
    for a, b in sorted(runs):
        if b - a < m:  # grow to a part: to the right, or left at the end
            b = min(a + m, size)
            a = min(a, b - m)
        if ups and a - ups[-1][1] < m:  # overlapping, or a gap too short to copy
            ups[-1][0], ups[-1][1] = min(ups[-1][0], a), max(ups[-1][1], b)
        else:
            ups.append([a, b])
    if ups and ups[0][0] < m:
        ups[0][0] = 0  # a leading gap too short to be a part
    spare = policy.upload_ratio * sum(b - a for a, b in runs) - sum(b - a for a, b in ups)
    ups = _within_max_parts(_join_within(ups, spare), size, policy)
    parts = _split(_with_gaps(ups, size), policy.max_part)
    return _chunk_uploads(parts, policy)


def _chunk_uploads(parts: list[Part], policy: PartPolicy) -> list[Part]:
    """Cut uploads longer than upload_part (min_part at least) into pieces,
    as far as max_parts allows."""
    chunk = max(policy.min_part, policy.upload_part)
    spare = policy.max_parts - len(parts)
    out: list[Part] = []
    for p in parts:
        n = min(1 + spare, (p.end - p.start) // chunk) if not p.copy else 1
        if n <= 1:
            out.append(p)
            continue
        spare -= n - 1
        step = (p.end - p.start) // n  # >= chunk >= min_part
        cuts = [p.start + i * step for i in range(n)] + [p.end]
        out.extend(Part(a, b, False) for a, b in itertools.pairwise(cuts))
    return out


def _join_within(ups: list[list[int]], spare: float) -> list[list[int]]:
    """Join the uploads across their shortest gaps, while the gaps' bytes
    come to at most *spare*: each join saves two parts, a copy and an upload."""
    join: set[int] = set()
    for i in sorted(range(len(ups) - 1), key=lambda i: ups[i + 1][0] - ups[i][1]):
        spare -= ups[i + 1][0] - ups[i][1]
        if spare < 0:
            break
        join.add(i)
    return _joined(ups, join)


def _joined(ups: list[list[int]], join: set[int]) -> list[list[int]]:
    """*ups* with upload i and i + 1 made one for each i in *join*."""
    merged = [ups[0]] if ups else []
    for i in range(1, len(ups)):
        if i - 1 in join:
            merged[-1] = [merged[-1][0], ups[i][1]]
        else:
            merged.append(ups[i])
    return merged


def _count(ups: list[list[int]], size: int, max_part: int) -> int:
    return len(_split(_with_gaps(ups, size), max_part))


def _within_max_parts(ups: list[list[int]], size: int, policy: PartPolicy) -> list[list[int]]:
    """Join the shortest gaps between uploads until the parts fit max_parts.
    Raises ValueError if even one upload of everything is too many parts."""
    while len(ups) > 1 and _count(ups, size, policy.max_part) > policy.max_parts:
        excess = _count(ups, size, policy.max_part) - policy.max_parts
        gaps = sorted(range(len(ups) - 1), key=lambda i: ups[i + 1][0] - ups[i][1])
        ups = _joined(ups, set(gaps[:max(1, -(-excess // 2))]))  # each join saves a gap and an upload
    if _count(ups, size, policy.max_part) > policy.max_parts:
        ups = [[0, size]]  # the gaps at the ends too: one upload of everything
    if _count(ups, size, policy.max_part) > policy.max_parts:
        raise ValueError(f"an object of {size} bytes does not fit {policy}")
    return ups


def _with_gaps(ups: list[list[int]], size: int) -> list[Part]:
    """The uploads and the copies of the gaps between them, in order."""
    parts, pos = [], 0
    for a, b in ups:
        if pos < a:
            parts.append(Part(pos, a, True))
        parts.append(Part(a, b, False))
        pos = b
    if pos < size:
        parts.append(Part(pos, size, True))
    return parts


def _split(parts: list[Part], max_part: int) -> list[Part]:
    """Parts of at most *max_part* bytes, each cut into equal pieces."""
    out: list[Part] = []
    for p in parts:
        n = -(-(p.end - p.start) // max_part)
        step = -(-(p.end - p.start) // n)
        out.extend(Part(a, min(a + step, p.end), p.copy) for a in range(p.start, p.end, step))
    return out


# the bytes of a new version, [start, end): the staging's over the old version's
ViewReader = Callable[[int, int], bytes]


def _mtime_ns(info: dict[str, Any]) -> int:
    """An fsspec info dict's modification time, in ns (0 if it has none)."""
    for key in ("LastModified", "last_modified", "mtime", "Last-Modified", "created"):
        value = info.get(key)
        if isinstance(value, datetime.datetime):
            return int(value.timestamp() * 1_000_000) * 1000
        if isinstance(value, int | float):
            return int(value * 1e9)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                from email.utils import parsedate_to_datetime

                return int(parsedate_to_datetime(value).timestamp()) * 1_000_000_000
    return 0


class FsspecStore:
    """The objects of any fsspec filesystem *fs*; paths are the filesystem's
    own (``fs._strip_protocol(url)``)."""

    readonly = False
    direct_get = True  # GET by objhttp where the filesystem allows it (see the module docstring)

    def __init__(self, fs: Any, policy: PartPolicy | None = None) -> None:
        self._fs, self._pid = fs, os.getpid()
        self.policy = policy or PartPolicy()
        self.stats = ObjStats()
        # HTTP(S) has no way to write an object: its mounts are read-only
        self.readonly = "http" in protocols(fs)
        # the direct path's reader: made at the first GET (False: not yet)
        self._direct: RangeReader | bool | None = False
        self._direct_lock = threading.Lock()

    @property
    def fs(self) -> Any:
        """The fsspec filesystem.  In a forked child an asynchronous one is
        made anew from the same arguments: its IO loop and connections are
        the parent's (fsspec's are not fork-safe: a request would wait for a
        loop thread the child has not), and fsspec's instance cache is per
        process."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            if getattr(self._fs, "async_impl", False):
                self._fs = type(self._fs)(*self._fs.storage_args, **self._fs.storage_options)
        return self._fs

    def stat(self, path: str) -> ObjInfo:
        """The object's current version.  Raises OSError (FileNotFoundError)."""
        with self.stats.request():
            info = self.fs.info(path)
        self.stats.add(heads=1)
        if info.get("type", "file") != "file":
            raise IsADirectoryError(errno.EISDIR, "not an object", path)
        etag = str(info.get("ETag") or info.get("etag") or "")
        version = info.get("VersionId") or None
        return ObjInfo(int(info["size"] or 0), etag, version, _mtime_ns(info))

    def get_into(self, path: str, start: int, bufs: Sequence[memoryview], pin: ObjInfo | None) -> None:
        """Fill *bufs* with the object's bytes from *start* on (version *pin*
        where the store can pin), in one ranged GET: the direct path's where
        it can, else fsspec's.  Raises OSError: ESTALE if *pin* is gone, EIO
        if the server sent fewer bytes than asked (never zeros for them)."""
        total = sum(len(b) for b in bufs)
        reader = self._reader() if self.direct_get else None
        with self.stats.request(get=True):
            if reader is None or not self._get_direct(reader, path, start, bufs, pin):
                _fill(bufs, self._get_fsspec(path, start, start + total, pin), path)
        self.stats.add(gets=1, bytes_fetched=total)

    def _get_fsspec(self, path: str, start: int, end: int, pin: ObjInfo | None) -> bytes:
        return bytes(self.fs.cat_file(path, start=start, end=end))

    def _reader(self) -> RangeReader | None:
        """The direct path's reader (None: fsspec's path), made once."""
        if self._direct is False:
            with self._direct_lock:
                if self._direct is False:
                    self._direct = self._make_reader()
        assert not isinstance(self._direct, bool)
        return self._direct

    def _make_reader(self) -> RangeReader | None:
        """A reader for fsspec's HTTPFileSystem as it comes, with no request
        options of its own (which only aiohttp would honour)."""
        try:
            from fsspec.implementations.http import HTTPFileSystem, get_client
        except ImportError:  # aiohttp missing
            return None
        fs = self.fs
        if type(fs) is not HTTPFileSystem or fs.kwargs or fs.client_kwargs or fs.get_client is not get_client:
            return None
        return RangeReader(ssl.create_default_context(), HTTP_TIMEOUT)

    def _get_direct(self, reader: RangeReader, path: str, start: int, bufs: Sequence[memoryview],
                    pin: ObjInfo | None) -> bool:
        """GET by *reader*; False if the direct path cannot (fsspec's then)."""
        try:
            return self._get_by(reader, path, start, bufs, pin)
        except StatusError as e:
            raise _oserror(e.code, e.status, e) from e
        except NotRanged:
            return False

    def _get_by(self, reader: RangeReader, path: str, start: int, bufs: Sequence[memoryview],
                pin: ObjInfo | None) -> bool:
        """The GET of the URL itself (an HTTP filesystem's path is its URL)."""
        target = Target.of(path)
        if target is None:
            return False
        reader.get_into(target, start, bufs, USER_AGENT)
        return True

    def publish(self, path: str, base: ObjInfo | None, size: int, clean_end: int,
                dirty: list[tuple[int, int]], view: ViewReader) -> ObjInfo:
        """Write the new version (whole: no server-side copy here)."""
        self.put_whole(path, size, view)
        return self.stat(path)

    def put_whole(self, path: str, size: int, view: ViewReader) -> None:
        data = view(0, size)
        with self.stats.request():
            self.fs.pipe_file(path, data)
        self.stats.add(puts=1, bytes_uploaded=len(data), publishes=1)


def _fill(bufs: Sequence[memoryview], data: bytes, path: str) -> None:
    """Copy *data* into *bufs*, which it must fill.  Raises OSError (EIO) if short."""
    if len(data) < sum(len(b) for b in bufs):
        raise OSError(errno.EIO, f"{path}: the server sent {len(data)} bytes, fewer than asked")
    pos = 0
    for b in bufs:
        b[:] = data[pos:pos + len(b)]
        pos += len(b)


def protocols(fs: Any) -> tuple[str, ...]:
    """The protocols fsspec filesystem *fs* serves."""
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


class S3Store(FsspecStore):
    """The objects of an s3fs filesystem, through the S3 API (see the module
    docstring): pinned GETs (presigned, on the direct path), and publishing
    by multipart copy."""

    presign_expires = PRESIGN_EXPIRES  # seconds a presigned URL is good for

    def __init__(self, fs: Any, policy: PartPolicy | None = None) -> None:
        super().__init__(fs, policy)
        # (path, VersionId) -> the presigned GET and when to sign it anew;
        # => _signed_lock guards it
        self._signed: OrderedDict[tuple[str, str | None], tuple[Target, float]] = OrderedDict()
        self._signed_lock = threading.Lock()

    def _call(self, method: str, **kwargs: Any) -> Any:
        """One S3 request, run on fsspec's loop; counted in flight."""
        return self._run(self.fs._call_s3(method, **kwargs))

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        with self.stats.request():
            return self._sync(coro)

    def _sync(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run *coro* on fsspec's loop; its errors as OSError (_s3_oserror)."""
        from fsspec.asyn import sync

        try:
            return sync(self.fs.loop, lambda: coro)
        except Exception as e:  # s3fs's OSErrors, botocore's ClientError and the like
            err = _s3_oserror(e)
            if err is e:
                raise
            raise err from e

    def _bk(self, path: str) -> dict[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        return {"Bucket": bucket, "Key": key}

    def stat(self, path: str) -> ObjInfo:
        head = self._call("head_object", **self._bk(path))
        self.stats.add(heads=1)
        mtime = head.get("LastModified")
        return ObjInfo(int(head["ContentLength"]), str(head.get("ETag", "")), head.get("VersionId"),
                       _mtime_ns({"LastModified": mtime}))

    def _get_fsspec(self, path: str, start: int, end: int, pin: ObjInfo | None) -> bytes:
        return bytes(self._sync(self._get(path, start, end, pin)))

    def _make_reader(self) -> RangeReader | None:
        """A reader if the client's GETs can go direct (see the module docstring)."""
        fs = self.fs
        return _s3_reader(fs, self._sync(fs.set_session()))

    def _get_by(self, reader: RangeReader, path: str, start: int, bufs: Sequence[memoryview],
                pin: ObjInfo | None) -> bool:
        """A presigned GET, pinned; a 403 on a cached URL is signed anew and
        tried once more (RGW answers an expired URL with a bare AccessDenied).
        A 400 goes fsspec's way: botocore mends what a presigned URL cannot
        (a bucket in another region: AuthorizationHeaderMalformed)."""
        version = pin.version if pin is not None else None
        headers = {**USER_AGENT, **_pin(pin, "", "If-Match")}
        target, fresh = self._presigned(path, version, renew=False)
        try:
            try:
                reader.get_into(target, start, bufs, headers)
            except StatusError as e:
                if e.status != 403 or fresh:
                    raise
                reader.get_into(self._presigned(path, version, renew=True)[0], start, bufs, headers)
        except StatusError as e:
            if e.status == 400:
                return False
            raise
        return True

    def _presigned(self, path: str, version: str | None, renew: bool) -> tuple[Target, bool]:
        """The presigned GET of *path* (at *version*), and whether it was
        signed now: signed anew past three quarters of its time, or *renew*."""
        key, now = (path, version), time.time()
        with self._signed_lock:
            hit = self._signed.get(key)
            if hit is not None and not renew and now < hit[1]:
                self._signed.move_to_end(key)
                return hit[0], False
        url = self._sync(self.fs._url(path, expires=self.presign_expires,
                                      **({"VersionId": version} if version else {})))
        target = Target.of(url)
        if target is None:
            raise NotRanged(f"a presigned URL http.client cannot send: {url}")
        self.stats.add(signs=1)
        with self._signed_lock:
            # X-Amz-Date is in whole seconds: the URL's time runs from the second it was signed in
            self._signed[key] = (target, int(now) + self.presign_expires * 3 / 4)
            self._signed.move_to_end(key)
            while len(self._signed) > PRESIGN_CACHE:
                self._signed.popitem(last=False)
        return target, True

    async def _get(self, path: str, start: int, end: int, pin: ObjInfo | None) -> bytes:
        resp = await self.fs._call_s3("get_object", **self._bk(path), Range=f"bytes={start}-{end - 1}",
                                      **_pin(pin, "VersionId", "IfMatch"))
        try:
            return bytes(await resp["Body"].read())
        finally:
            resp["Body"].close()

    def publish(self, path: str, base: ObjInfo | None, size: int, clean_end: int,
                dirty: list[tuple[int, int]], view: ViewReader) -> ObjInfo:
        """A new version of *path*, *size* bytes: below *clean_end* the
        *base* version's bytes except the *dirty* runs, the rest from
        *view*.  An object smaller than a part is one PUT; others a
        multipart upload that copies clean ranges server-side (a new
        object's parts are all uploaded, upload_part each).  Raises
        OSError (ESTALE if *base* was replaced meanwhile, on a bucket
        without versioning); a failed upload is aborted."""
        if size < self.policy.min_part:
            resp = self._put(path, size, view)
        else:
            clean_end = clean_end if base is not None else 0  # a new object: all uploaded
            resp = self._multipart(path, base, plan_parts(size, clean_end, dirty, self.policy), view)
        self.stats.add(publishes=1)
        return self._published(path, size, resp)

    def _published(self, path: str, size: int, resp: dict[str, Any]) -> ObjInfo:
        """The version our PUT or upload made (its response names it); its
        mtime from a HEAD, unless someone replaced it already."""
        info = self.stat(path)
        etag, version = str(resp.get("ETag", "")), resp.get("VersionId")
        if (info.etag, info.version) == (etag, version):
            return info
        return ObjInfo(size, etag, version, time.time_ns())

    def _put(self, path: str, size: int, view: ViewReader) -> dict[str, Any]:
        data = view(0, size)
        resp = self._call("put_object", **self._bk(path), Body=data)
        self.stats.add(puts=1, bytes_uploaded=len(data))
        return dict(resp)

    def _multipart(self, path: str, base: ObjInfo | None, parts: list[Part],
                   view: ViewReader) -> dict[str, Any]:
        bk = self._bk(path)
        upload_id = self._call("create_multipart_upload", **bk)["UploadId"]
        try:
            etags = self._run(self._parts(bk, upload_id, base, parts, view))
            self._check_base(path, base, parts)
            return dict(self._call("complete_multipart_upload", **bk, UploadId=upload_id, MultipartUpload={
                "Parts": [{"ETag": t, "PartNumber": i + 1} for i, t in enumerate(etags)]}))
        except BaseException:
            with contextlib.suppress(Exception):
                self._call("abort_multipart_upload", **bk, UploadId=upload_id)
            raise

    def _check_base(self, path: str, base: ObjInfo | None, parts: list[Part]) -> None:
        """ESTALE if the copies may have read another version than *base*:
        without a VersionId the copies are pinned by ETag only, which some
        servers ignore in UploadPartCopy (Ceph 16's RGW does), so look once
        they are done; a version seen now was the one they copied."""
        if base is None or base.version or not any(p.copy for p in parts):
            return
        if self.stat(path).etag != base.etag:
            raise OSError(errno.ESTALE, f"{path} was replaced since it was opened")

    async def _parts(self, bk: dict[str, str], upload_id: str, base: ObjInfo | None, parts: list[Part],
                     view: ViewReader) -> list[str]:
        """Upload or copy every part, policy.concurrency at once; their ETags."""
        sem = asyncio.Semaphore(self.policy.concurrency)
        loop = asyncio.get_running_loop()
        source = {**bk, **_pin(base, "VersionId", "")}

        async def one(number: int, p: Part) -> str:
            async with sem:
                common = {**bk, "UploadId": upload_id, "PartNumber": number}
                if p.copy:
                    resp = await self.fs._call_s3(
                        "upload_part_copy", **common, CopySource=source,
                        CopySourceRange=f"bytes={p.start}-{p.end - 1}",
                        **_pin(base, "", "CopySourceIfMatch"))
                    self.stats.add(parts_copied=1, bytes_copied=p.end - p.start)
                    return str(resp["CopyPartResult"]["ETag"])
                # the view may GET clean bytes: off the loop, on a worker thread
                body = await loop.run_in_executor(None, view, p.start, p.end)
                resp = await self.fs._call_s3("upload_part", **common, Body=body)
                self.stats.add(parts_uploaded=1, bytes_uploaded=len(body))
                return str(resp["ETag"])

        return list(await asyncio.gather(*(one(i + 1, p) for i, p in enumerate(parts))))


def _pin(info: ObjInfo | None, version_key: str, etag_key: str) -> dict[str, str]:
    """The arguments that pin a request to version *info*: its VersionId
    where it has one, else If-Match its ETag (under the names given; an
    empty name: not that way)."""
    if info is None:
        return {}
    if info.version and version_key:
        return {version_key: info.version}
    if info.etag and etag_key and not info.version:
        return {etag_key: info.etag}
    return {}


def _s3_oserror(e: Exception) -> OSError:
    """An OSError for a failed S3 request: ESTALE for a failed pin, else
    s3fs's own (which it made from botocore's ClientError), or one of ours."""
    response = getattr(e, "response", None) or getattr(e.__cause__, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    return _oserror(code, response.get("ResponseMetadata", {}).get("HTTPStatusCode"), e)


def _oserror(code: str, status: int | None, e: Exception) -> OSError:
    """The OSError of a request that failed with S3 error *code* and HTTP *status*."""
    if code in ("PreconditionFailed", "NoSuchVersion") or status == 412:
        return OSError(errno.ESTALE, f"the object changed: {e}")
    if isinstance(e, OSError):
        return e
    if code in ("NoSuchKey", "404", "NoSuchBucket") or status == 404:
        return FileNotFoundError(errno.ENOENT, str(e))
    if code in ("AccessDenied", "403") or status == 403:
        return PermissionError(errno.EACCES, str(e))
    return OSError(errno.EIO, f"{type(e).__name__}: {e}")


def _s3_reader(fs: Any, client: Any) -> RangeReader | None:
    """The direct path's reader for s3fs *fs*'s botocore *client*, with its
    TLS settings and timeouts; None where the direct path could not do as
    the client would (see the module docstring)."""
    from botocore import UNSIGNED

    session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    config, url = client.meta.config, str(client.meta.endpoint_url)
    try:
        proxied = session._proxy_config.proxy_url_for(url)  # type: ignore[union-attr]
        verify, cert, key = session._verify, session._cert_file, session._key_file  # type: ignore[union-attr]
        extra = set(fs._get_s3_method_kwargs(client.get_object, Bucket="b", Key="k")) - {"Bucket", "Key"}
    except (AttributeError, TypeError):  # an HTTP session or s3fs we do not know
        return None
    if config.signature_version is UNSIGNED or proxied or extra or not url.startswith(("http:", "https:")):
        return None
    timeout = max((t for t in (config.connect_timeout, config.read_timeout) if t), default=HTTP_TIMEOUT)
    return RangeReader(_tls_context(verify, cert, key) if url.startswith("https:") else None, timeout)


def _tls_context(verify: bool | str, cert: str | None, key: str | None) -> ssl.SSLContext:
    """A TLS context as botocore's *verify* (True, False, or a CA bundle's
    path) and client certificate say."""
    from botocore.httpsession import get_cert_path

    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=get_cert_path(verify))
    if cert:
        context.load_cert_chain(cert, key)
    return context


def store_for(fs: Any, policy: PartPolicy | None = None) -> FsspecStore:
    """The store of fsspec filesystem *fs*: S3Store for s3fs, else FsspecStore."""
    if "s3" in protocols(fs) and hasattr(fs, "_call_s3"):
        return S3Store(fs, policy)
    return FsspecStore(fs, policy)
