"""objhttp: ranged GETs by the standard library, straight into the caller's buffers.

The hot path of objfs's reads (:mod:`vnpager.vfs.objstore`): a GET of bytes
[start, end) of a URL (S3's presigned, or a plain HTTP one) by
``http.client``, the body read with ``readinto`` into the page frames the
pager gave (no bytes object, no copy but the socket's).  Through fsspec the
same GET costs several times more client CPU (botocore's request building
and signing, aiohttp, the hop to fsspec's IO loop and back): on localhost a
4 KiB GET from RGW took 10 ms through s3fs and 3 ms here.

* **Connections**: kept alive, one per thread per host (``threading.local``),
  so the readers' threads and the read-ahead daemon's have their GETs in
  flight at once, each on its own socket, and no lock is shared.  A forked
  child makes its own (the parent's sockets are the parent's).
* **A dropped connection** (the server closed an idle kept-alive one:
  RemoteDisconnected, EPIPE, ECONNRESET before the answer) is retried once
  on a fresh connection; a server error (500, 502, 503, 504) is retried
  ``RETRIES_5XX`` times after a short back-off, as botocore would have.
* **Checks**: the answer must be 206 with the Content-Range asked for and
  that many bytes; a wrong range or a short body is EIO (never zeros).  A
  200 or a redirect to a ranged GET is :class:`NotRanged`: the caller goes
  its other way (fsspec's) for that request.  Any other status is
  :class:`StatusError`, with S3's error code and message when the body is
  S3's XML.
"""

from __future__ import annotations

import errno
import http.client
import os
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

BUFFER = 64 << 10  # a response's read buffer: one recv fills many 4 KiB frames
ERROR_BODY_MAX = 64 << 10  # bytes of an error's body read (for its message)
RETRIES_5XX = 2
BACKOFF = 0.05  # seconds before the first retry of a server error, doubled after
# the peer closed a kept-alive connection before answering: retried once
DROPPED = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
_URL_OK = re.compile(r"^[!-~]+$")  # printable ASCII, no space: http.client sends it as is


@dataclass(frozen=True)
class Target:
    """Where a GET goes: a URL taken apart once."""

    scheme: str  # "http" or "https"
    host: str
    port: int | None
    path: str  # the request target: path and query

    @classmethod
    def of(cls, url: str) -> Target | None:
        """The target of *url*; None if http.client cannot send it as it is
        (another scheme, spaces, non-ASCII: fsspec quotes those its own way)."""
        if not _URL_OK.match(url):
            return None
        p = urllib.parse.urlsplit(url)
        if p.scheme not in ("http", "https") or not p.hostname:
            return None
        try:
            port = p.port
        except ValueError:
            return None
        return cls(p.scheme, p.hostname, port, (p.path or "/") + (f"?{p.query}" if p.query else ""))


class StatusError(Exception):
    """The server answered with an error status; *code* and *message* are
    from S3's XML error body where there is one."""

    def __init__(self, status: int, reason: str, code: str = "", message: str = "") -> None:
        super().__init__(f"{status} {reason}" + (f" ({code}{': ' + message if message else ''})"
                                                 if code else ""))
        self.status, self.reason, self.code, self.message = status, reason, code, message


class NotRanged(Exception):
    """The server did not answer the ranged GET with a range (200, a
    redirect): the caller reads another way."""


class _Response(http.client.HTTPResponse):
    """A response read through a larger buffer: a body of many 4 KiB frames
    takes one recv per BUFFER bytes, not one per 8 KiB."""

    def __init__(self, sock: object, *args: object, **kwargs: object) -> None:
        super().__init__(sock, *args, **kwargs)  # type: ignore[arg-type]
        self.fp.close()  # the default one's, not used yet
        self.fp = sock.makefile("rb", buffering=BUFFER)  # type: ignore[attr-defined]


class RangeReader:
    """Ranged GETs on kept-alive connections, one per thread per host.

    *context*: the TLS context of https targets (None: https is refused,
    the caller should not have chosen this reader); *timeout*: seconds of a
    connect or of a read's silence.
    """

    def __init__(self, context: ssl.SSLContext | None = None, timeout: float | None = 60.0) -> None:
        self.context, self.timeout = context, timeout
        self._local = threading.local()
        self._pid = os.getpid()

    def _conns(self) -> dict[tuple[str, str, int | None], http.client.HTTPConnection]:
        """This thread's connections (none yet in a forked child)."""
        if self._pid != os.getpid():
            self._pid, self._local = os.getpid(), threading.local()
        conns: dict[tuple[str, str, int | None], http.client.HTTPConnection] | None
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        return conns

    def _connection(self, t: Target) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection to *t*'s host, and whether it served before."""
        conns, key = self._conns(), (t.scheme, t.host, t.port)
        conn = conns.get(key)
        if conn is not None:
            return conn, True
        if t.scheme == "https":
            if self.context is None:
                raise OSError(errno.EIO, f"no TLS context for https://{t.host}")
            conn = http.client.HTTPSConnection(t.host, t.port, timeout=self.timeout, context=self.context)
        else:
            conn = http.client.HTTPConnection(t.host, t.port, timeout=self.timeout)
        conn.response_class = _Response
        conns[key] = conn
        return conn, False

    def _drop(self, t: Target) -> None:
        conn = self._conns().pop((t.scheme, t.host, t.port), None)
        if conn is not None:
            conn.close()

    def get_into(self, t: Target, start: int, bufs: Sequence[memoryview],
                 headers: Mapping[str, str] | None = None) -> None:
        """Fill *bufs* with the bytes of *t* from *start* on (as many as they
        hold), in one GET.  Raises StatusError, NotRanged, or OSError (EIO:
        the transport failed, or the answer was not the range asked for)."""
        total = sum(len(b) for b in bufs)
        h = {"Range": f"bytes={start}-{start + total - 1}", **(headers or {})}
        for attempt in range(RETRIES_5XX + 1):
            try:
                self._get(t, start, total, bufs, h)
                return
            except StatusError as e:
                if e.status not in (500, 502, 503, 504) or attempt == RETRIES_5XX:
                    raise
            time.sleep(BACKOFF * 2 ** attempt)

    def _get(self, t: Target, start: int, total: int, bufs: Sequence[memoryview],
             h: dict[str, str]) -> None:
        resp = self._send(t, h)
        try:
            _check(resp, start, total)
            _read_body(resp, bufs)
        except StatusError:
            if not resp.isclosed():  # an error body longer than we read
                self._drop(t)
            raise
        except BaseException:
            self._drop(t)
            raise

    def _send(self, t: Target, h: dict[str, str]) -> http.client.HTTPResponse:
        """Send the GET and read the answer's head, once more on a fresh
        connection if a reused one was dropped."""
        while True:
            conn, reused = self._connection(t)
            try:
                conn.request("GET", t.path, headers=h)
                return conn.getresponse()
            except DROPPED as e:
                self._drop(t)
                if not reused:
                    raise OSError(errno.EIO, f"GET {t.host}: {type(e).__name__}: {e}") from e
            except (OSError, http.client.HTTPException) as e:
                self._drop(t)
                raise OSError(errno.EIO, f"GET {t.host}: {type(e).__name__}: {e}") from e
            except BaseException:  # interrupted: the connection is mid-request
                self._drop(t)
                raise


def _check(resp: http.client.HTTPResponse, start: int, total: int) -> None:
    """Raise unless *resp* is the 206 of bytes [start, start + total)."""
    if resp.status == 206:
        want = f"bytes {start}-{start + total - 1}/"
        got = resp.getheader("Content-Range", "")
        if not got.startswith(want) or resp.length != total:
            raise OSError(errno.EIO, f"asked {want[6:-1]}, the server sent Content-Range {got!r} "
                                     f"and {resp.length} bytes")
        return
    if resp.status == 200 or 300 <= resp.status < 400:
        raise NotRanged(f"{resp.status} {resp.reason}")
    try:
        body = resp.read(ERROR_BODY_MAX)
    except (OSError, http.client.HTTPException):
        body = b""
    raise StatusError(resp.status, resp.reason, _xml_field(body, "Code"), _xml_field(body, "Message"))


def _read_body(resp: http.client.HTTPResponse, bufs: Sequence[memoryview]) -> None:
    """Read the body into *bufs*, whole.  Raises OSError (EIO) if it ends short."""
    try:
        for b in bufs:
            got = 0
            while got < len(b):
                n = resp.readinto(b[got:])
                if not n:
                    raise http.client.IncompleteRead(b"", len(b) - got)
                got += n
    except (OSError, http.client.HTTPException) as e:
        raise OSError(errno.EIO, f"short body: {type(e).__name__}: {e}") from e


def _xml_field(body: bytes, name: str) -> str:
    m = re.search(rb"<%s>([^<]*)</%s>" % (name.encode(), name.encode()), body)
    return m.group(1).decode(errors="replace") if m else ""
