"""The hardware MMU as a client process meets it: :class:`HardwareVM`.

A HardwareVM holds no kernel state: a connection to a pager server (its
own private child, or a shared ``vnpager serve``), the process's
userfaultfd (handed to the server once, at attach), a watchdog process
(:mod:`.watchdog`) and the maps made through it (:class:`.HwMmap`).

* ``vnpager.VM(physmem=..., mmu="hardware")`` starts a private server as
  a child process (``python -m vnpager serve --listen-fd``), which dies
  with this process and is stopped by :meth:`HardwareVM.close`;
* ``vnpager.VM.connect(PATH)`` attaches to a shared server: its clients
  share one budget and one set of pages, so a write by one process is
  seen by the others at once.

Objects of object stores (issue 12): :meth:`HardwareVM.mount_objects`
sends fsspec's storage_options to the server (JSON), and a URL given to
``map``, ``open``, ``pread`` or ``pwrite`` is the server's to look up on
its VM's objfs mounts (:mod:`vnpager.server.objects`): a URL's map is a
HwMmap as a file's is.

Requests go one at a time over the connection (``_lock``); a thread that
waits for a reply holds no GIL, so another thread's fault is served
meanwhile (by the server's fault thread, which never waits for us).  A
server that dies is seen at once (end of file: ServerGone); one that stops
answering but lives is given ``request_timeout`` seconds a request, then
ServerTimeout (a TimeoutError).

Fork: after ``os.fork()`` the child's address space is the server's
already (the fork event made it a space of its own, with copies of the
parent's maps); the child's hook (``os.register_at_fork``) opens its own
connection and adopts that space, and starts the child's watchdog over
the child's uffd (which the server sends back: the kernel gave it to the
server, not to the child).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, Self, SupportsIndex

from vnpager.arch.uffd import PAGE_SIZE, Uffd
from vnpager.client import watchdog
from vnpager.client.hwfile import PROT_READ, PROT_WRITE, HwFile, RemoteFile
from vnpager.client.hwmmap import RW, HwMmap
from vnpager.server import protocol
from vnpager.vfs.objfs import is_url
from vnpager.vfs.objstore import protocols

#: How long a connection waits for the server's answer to attach (an
#: embedded server imports vnpager and makes its VM first).
CONNECT_TIMEOUT = 60.0
#: How long close waits for a private server to write back and exit.
STOP_TIMEOUT = 120.0
#: How long a request waits for its reply (a flush writes the map back
#: first: as long as the disk takes), then ServerTimeout; a VM's
#: ``request_timeout``, from ``VNPAGER_REQUEST_TIMEOUT`` (seconds) if set.
REQUEST_TIMEOUT = 600.0

_live: weakref.WeakSet[HardwareVM] = weakref.WeakSet()


class HardwareVM:
    """A client of a pager server: see the module docstring.

    The connection (``_sock``, ``_dead``, ``_seq``) is guarded by
    ``_lock``, which a request holds from send to reply.  ``space_lock``
    (this process's mmap_sem) is held by a map from its mmap, munmap or
    mremap until the server knows its new address, since the server names
    maps by address (see ``HwMmap.close``).  ``_maps`` (the
    open maps, closed by :meth:`close`) is a WeakSet: a map dropped
    without close is closed by its ``__del__``.  ``closed`` is set once,
    by :meth:`close`; like a file object, a VM is not safe against a
    close racing its other calls.
    """

    mmu = "hardware"

    def __init__(self, physmem: int | str | None = None, *, path: str | None = None) -> None:
        self.closed = False
        self._lock = threading.Lock()
        self.space_lock = threading.RLock()  # the client's mmap_sem: see HwMmap
        self._maps: weakref.WeakSet[HwMmap] = weakref.WeakSet()
        self._server: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._dead = ""
        self._seq = 0  # the number of the last request sent
        self.request_timeout = float(os.environ.get("VNPAGER_REQUEST_TIMEOUT", REQUEST_TIMEOUT))
        # UffdUnavailable (naming the fix) before any process is started
        self.uffd = Uffd.open(protocol.CLIENT_FEATURES, protocol.CLIENT_OPTIONAL)
        try:
            self.path = path if path is not None else self._spawn(physmem)
            self._sock = self._connect()
            # the server's pid from itself: SO_PEERCRED names whoever called
            # listen(), which for a private server is us
            self.session, self.server_pid = self.request("attach", self.uffd.features, fds=[self.uffd.fd])
            self._start_watchdog(self.uffd)
        except BaseException:
            self._teardown()
            raise
        _live.add(self)

    @classmethod
    def connect(cls, path: str) -> HardwareVM:
        """A client of the shared server at *path* (``@name``: abstract)."""
        return cls(path=path)

    # -------------------------------------------------------- the server

    def _spawn(self, physmem: int | str | None) -> str:
        """Start a private server; its address.  We listen first and hand
        it the socket, so our connect never races its start."""
        path = f"@vnpager-{os.getpid()}-{secrets.token_hex(8)}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            listener.bind(protocol.address(path))
            listener.listen(64)
            cmd = [sys.executable, "-m", "vnpager", "serve", "--socket", path,
                   "--listen-fd", str(listener.fileno()), "--parent-pid", str(os.getpid())]
            if physmem is not None:
                cmd += ["--physmem", str(physmem)]
            # its own session: a terminal's ^C is ours to handle, not the server's
            self._server = subprocess.Popen(cmd, pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        finally:
            listener.close()
        return path

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(protocol.address(self.path))
        except BaseException:
            sock.close()
            raise
        return sock

    def _start_watchdog(self, uffd: Uffd) -> None:
        server = os.pidfd_open(self.server_pid)
        try:
            cmd = [sys.executable, "-I", "-S", watchdog.__file__, "--uffd", str(uffd.fd),
                   "--features", str(uffd.features), "--server", str(server), "--client", str(os.getpid())]
            self._watchdog = subprocess.Popen(cmd, pass_fds=[uffd.fd, server], stdin=subprocess.DEVNULL,
                                              start_new_session=True)
        finally:
            os.close(server)

    @property
    def alive(self) -> bool:
        """False once the server was seen gone (a request failed)."""
        return not self._dead

    def request(self, op: str, *args: Any, fds: list[int] | tuple[int, ...] = (),
                timeout: float | None = None) -> Any:
        """Send request *op* with *fds* and return its result.  Re-raises
        the server's exception; ServerGone if the server is gone,
        ServerTimeout if it does not answer within *timeout* seconds
        (default: ``request_timeout``; the connection's first request,
        CONNECT_TIMEOUT)."""
        result, rfds = self.request_fds(op, *args, fds=fds, timeout=timeout)
        protocol.close_fds(rfds)
        return result

    def request_fds(self, op: str, *args: Any, fds: list[int] | tuple[int, ...] = (),
                    timeout: float | None = None) -> tuple[Any, list[int]]:
        """:meth:`request`, and the fds its reply brought (the caller's)."""
        if timeout is None:
            timeout = CONNECT_TIMEOUT if op in ("attach", "adopt") else self.request_timeout
        with self._lock:
            if self._dead:
                raise protocol.ServerGone(self._dead)
            self._seq += 1
            self._sock.settimeout(timeout)
            try:
                reply, rfds = self._exchange(protocol.encode_request(op, *args, seq=self._seq), fds)
            except TimeoutError:
                # stuck, perhaps not dead (the watchdog sees a death): the
                # reply, if it ever comes, is dropped by its number
                raise protocol.ServerTimeout(op, timeout, self.path) from None
            except OSError as e:
                self._dead = os.strerror(e.errno) if e.errno else str(e)
                raise protocol.ServerGone(self._dead) from None
            if reply is None:
                self._dead = "end of file on the connection"
                raise protocol.ServerGone(self._dead)
        try:
            result = reply.result()
        except BaseException:
            protocol.close_fds(rfds)
            raise
        if len(rfds) > protocol.REQUESTS[op].fds_out:
            protocol.close_fds(rfds)
            raise protocol.ProtocolError(f"{op}: the reply brought {len(rfds)} fds")
        return result, rfds

    def _exchange(self, payload: bytes,
                  fds: list[int] | tuple[int, ...]) -> tuple[protocol.Reply | None, list[int]]:
        """Send a request and read its reply (None: end of file).  Replies
        to earlier requests, whose wait a signal's exception cut off after
        they went out, are read and dropped (see protocol).  => ``_lock``
        held."""
        protocol.fdpass.send(self._sock, payload, fds)
        while True:
            payload, rfds = protocol.recv(self._sock)
            if not payload:
                return None, []
            reply = protocol.decode_reply(payload)
            if reply.seq == self._seq:
                return reply, rfds
            protocol.close_fds(rfds)

    def ping(self) -> int:
        """A round trip to the server; its pid."""
        pid: int = self.request("ping")
        return pid

    # -------------------------------------------------------- maps

    def grant(self, target: int | str, length: int, offset: int, prot: int, flags: int) -> tuple[int, int]:
        """The server's grant of a map of the file open on descriptor
        *target*, or of the object at URL *target*: (its id, the object's
        memfd, which the caller closes)."""
        if isinstance(target, str):
            result, fds = self.request_fds("map_url", target, length, offset, prot, flags)
        else:
            result, fds = self.request_fds("map", length, offset, prot, flags, fds=[target])
        if len(fds) != 1:
            protocol.close_fds(fds)
            raise protocol.ProtocolError("map: the reply brought no memfd")
        return int(result["id"]), fds[0]

    def release(self, grant: int) -> None:
        """Give back a grant that was never mapped (best effort)."""
        with suppress(OSError):
            self.request("release", grant)

    def track(self, m: HwMmap) -> None:
        self._maps.add(m)

    def untrack(self, m: HwMmap) -> None:
        self._maps.discard(m)

    def mmap(self, fileno: SupportsIndex, length: SupportsIndex, flags: SupportsIndex = 1,
             prot: SupportsIndex = RW, access: SupportsIndex = 0, offset: SupportsIndex = 0, *,
             trackfd: bool = True) -> HwMmap:
        """``mmap.mmap``'s arguments: a hardware map in this VM."""
        if self.closed:
            raise ValueError("the VM is closed")
        return HwMmap(fileno, length, flags, prot, access, offset, trackfd=trackfd, vm=self)

    def map(self, target: str | os.PathLike[str] | int, length: int = 0, flags: int = 1, prot: int = RW,
            access: int = 0, offset: int = 0) -> HwMmap:
        """A map of *target* (a path, a descriptor or the URL of an object),
        as ``vnpager.VM.map``: a path is opened read-write where the host
        allows, else read-only; a URL is looked up in its store by the
        server (see :meth:`mount_objects`), and a read-only store (HTTP)
        needs ``prot=PROT_READ``."""
        if isinstance(target, int):
            return self.mmap(target, length, flags, prot, access, offset)
        if is_url(target):
            if self.closed:
                raise ValueError("the VM is closed")
            return HwMmap.of_url(self, str(target), length, flags, prot, access, offset)
        with _opened(target) as fd:
            return self.mmap(fd, length, flags, prot, access, offset)

    def mount_objects(self, fs: Any, policy: Any = None, staging_dir: str | os.PathLike[str] | None = None,
                      **storage_options: Any) -> ObjectMount:
        """The objects of an object store as files of the server's VM, as
        ``vnpager.VM.mount_objects`` (the same arguments): *fs* is a protocol
        or URL (``"s3"``, ``"s3://bucket"``) and *storage_options* fsspec's
        for it, or an fsspec filesystem, which the server makes again from
        its protocol and ``storage_options``.  They travel to the server
        over its Unix socket (credentials too: the socket is private to
        those who may connect), so they must be JSON (TypeError if not).
        The mount is the server VM's: the last made for a protocol serves
        its URLs for every client; the same arguments again are the same
        mount (so clients share its objects' pages).  *staging_dir* is a
        directory of the server's host."""
        if not isinstance(fs, str):
            if storage_options:
                raise TypeError("storage_options make a filesystem: pass a protocol, not one")
            options = getattr(fs, "storage_options", None)
            if not isinstance(options, dict) or not hasattr(fs, "protocol"):
                raise TypeError(f"not an fsspec filesystem: {fs!r}")
            fs, storage_options = protocols(fs)[0], dict(options)
        policy_fields = dataclasses.asdict(policy) if policy is not None else None
        staging = os.fspath(staging_dir) if staging_dir is not None else None
        try:
            json.dumps([storage_options, policy_fields])
        except (TypeError, ValueError) as e:
            raise TypeError(f"a hardware VM's storage_options go to its server as JSON: {e}") from None
        mount_id = self.request("mount_objects", fs, storage_options, policy_fields, staging)
        return ObjectMount(self, fs.split("://", 1)[0], mount_id)

    # -------------------------------------------------------- file I/O

    def pread(self, target: str | os.PathLike[str] | int, n: int, off: int) -> bytes:
        """Up to *n* bytes at *off* of *target* (a path or a descriptor),
        through the server's pages, as the software VM's ``pread``."""
        with RemoteFile(self, target, PROT_READ) as f:
            return f.pread(n, off)

    def pwrite(self, target: str | os.PathLike[str] | int, data: bytes | bytearray | memoryview,
               off: int) -> int:
        """Write *data* at *off* of *target* into the server's pages (dirty,
        seen at once by every map of the file; the file grows), as the
        software VM's ``pwrite``."""
        with RemoteFile(self, target, PROT_READ | PROT_WRITE) as f:
            return f.pwrite(data, off)

    def open(self, target: str | os.PathLike[str] | int, mode: str = "r") -> HwFile:
        """A raw file object whose I/O goes through the server's pages (see
        HwFile), as the software VM's ``open``."""
        return HwFile(self, target, mode)

    def statistics(self) -> dict[str, Any]:
        """This client's space in the server: its counters, as the server
        keeps them (faults served, pages entered, poisoned, ...)."""
        stats: dict[str, Any] = self.request("statistics")
        return stats

    def stats(self) -> dict[str, int]:
        """The server VM's ``stats()``, shared by all its clients: the
        counters of uvmexp and the state of memory (``resident``,
        ``frames_resident``: pages in all the memfds, ...), and ``npages``."""
        stats: dict[str, int] = self.request("vmstats")
        return stats

    def quiesce(self, timeout: float = 10.0) -> None:
        """Wait until the server VM is idle (its page daemon and writes:
        ``vm.quiesce``), so that counters read next change only by what the
        caller does.  TimeoutError after *timeout* seconds."""
        self.request("quiesce", timeout, timeout=timeout + self.request_timeout)

    @property
    def npages(self) -> int:
        """The server VM's page frames (its physmem in pages), for all its clients."""
        return self.stats()["npages"]

    page_size = PAGE_SIZE

    @property
    def physmem(self) -> int:
        return self.npages * self.page_size

    def check_invariants(self) -> None:
        """Run the server VM's invariant checks (VNPAGER_DEBUG's)."""
        self.request("check_invariants")

    # -------------------------------------------------------- life

    def close(self) -> None:
        """Close every map (writing back what they wrote), disconnect, stop
        the watchdog, and stop a private server (which writes back every
        dirty page and exits).  The first map error is raised at the end.
        A map that cannot be closed (BufferError: a memoryview or numpy
        array of it lives on) is revoked: touching it is SIGSEGV, not a
        read of zeros."""
        if self.closed:
            return
        self.closed = True
        _live.discard(self)
        error: BaseException | None = None
        for m in list(self._maps):
            try:
                m.close()
            except BufferError as e:
                m.revoke()
                error = error or e
            except OSError as e:
                error = error or e
        self._teardown()
        if error is not None:
            raise error

    def _teardown(self) -> None:
        """Disconnect, stop the watchdog, stop our private server."""
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()  # the server's session closes our space
        _stop(self._watchdog)
        self._watchdog = None
        _stop(self._server)
        self._server = None
        self.uffd.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("server gone" if self._dead else f"server {self.server_pid}")
        return f"<HardwareVM {self.path} {state}>"

    # -------------------------------------------------------- fork

    def _after_fork_in_child(self) -> None:
        """In a forked child: our own connection and watchdog, adopting the
        space the fork event made.  The parent's connection, uffd and
        processes stay the parent's (we only close our copies)."""
        self._lock = threading.Lock()  # another thread may have held it at fork
        self.space_lock = threading.RLock()
        self._seq = 0
        self._server = self._watchdog = None  # the parent's children, not ours
        parent, features = self.session, self.uffd.features
        os.close(self._sock.detach())
        self.uffd.close()
        if self._dead:
            return
        try:
            self._sock = self._connect()
            (self.session, self.server_pid), fds = self.request_fds("adopt", parent)
            if fds:  # the kernel gave the child's uffd to the server; its copy for our watchdog
                self.uffd = Uffd(fds[0], features)
                self._start_watchdog(self.uffd)
        except OSError as e:
            self._dead = f"the forked child could not adopt its space: {e}"


class ObjectMount:
    """A client's handle on an objfs mount of its server's VM
    (:meth:`HardwareVM.mount_objects`): its protocol, and its counters."""

    def __init__(self, vm: HardwareVM, protocol: str, mount_id: int) -> None:
        self.vm, self.protocol, self.id = vm, protocol, mount_id

    def statistics(self) -> dict[str, int]:
        """The mount's requests, as the server counts them (gets,
        bytes_fetched, heads, parts_uploaded, bytes_uploaded, ...: objfs's
        ``ObjMount.statistics()``), for all the clients that use it."""
        stats: dict[str, int] = self.vm.request("objstats", self.id)
        return stats

    def __repr__(self) -> str:
        return f"<ObjectMount {self.protocol} {self.id} of {self.vm!r}>"


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM *proc* and wait; SIGKILL it if it does not exit in time."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT)


@contextmanager
def _opened(path: str | os.PathLike[str]) -> Iterator[int]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _fork_child() -> None:
    for vm in list(_live):
        if not vm.closed:
            vm._after_fork_in_child()


os.register_at_fork(after_in_child=_fork_child)
