"""The hardware MMU's process boundary: requests and replies as data.

A client talks to its pager server over a ``SOCK_SEQPACKET`` Unix socket
(one datagram per message, so no length prefix is needed: the kernel keeps
the boundaries), one request at a time per connection, each answered by
one reply.  A message is a small JSON object; descriptors travel with it
by SCM_RIGHTS (:mod:`vnpager.arch.uffd.fdpass`).

* request: ``{"op": NAME, "args": [...], "seq": N}`` and the request
  kind's fds;
* reply: ``{"seq": N, "ok": RESULT}`` and the kind's fds, or
  ``{"seq": N, "err": [TYPE, ERRNO, MESSAGE]}``, re-raised in the client as the
  same exception (:func:`reraise`): an OSError keeps its errno (so it is
  FileNotFoundError, BlockingIOError, ... again), ValueError, TypeError,
  OverflowError, IndexError and BufferError keep their type, anything
  else is a server bug and arrives as :class:`ServerError`.

``seq`` numbers a connection's requests, and a reply names the request it
answers: a client whose wait for a reply was cut off by a signal's
exception (KeyboardInterrupt) after its request went out reads that
reply later, before its next one, and drops it by its number.

:data:`REQUESTS` is the one table of request kinds: their arguments, the
fds each way, and whether they need an attached address space.  Both
sides check a message against it, so a malformed one is refused at the
boundary, not deep in the VM.  Nothing here knows the VM: the client
library imports this module, never the server's.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

from vnpager.arch.uffd import MACHINE_FEATURES, OPTIONAL_FEATURES, fdpass

#: A request or reply is at most this long (a statistics reply is the
#: largest); the server's memfds come one per reply.
MAX_MESSAGE = 1 << 16
MAX_FDS = 2

#: What a client's userfaultfd is opened with: the uffd machine's features
#: (no WP_ASYNC: its pmap tracks dirty pages by synchronous write-protect
#: faults, so that a store to a page under write-back blocks in the
#: server), and POISON and THREAD_ID where the kernel has them.
CLIENT_FEATURES = MACHINE_FEATURES
CLIENT_OPTIONAL = OPTIONAL_FEATURES


@dataclass(frozen=True, slots=True)
class Request:
    """One kind of request: its argument names, the fds it brings and the
    fds its reply brings back, and whether the session must have a
    client space (``attach``/``adopt`` make it)."""

    args: tuple[str, ...]
    fds_in: int = 0
    fds_out: int = 0
    needs_space: bool = True
    binary: tuple[str, ...] = ()  # the arguments that are bytes (base64 on the wire)


#: The request kinds.  ``attach`` brings the client's uffd and makes its
#: space; ``adopt`` is a forked child's: it takes the space the fork event
#: made (the reply brings the child's uffd, for its watchdog).  Both
#: answer (the session's id, the server's pid).  The rest
#: are ClientSpace's methods (vnpager.server.space), addresses being the
#: client's own; ``ping`` answers at once (a round trip's cost, and a
#: liveness check); ``vmstats`` is the server VM's ``stats()`` (shared by
#: all its clients) and its ``npages``; ``quiesce`` waits until it is idle
#: (``vm.quiesce``); ``check_invariants`` runs its checks.  ``fopen``
#: .. ``fclose`` are file I/O through the server VM's pages (the client's
#: ``pread``, ``pwrite`` and ``open``): a handle per open file, bytes as
#: base64 (at most MAX_DATA a message).  ``map_url`` and ``fopen_url`` name
#: an object by its URL instead of bringing a descriptor (the server looks
#: it up on its VM's objfs mounts); ``mount_objects`` makes such a mount
#: (an fsspec protocol and its storage_options, JSON: credentials travel
#: over this private socket) and answers its id, ``objstats`` a mount's
#: ``statistics()``.
REQUESTS: dict[str, Request] = {
    "attach": Request(("features",), fds_in=1, needs_space=False),  # the uffd's features
    "adopt": Request(("parent",), fds_out=1, needs_space=False),  # parent: its session id
    "ping": Request((), needs_space=False),
    "map": Request(("length", "offset", "prot", "flags"), fds_in=1, fds_out=1),
    "release": Request(("grant",)),
    "mapped": Request(("grant", "addr", "length")),
    "unmap": Request(("addr",)),
    "flush": Request(("addr", "offset", "size")),
    "madvise": Request(("addr", "start", "length", "advice")),
    "resize": Request(("addr", "newsize")),
    "moved": Request(("addr", "newaddr", "length")),
    "size": Request(("addr",)),
    "statistics": Request(()),
    "vmstats": Request((), needs_space=False),
    "quiesce": Request(("timeout",), needs_space=False),
    "check_invariants": Request((), needs_space=False),
    "fopen": Request(("prot",), fds_in=1),
    "fread": Request(("handle", "n", "off")),
    "fwrite": Request(("handle", "off", "data"), binary=("data",)),
    "fsize": Request(("handle",)),
    "ftruncate": Request(("handle", "size")),
    "fsync": Request(("handle",)),
    "fclose": Request(("handle", "sync")),
    "map_url": Request(("url", "length", "offset", "prot", "flags"), fds_out=1),
    "fopen_url": Request(("url", "prot", "create", "excl")),
    "mount_objects": Request(("protocol", "options", "policy", "staging_dir"), needs_space=False),
    "objstats": Request(("mount",), needs_space=False),
}

#: Bytes a request or reply carries at most (fread, fwrite): base64 makes
#: 4 of 3, and a message is at most MAX_MESSAGE.
MAX_DATA = 32 * 1024

#: The exception types a reply may carry, re-raised as themselves.
EXCEPTIONS: dict[str, type[Exception]] = {
    t.__name__: t for t in (OSError, ValueError, TypeError, OverflowError, IndexError, BufferError,
                            TimeoutError, LookupError)
}


class ProtocolError(OSError):
    """A message that breaks the protocol (malformed, unknown kind, wrong
    fds): the connection cannot be trusted any more (errno EPROTO)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPROTO, message)


class ServerError(RuntimeError):
    """The server failed in a way no mmap call can (a bug there): its
    exception's type and message, for the client to see."""


class ServerTimeout(TimeoutError):
    """The pager server did not answer a request in time (it may be alive
    but stuck): a TimeoutError, errno ETIMEDOUT.  The connection stays
    usable: a late reply is dropped by its number."""

    def __init__(self, op: str, timeout: float, server: str) -> None:
        super().__init__(errno.ETIMEDOUT, f"the vnpager server {server} did not answer {op!r} "
                                          f"within {timeout:g} s")


class ServerGone(ConnectionError):
    """The pager server is gone (died, or closed the connection): every
    map method that needs it raises this (an OSError, errno EPIPE)."""

    def __init__(self, why: str = "") -> None:
        super().__init__(errno.EPIPE, "the vnpager server is gone" + (f" ({why})" if why else ""))


# ---------------------------------------------------------------- encoding


def pack(data: bytes | bytearray | memoryview) -> str:
    """Bytes as a message carries them (base64)."""
    return base64.b64encode(data).decode()


def unpack(text: str) -> bytes:
    """The bytes of :func:`pack`; ProtocolError if *text* is not base64."""
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise ProtocolError("malformed base64 data") from None


def encode_request(op: str, *args: Any, seq: int = 0) -> bytes:
    kind = REQUESTS.get(op)
    if kind is None or len(args) != len(kind.args):
        raise ProtocolError(f"bad request {op}{args!r}")
    wire = [pack(a) if name in kind.binary else a for name, a in zip(kind.args, args, strict=True)]
    return json.dumps({"op": op, "args": wire, "seq": seq}).encode()


def decode_request(payload: bytes, fds: list[int]) -> tuple[str, Request, list[Any], int]:
    """(name, kind, args, seq) of a request; ProtocolError if it does not
    fit the table (the caller closes *fds* then)."""
    try:
        msg = json.loads(payload)
        op, args, seq = msg["op"], msg["args"], msg["seq"]
    except (ValueError, KeyError, TypeError):
        raise ProtocolError(f"malformed request {payload[:80]!r}") from None
    kind = REQUESTS.get(op) if isinstance(op, str) else None
    if kind is None or not isinstance(args, list) or len(args) != len(kind.args) or type(seq) is not int:
        raise ProtocolError(f"bad request {payload[:80]!r}")
    if len(fds) != kind.fds_in:
        raise ProtocolError(f"{op}: {len(fds)} fds, wants {kind.fds_in}")
    if any(name in kind.binary and not isinstance(a, str) for name, a in zip(kind.args, args, strict=True)):
        raise ProtocolError(f"{op}: bytes must come as base64")
    args = [unpack(a) if name in kind.binary else a for name, a in zip(kind.args, args, strict=True)]
    return op, kind, args, seq


def encode_result(result: Any, seq: int = 0) -> bytes:
    return json.dumps({"seq": seq, "ok": result}).encode()


@dataclass(frozen=True, slots=True)
class Reply:
    """A decoded reply: the request it answers, and its result or error."""

    seq: int
    ok: Any = None
    err: tuple[str, int, str] | None = None

    def result(self) -> Any:
        """The result, or raise the exception the reply carries."""
        if self.err is not None:
            raise reraise(*self.err)
        return self.ok


def encode_error(exc: BaseException, seq: int = 0) -> bytes:
    """The reply for *exc*: its type if the client may re-raise it, else
    ServerError's, with errno (0 if none) and message."""
    name = type(exc).__name__
    if isinstance(exc, OSError) and exc.errno:
        name, err, message = "OSError", exc.errno, exc.strerror or str(exc)
        if exc.filename is not None:
            message = f"{message}: {exc.filename!r}"
    else:
        err, message = 0, str(exc)
        if name not in EXCEPTIONS:
            name, message = "ServerError", f"{type(exc).__name__}: {exc}"
    return json.dumps({"seq": seq, "err": [name, err, message]}).encode()


def decode_reply(payload: bytes) -> Reply:
    """A reply; ProtocolError if it is malformed."""
    try:
        msg = json.loads(payload)
        seq = msg["seq"]
        if "ok" in msg:
            return Reply(seq, msg["ok"])
        name, err, message = msg["err"]
        return Reply(seq, err=(str(name), int(err), str(message)))
    except (ValueError, KeyError, TypeError):
        raise ProtocolError(f"malformed reply {payload[:80]!r}") from None


def reraise(name: str, err: int, message: str) -> Exception:
    """The client-side exception for a reply's (type, errno, message)."""
    if name == "OSError":
        return OSError(err, message) if err else OSError(message)
    t = EXCEPTIONS.get(name)
    return t(message) if t is not None else ServerError(message)


# ---------------------------------------------------------------- the wire


def peer_pid(sock: socket.socket) -> int:
    """The pid at the other end of a connected Unix socket (SO_PEERCRED:
    the kernel's word, not the peer's)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid: int = struct.unpack("3i", creds)[0]
    return pid


def address(path: str) -> str | bytes:
    """A socket address from a command line's PATH: ``@name`` is Linux's
    abstract namespace (no file to clean up), anything else a path."""
    return b"\0" + path[1:].encode() if path.startswith("@") else path


def recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and its fds; (b"", []) at end of file or when the peer
    reset the connection (both mean it is gone)."""
    try:
        return fdpass.recv(sock, MAX_MESSAGE, MAX_FDS)
    except ConnectionResetError:
        return b"", []


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
