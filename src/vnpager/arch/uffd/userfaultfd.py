"""userfaultfd(2): open one, shake hands, register ranges, resolve faults.

Standard library only: the syscall through ctypes, the ioctls through
fcntl.ioctl with the structures of :mod:`.uapi` packed by ``struct``.
Every failed ioctl raises OSError with the kernel's errno and a message
naming the ioctl and the range, so a server's log says what it was doing.

Who calls what: the *client* (the process whose address space is watched)
opens the uffd and registers its mappings, because a uffd watches the
address space of the process that created it.  It may then hand the fd to
a pager server (:mod:`.fdpass`); the range ioctls (COPY, CONTINUE,
WRITEPROTECT, POISON, WAKE) name addresses of the *client's* address
space, whichever process issues them.  The fault handler must be another
process: a thread blocked in a fault usually holds the GIL.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from . import libc, uapi
from .errors import DEVICE, missing_features, not_permitted
from .fdobject import FdObject

#: What the pager server needs: shmem minor faults (the server fills the
#: memfd, CONTINUE maps it), missing faults on shmem, write-protect of
#: shmem that resolves itself and is read back by PAGEMAP_SCAN, and fork
#: events: without them a forked child's mapping is not registered, and
#: its touch of a missing page silently allocates a page of zeros in the
#: shared memfd, for every client to see.  With them, the child's fork
#: waits until the server has read the event, which brings the child's
#: own uffd (:attr:`UffdMsg.ufd`).
SERVER_FEATURES = (
    uapi.UFFD_FEATURE_EVENT_FORK
    | uapi.UFFD_FEATURE_MISSING_SHMEM
    | uapi.UFFD_FEATURE_MINOR_SHMEM
    | uapi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    | uapi.UFFD_FEATURE_WP_ASYNC
)
#: What a client of the uffd machine (``uvm.VM(machine="uffd")``) opens its
#: uffd with: the server's features but WP_ASYNC, so that a store to a
#: write-protected page is a synchronous fault the server sees (PG_MOD).
MACHINE_FEATURES = SERVER_FEATURES & ~uapi.UFFD_FEATURE_WP_ASYNC
#: Taken when the kernel has them: POISON turns a read error into SIGBUS
#: for the faulting access; THREAD_ID names the faulting thread.
OPTIONAL_FEATURES = uapi.UFFD_FEATURE_POISON | uapi.UFFD_FEATURE_THREAD_ID

FEATURE_NAMES = {
    v: k.removeprefix("UFFD_FEATURE_") for k, v in vars(uapi).items() if k.startswith("UFFD_FEATURE_")
}


def _sys_userfaultfd(flags: int) -> int:
    """userfaultfd(2) itself: a new fd, or OSError."""
    return libc.syscall(uapi.NR_userfaultfd, flags, what="userfaultfd")


def _dev_userfaultfd(flags: int, device: str) -> int:
    """A new uffd from /dev/userfaultfd (Linux 6.1): whoever may open the
    device gets one, whatever ``vm.unprivileged_userfaultfd`` says."""
    dev = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        return fcntl.ioctl(dev, uapi.USERFAULTFD_IOC_NEW, flags)
    finally:
        os.close(dev)


def open_fd(
    flags: int = os.O_CLOEXEC | os.O_NONBLOCK,
    *,
    syscall: Callable[[int], int] = _sys_userfaultfd,
    device: str = DEVICE,
) -> int:
    """A new userfaultfd, before its handshake.

    The syscall first; if it is refused (EPERM: non-root with the sysctl
    at 0; ENOSYS) the device.  If both are refused, UffdUnavailable
    naming the fix.  *syscall* and *device* are seams: a test or a host
    with the device elsewhere passes its own.  We never ask for
    UFFD_USER_MODE_ONLY: faults the kernel takes on the client's behalf
    (os.write or a socket send from a missing page) must reach the server.
    """
    try:
        return syscall(flags)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EACCES, errno.ENOSYS):
            raise
        err_syscall = e.errno or errno.EPERM
    try:
        return _dev_userfaultfd(flags, device)
    except FileNotFoundError:
        raise not_permitted(err_syscall, None) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EACCES, errno.ENOTTY):
            raise
        raise not_permitted(err_syscall, e.errno) from None


def _api(fd: int, features: int) -> tuple[int, int]:
    """UFFDIO_API on *fd*: (features the kernel offers, ioctls allowed)."""
    buf = bytearray(struct.pack(uapi.UFFDIO_API_FMT, uapi.UFFD_API, features, 0))
    try:
        fcntl.ioctl(fd, uapi.UFFDIO_API, buf)
    except OSError as e:
        raise OSError(e.errno, f"UFFDIO_API features {features:#x}: {os.strerror(e.errno or 0)}") from None
    _, offered, ioctls = struct.unpack(uapi.UFFDIO_API_FMT, buf)
    return offered, ioctls


def supported_features(
    flags: int = os.O_CLOEXEC | os.O_NONBLOCK,
    *,
    syscall: Callable[[int], int] = _sys_userfaultfd,
    device: str = DEVICE,
) -> int:
    """The features this kernel's userfaultfd offers, from a handshake on a
    throw-away fd (a uffd takes one UFFDIO_API only)."""
    fd = open_fd(flags, syscall=syscall, device=device)
    try:
        return _api(fd, 0)[0]
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class UffdMsg:
    """One ``struct uffd_msg``: the event and its three union words, with
    the pagefault fields named (the other events' are there raw)."""

    event: int
    arg0: int
    arg1: int
    arg2: int

    @classmethod
    def decode(cls, data: bytes | memoryview, offset: int = 0) -> UffdMsg:
        event, _r1, _r2, _r3, a0, a1, a2 = struct.unpack_from(uapi.UFFD_MSG_FMT, data, offset)
        return cls(event, a0, a1, a2)

    @property
    def is_pagefault(self) -> bool:
        return self.event == uapi.UFFD_EVENT_PAGEFAULT

    @property
    def flags(self) -> int:
        """UFFD_PAGEFAULT_FLAG_*: WRITE, WP (write to a protected page),
        MINOR (the page is in the memfd, only the PTE is missing)."""
        return self.arg0

    @property
    def address(self) -> int:
        """The faulting address (page-aligned unless EXACT_ADDRESS)."""
        return self.arg1

    @property
    def ptid(self) -> int:
        """The faulting thread (with UFFD_FEATURE_THREAD_ID), else 0."""
        return self.arg2 & 0xFFFFFFFF

    @property
    def ufd(self) -> int:
        """UFFD_EVENT_FORK: the child's new uffd, an fd installed in the
        reader's own table (the reader owns it)."""
        return self.arg0 & 0xFFFFFFFF

    @property
    def is_write(self) -> bool:
        return bool(self.arg0 & uapi.UFFD_PAGEFAULT_FLAG_WRITE)

    @property
    def is_wp(self) -> bool:
        return bool(self.arg0 & uapi.UFFD_PAGEFAULT_FLAG_WP)

    @property
    def is_minor(self) -> bool:
        return bool(self.arg0 & uapi.UFFD_PAGEFAULT_FLAG_MINOR)


class Uffd(FdObject):
    """A userfaultfd after its handshake, and the features it enabled.

    ``fd`` is owned: :meth:`close` (or the with-block) closes it.  The
    methods are thread-safe as the kernel's ioctls are; the object keeps
    no state beyond the fd and its features.
    """

    __slots__ = ("features", "ioctls")

    def __init__(self, fd: int, features: int, ioctls: int = 0) -> None:
        super().__init__(fd)
        self.features = features
        self.ioctls = ioctls

    @classmethod
    def open(
        cls,
        features: int = SERVER_FEATURES,
        optional: int = OPTIONAL_FEATURES,
        *,
        flags: int = os.O_CLOEXEC | os.O_NONBLOCK,
        syscall: Callable[[int], int] = _sys_userfaultfd,
        device: str = DEVICE,
    ) -> Uffd:
        """A uffd with every feature of *features* and those of *optional*
        the kernel offers.  UffdUnavailable if userfaultfd is not
        permitted or the kernel lacks one of *features* (it names what)."""
        offered = supported_features(flags, syscall=syscall, device=device)
        lacking = features & ~offered
        missing = [FEATURE_NAMES.get(1 << i, hex(1 << i)) for i in range(64) if lacking & (1 << i)]
        if missing:
            raise missing_features(missing)
        want = features | (optional & offered)
        fd = open_fd(flags, syscall=syscall, device=device)
        try:
            _, ioctls = _api(fd, want)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, want, ioctls)

    def has(self, feature: int) -> bool:
        return self.features & feature == feature

    def _ioctl(self, name: str, req: int, fmt: str, *fields: int) -> int:
        """One range ioctl: pack *fields*, call, and return the last field
        as the kernel wrote it back (the progress word of COPY, CONTINUE
        and POISON; the allowed ioctls of REGISTER)."""
        buf = bytearray(struct.pack(fmt, *fields))
        try:
            fcntl.ioctl(self.fd, req, buf)
        except OSError as e:
            err = e.errno or 0
            msg = f"{name} [{fields[0]:#x}, +{fields[1]:#x}): {os.strerror(err)}"
            if err == errno.EAGAIN:
                # The client's address space is changing (fork, mremap, an
                # event not yet read): the caller reads events and retries
                # from where the kernel stopped.
                done = max(int(struct.unpack(fmt, buf)[-1]), 0)
                raise BlockingIOError(err, msg, done) from None
            raise OSError(err, msg) from None
        return int(struct.unpack(fmt, buf)[-1])

    def register(self, start: int, length: int, mode: int) -> int:
        """UFFDIO_REGISTER [start, start+length) with *mode*
        (UFFDIO_REGISTER_MODE_MISSING | MINOR | WP); the range ioctls the
        kernel allows on it."""
        return self._ioctl("UFFDIO_REGISTER", uapi.UFFDIO_REGISTER, uapi.UFFDIO_REGISTER_FMT,
                           start, length, mode, 0)

    def unregister(self, start: int, length: int) -> None:
        self._ioctl("UFFDIO_UNREGISTER", uapi.UFFDIO_UNREGISTER, uapi.UFFDIO_RANGE_FMT, start, length)

    def copy(self, dst: int, src: int, length: int, *, wp: bool = False, wake: bool = True) -> int:
        """UFFDIO_COPY: fill a missing range from *src* (an address in the
        caller's own space) and map it; bytes copied.  For anonymous
        memory: shmem regions are filled through the memfd and CONTINUEd."""
        mode = (0 if wake else uapi.UFFDIO_COPY_MODE_DONTWAKE) | (uapi.UFFDIO_COPY_MODE_WP if wp else 0)
        return self._ioctl("UFFDIO_COPY", uapi.UFFDIO_COPY, uapi.UFFDIO_COPY_FMT,
                           dst, src, length, mode, 0)

    def continue_range(self, start: int, length: int, *, wp: bool = False, wake: bool = True) -> int:
        """UFFDIO_CONTINUE: map [start, start+length) onto the pages already
        in the memfd; bytes mapped.  *wp* maps them write-protected, so the
        first write is seen (with WP_ASYNC, by PAGEMAP_SCAN).

        EEXIST: part of the range was mapped already (another fault won);
        the kernel stopped there and woke nobody -- the caller wakes.
        ENOENT: a page of the range is not in the memfd.  ESRCH: the
        client's address space is gone (it died)."""
        mode = 0 if wake else uapi.UFFDIO_CONTINUE_MODE_DONTWAKE
        mode |= uapi.UFFDIO_CONTINUE_MODE_WP if wp else 0
        return self._ioctl("UFFDIO_CONTINUE", uapi.UFFDIO_CONTINUE, uapi.UFFDIO_CONTINUE_FMT,
                           start, length, mode, 0)

    def resolve(self, start: int, length: int, *, wp: bool = False) -> int:
        """Map [start, start+length) onto the memfd's pages (CONTINUE) and
        wake its faults; bytes newly mapped.

        Pages found mapped already (EEXIST) are stepped over, not an error:
        two faults in one cluster race to map it, and a cluster keeps the
        pages that were not evicted.  The kernel stops at such a page and
        reports the progress before it (EAGAIN), so we go on from there.
        => every page of the range is in the memfd (else ENOENT).
        """
        pos, end, mapped, skipped = start, start + length, 0, False
        while pos < end:
            try:
                done = self.continue_range(pos, end - pos, wp=wp)
            except BlockingIOError as e:
                if not e.characters_written:
                    raise  # the address space is changing: read events first
                done = e.characters_written
            except OSError as e:
                if e.errno != errno.EEXIST:
                    raise
                pos += mmap.PAGESIZE
                skipped = True
                continue
            mapped += done
            pos += done
        if skipped:
            # A fault waiting on a page someone else mapped is woken here.
            self.wake(start, length)
        return mapped

    def writeprotect(self, start: int, length: int, protect: bool = True, *, wake: bool = True) -> None:
        """UFFDIO_WRITEPROTECT: set (or clear) write-protection of a range
        registered MODE_WP.  The kernel refuses MODE_WP with DONTWAKE
        (EINVAL), so *wake* only matters when clearing."""
        mode = uapi.UFFDIO_WRITEPROTECT_MODE_WP if protect else (
            0 if wake else uapi.UFFDIO_WRITEPROTECT_MODE_DONTWAKE)
        self._ioctl("UFFDIO_WRITEPROTECT", uapi.UFFDIO_WRITEPROTECT, uapi.UFFDIO_WRITEPROTECT_FMT,
                    start, length, mode)

    def poison(self, start: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_POISON: the next access to the range (and the one waiting
        now, once woken) gets SIGBUS, as a read error does under the
        kernel's mmap; bytes poisoned.  Needs UFFD_FEATURE_POISON.

        => no PTE and no write-protect marker in the range (else EEXIST):
        on a range registered MODE_WP, clear the protection first
        (``writeprotect(start, length, False, wake=False)``)."""
        mode = 0 if wake else uapi.UFFDIO_POISON_MODE_DONTWAKE
        return self._ioctl("UFFDIO_POISON", uapi.UFFDIO_POISON, uapi.UFFDIO_POISON_FMT,
                           start, length, mode, 0)

    def wake(self, start: int, length: int) -> None:
        """UFFDIO_WAKE: retry the faults waiting on the range."""
        self._ioctl("UFFDIO_WAKE", uapi.UFFDIO_WAKE, uapi.UFFDIO_RANGE_FMT, start, length)

    def read_events(self, max_events: int = 64) -> list[UffdMsg]:
        """The events queued now, at most *max_events*; [] if none (the fd
        is non-blocking).  A client that died queues nothing: watch its
        socket or pidfd for that."""
        try:
            data = os.read(self.fd, uapi.UFFD_MSG_SIZE * max_events)
        except BlockingIOError:
            return []
        return [UffdMsg.decode(data, off) for off in range(0, len(data), uapi.UFFD_MSG_SIZE)]
