"""The pager server: an accept loop, a session per client, one VM for all.

``python -m vnpager serve --socket PATH --physmem SIZE`` runs one for many
processes (``vnpager.VM.connect(PATH)``); ``vnpager.VM(mmu="hardware")``
starts a private one as its child (``--listen-fd``, ``--parent-pid``),
which dies with its parent.

Each connection gets a :class:`Session` thread that reads one request at a
time (:mod:`.protocol`), calls the client's :class:`~.space.ClientSpace`
and replies.  The client's pid is the kernel's word (SO_PEERCRED), not the
client's.  End of file or a reset on the socket means the client is gone:
the session closes its space (unmaps everything, drops its references),
and the objects persist in the VM with their pages.  The server never
waits for a client: faults are served by each space's own fault thread,
whatever the sessions do.

Stopping (SIGTERM, SIGINT, the parent's death, :meth:`Server.shutdown`):
stop accepting, end every session (its space is closed), then close the
VM, which writes every dirty page back, so a server stopped cleanly loses
nothing its clients wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import select
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, Protocol

from vnpager.arch.uffd import Uffd
from vnpager.server import protocol
from vnpager.server.objects import ObjectMounts, check_url
from vnpager.uvm import uvm

#: How long a stop waits for each session thread, then for the VM's close.
STOP_TIMEOUT = 60.0


class Space(Protocol):
    """What a session calls on a client's address space: the API of
    :class:`vnpager.server.space.ClientSpace` (hw-design.md), stated here so
    that the boundary does not depend on how the space is built."""

    def map(self, target: int | str, length: int, offset: int, prot: int, flags: int) -> Any: ...
    def mapped(self, grant_id: int, addr: int, length: int) -> None: ...
    def unmap(self, addr: int) -> None: ...
    def flush(self, addr: int, offset: int, size: int) -> None: ...
    def madvise(self, addr: int, start: int, length: int, advice: int) -> None: ...
    def resize(self, addr: int, newsize: int) -> None: ...
    def moved(self, addr: int, newaddr: int, length: int) -> None: ...
    def size(self, addr: int) -> int: ...
    def adopt_fork(self, pid: int) -> Space: ...
    def close(self) -> None: ...
    def statistics(self) -> Any: ...
    def fopen(self, target: int | str, prot: int, create: bool = False, excl: bool = False) -> int: ...
    def fread(self, handle: int, n: int, off: int) -> bytes: ...
    def fwrite(self, handle: int, off: int, data: bytes) -> int: ...
    def fsize(self, handle: int) -> int: ...
    def ftruncate(self, handle: int, size: int) -> None: ...
    def fsync(self, handle: int) -> None: ...
    def fclose(self, handle: int, sync: bool) -> None: ...


SpaceFactory = Callable[[uvm.VM, Uffd, int], Space]


def client_space(vm: uvm.VM, uffd: Uffd, pid: int) -> Space:
    """The real space of a client (imported here: the machine's module)."""
    from vnpager.server.space import ClientSpace

    space: Space = ClientSpace(vm, uffd, pid)
    return space


def parent_of(pid: int) -> int:
    """The parent pid of *pid* (/proc/PID/stat's fourth field), 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    return int(stat[stat.rindex(b")") + 2:].split()[1])


def _plain(result: Any) -> Any:
    """A space's result as JSON can carry it (statistics are dataclasses,
    read bytes base64)."""
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return dataclasses.asdict(result)
    if isinstance(result, bytes):
        return protocol.pack(result)
    return result


class Session(threading.Thread):
    """One client connection, served by this thread until end of file.

    ``space`` is set by the ``attach`` or ``adopt`` request and read by
    other sessions' ``adopt`` (a forked child's session finds its parent's
    space): a single reference store, atomic under the GIL.  ``id`` names
    the session to the client (a process may hold several connections, so
    its pid would not do), which a forked child gives back to adopt.
    """

    def __init__(self, server: Server, sock: socket.socket, session_id: int) -> None:
        self.pid = protocol.peer_pid(sock)
        self.id = session_id
        super().__init__(name=f"session-{self.pid}-{session_id}", daemon=True)
        self.server = server
        self.sock = sock
        self.space: Space | None = None

    def run(self) -> None:
        try:
            while self._serve_one():
                pass
        finally:
            self.server.gone(self)
            space, self.space = self.space, None
            try:
                if space is not None:
                    space.close()
            finally:
                self.sock.close()

    def _serve_one(self) -> bool:
        """Read a request, answer it; False when the client is gone or the
        connection broke the protocol."""
        try:
            payload, fds = protocol.recv(self.sock)
        except OSError:
            return False  # the socket was shut down under us (a stop)
        if not payload:
            return False
        try:
            op, kind, args, seq = protocol.decode_request(payload, fds)
        except protocol.ProtocolError as e:
            protocol.close_fds(fds)
            self._reply(protocol.encode_error(e), [])
            return False
        out: list[int] = []
        try:
            if kind.needs_space and self.space is None:
                raise protocol.ProtocolError(f"{op} before attach")
            result, out = self._call(op, args, fds)
            reply = protocol.encode_result(_plain(result), seq)
        except Exception as e:
            if type(e).__name__ not in protocol.EXCEPTIONS and not isinstance(e, OSError):
                traceback.print_exc(file=sys.stderr)  # a server bug: keep its stack
            reply = protocol.encode_error(e, seq)
        finally:
            if op != "attach":  # attach's uffd is the space's now
                protocol.close_fds(fds)
        return self._reply(reply, out)

    def _reply(self, reply: bytes, fds: list[int]) -> bool:
        try:
            protocol.fdpass.send(self.sock, reply, fds)
        except OSError:
            return False
        return True

    def _call(self, op: str, args: list[Any], fds: list[int]) -> tuple[Any, list[int]]:
        """Do request *op*: (its result, the fds the reply brings).
        => the request fits the table; a space exists if it needs one."""
        space = self.space
        if op == "ping":
            return os.getpid(), []
        if op == "check_invariants":
            self.server.vm.check_invariants()
            return None, []
        if op == "quiesce":
            self.server.vm.quiesce(float(args[0]))
            return None, []
        if op == "vmstats":
            return {**dataclasses.asdict(self.server.vm.stats()), "npages": self.server.vm.npages}, []
        if op == "attach":
            return self._attach(fds[0], int(args[0])), []
        if op == "adopt":
            return self._adopt(int(args[0]))
        if op == "mount_objects":
            return self.server.objects.mount(*args), []
        if op == "objstats":
            return self.server.objects.statistics(int(args[0])), []
        assert space is not None
        if op in ("map", "map_url", "fopen", "fopen_url"):
            # a file the client opened (its descriptor), or an object by its URL
            target = fds[0] if op in ("map", "fopen") else check_url(args.pop(0))
            if op.startswith("fopen"):
                return space.fopen(target, *args), []
            grant = space.map(target, *args)
            return {"id": grant.id, "size": grant.size}, [grant.memfd]
        method: Callable[..., Any] = getattr(space, op)
        return method(*args), []

    def _attach(self, fd: int, features: int) -> tuple[int, int]:
        """Make the client's space over its uffd *fd* (opened with
        *features*); (the session's id, the server's pid)."""
        if self.space is not None:
            os.close(fd)
            raise protocol.ProtocolError("attach twice")
        uffd = Uffd(fd, features)
        try:
            self.space = self.server.space_factory(self.server.vm, uffd, self.pid)
        except BaseException:
            uffd.close()
            raise
        return self.id, os.getpid()

    def _adopt(self, parent_id: int) -> tuple[tuple[int, int], list[int]]:
        """The space the fork event of session *parent_id*'s client made
        for this client, which must be that process's child (the kernel
        says so, not the client)."""
        if self.space is not None:
            raise protocol.ProtocolError("adopt after attach")
        parent = self.server.session_of(parent_id)
        if parent is None or parent.space is None:
            raise OSError(errno.ESRCH, f"session {parent_id} has no address space here")
        if parent_of(self.pid) != parent.pid:
            raise OSError(errno.EPERM, f"pid {self.pid} is not a child of pid {parent.pid}")
        self.space = space = parent.space.adopt_fork(self.pid)
        uffd: Uffd | None = getattr(space, "uffd", None)
        return (self.id, os.getpid()), [uffd.fd] if uffd is not None else []


class Server:
    """Sessions over one listening socket, sharing *vm*.

    ``sessions`` (id -> session) and ``next_id`` are guarded by ``lock``;
    ``objects`` are the objfs mounts its clients made (:mod:`.objects`).
    """

    def __init__(self, vm: uvm.VM, listener: socket.socket,
                 space_factory: SpaceFactory = client_space) -> None:
        self.vm = vm
        self.listener = listener
        self.space_factory = space_factory
        self.objects = ObjectMounts(vm)
        self.lock = threading.Lock()
        self.sessions: dict[int, Session] = {}
        self.next_id = 1
        self.stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def session_of(self, session_id: int) -> Session | None:
        with self.lock:
            return self.sessions.get(session_id)

    def gone(self, session: Session) -> None:
        with self.lock:
            self.sessions.pop(session.id, None)

    def serve_forever(self) -> None:
        """Accept clients until :meth:`shutdown`; then stop (see module doc)."""
        try:
            while not self.stopping.is_set():
                ready, _, _ = select.select([self.listener.fileno(), self._wake_r], [], [])
                if self.listener.fileno() in ready and not self.stopping.is_set():
                    self._accept()
        finally:
            self._stop()

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        sock.setblocking(True)
        with self.lock:
            session = Session(self, sock, self.next_id)
            self.next_id += 1
            self.sessions[session.id] = session  # a forked child's adopt looks its parent up here
        session.start()

    def shutdown(self) -> None:
        """Ask :meth:`serve_forever` to stop (from any thread or a signal handler)."""
        self.stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _stop(self) -> None:
        self.listener.close()
        with self.lock:
            sessions = list(self.sessions.values())
        for session in sessions:
            with contextlib.suppress(OSError):  # its recv returns: it closes its space
                session.sock.shutdown(socket.SHUT_RDWR)
        for session in sessions:
            session.join(STOP_TIMEOUT)
        self.vm.close()  # writes back every dirty page
        os.close(self._wake_r)
        os.close(self._wake_w)


def make_vm(physmem: int | str | None) -> uvm.VM:
    """The server's VM: the MI code on the uffd machine."""
    return uvm.VM(physmem, machine="uffd")


def listen(path: str) -> socket.socket:
    """A listening SOCK_SEQPACKET socket at *path* (``@name``: abstract).
    A stale socket file left by a dead server is replaced; a live one is
    EADDRINUSE."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        addr = protocol.address(path)
        if isinstance(addr, str) and os.path.exists(addr):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(addr)
            except ConnectionRefusedError:
                os.unlink(addr)  # nobody listens: a dead server's
            else:
                raise OSError(errno.EADDRINUSE, f"a server is listening at {path}")
            finally:
                probe.close()
        sock.bind(addr)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock


def watch_parent(server: Server, parent_pid: int) -> None:
    """Stop *server* when process *parent_pid* exits (a pidfd, so no race
    with pid reuse); if it is gone already, stop now."""
    try:
        pidfd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        server.shutdown()
        return

    def wait() -> None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.poll()
        server.shutdown()

    threading.Thread(target=wait, name="parent-watch", daemon=True).start()


def serve(path: str | None = None, physmem: int | str | None = None, *, listen_fd: int | None = None,
          parent_pid: int | None = None, space_factory: SpaceFactory = client_space,
          ready: Callable[[], None] | None = None, vm: uvm.VM | None = None) -> None:
    """Run a server until SIGTERM/SIGINT (or its parent's death, with
    *parent_pid*), at *path* or on the listening socket *listen_fd* (an
    embedded server's, made by its parent), over *vm* (by default a new
    one of *physmem*, see make_vm), which it closes at the end.  *ready*
    is called once it accepts."""
    listener = socket.socket(fileno=listen_fd) if listen_fd is not None else listen(path or "")
    try:
        vm = vm if vm is not None else make_vm(physmem)
    except BaseException:
        listener.close()
        raise
    server = Server(vm, listener, space_factory)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: server.shutdown())
    if parent_pid is not None:
        watch_parent(server, parent_pid)
    if ready is not None:
        ready()
    try:
        server.serve_forever()
    finally:
        if path is not None and not path.startswith("@"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
