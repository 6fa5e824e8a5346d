"""A client process's address space, in the pager server (the uffd machine).

A :class:`ClientSpace` is the server's side of one client process: a
Vmspace of the VM (``uvm.VM(machine="uffd")``) whose pmap is bound to the
client's userfaultfd, the client's maps in it (each a
:class:`~vnpager.vnmap.FileObject`: a reference, an errseq cursor), and
two threads that serve the client's faults:

* the *reader* polls the uffd and reads its events at once, whatever the
  VM is doing: page faults go to the worker's queue; a fork event (the
  child's new uffd) makes the child's space at once (see :meth:`adopt_fork`),
  because the forking client waits until the event is read and its pmap
  ioctls fail with EAGAIN meanwhile;
* the *worker* serves the faults in order: ``uvm_fault`` (the MI fault:
  fault-ahead, the pager's clustered read, read-ahead), whose pmap_update
  maps the pages with UFFDIO_CONTINUE and wakes the faulting thread; a
  fault the VM cannot serve (BusError: past the end of the file; OSError:
  a read error; SegvError: no map there) is UFFDIO_POISON, which gives the
  faulting thread SIGBUS, as the kernel's mmap does.

A write fault (a store to a missing page, or to one mapped
write-protected: the synchronous write-protect fault) is served as a write,
which sets PG_MOD; a private map (MAP_PRIVATE) is entered read-only in the
server and its write faults are served as reads: the client's kernel
copies the page on write, into the client's own anonymous memory (not
under the VM's budget).

The protocol of a map, from the client's session (``server/serve.py``):
:meth:`map` (attach the file, or the object of a URL, and hand out the
object's memfd: a :class:`Grant`), the client mmaps the memfd with the user's arguments,
:meth:`mapped` (enter the map at the client's address and REGISTER it with
the client's uffd: MISSING|MINOR, and WP for a writable shared map), then
:meth:`flush`, :meth:`madvise`, :meth:`resize`, :meth:`size` on it, and
:meth:`unmap` once the client unmapped it (:meth:`release` for a grant
it could not map).  File I/O through the pages (the client's pread,
pwrite and open): :meth:`fopen` a handle, then :meth:`fread`,
:meth:`fwrite`, :meth:`fsize`, :meth:`ftruncate`, :meth:`fsync`,
:meth:`fclose`.  :meth:`close` when the client is gone.  The server
never waits for the client: every call acts on the client's memory
through its uffd (REGISTER, CONTINUE, WRITEPROTECT, POISON act on the
uffd's address space, whoever issues them), its pidfd
(process_madvise) and the memfds (PUNCH_HOLE).

Locks: ``self.lock`` (a leaf, under no VM lock) guards ``grants``,
``maps``, ``files``, ``forked``, ``closed`` and the statistics but the fault
counters, which the reader alone writes; the map's Vmspace and pmap have
the VM's own locks.  Calls may come from the session thread
while the worker serves faults.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import mmap
import os
import queue
import select
import threading
from collections import deque
from dataclasses import dataclass, field
from functools import partial

from vnpager.arch.uffd import Process, Uffd, UffdMsg, uapi
from vnpager.arch.uffd import pmap as uffd_pmap
from vnpager.kern.errors import BusError, SegvError
from vnpager.server.protocol import MAX_DATA
from vnpager.uvm.uvm import VM
from vnpager.uvm.uvm_bio import ubc_read, ubc_write
from vnpager.uvm.uvm_fault import uvm_fault
from vnpager.uvm.uvm_map import MAP_PRIVATE, MAP_SHARED, Vmspace, uvm_map_advice
from vnpager.uvm.uvm_param import PROT_READ, PROT_WRITE
from vnpager.vnmap import FileObject

JOIN_TIMEOUT = 30.0  # seconds close() waits for a thread of the space (a fault waiting for I/O)
ADOPT_TIMEOUT = 10.0  # seconds adopt_fork waits for the fork event to be read
POLL_MS = 1000  # the reader's poll, so that it sees a dead client's pidfd too

_grant_ids = itertools.count(1)
log = logging.getLogger("vnpager.server.space")


@dataclass(frozen=True)
class Grant:
    """What :meth:`ClientSpace.map` hands out: the map's id, the object's
    memfd (the frames' fd: send it, do not close it) and the object's size."""

    id: int
    memfd: int
    size: int


@dataclass
class SpaceStatistics:
    """What a space served (``ClientSpace.statistics()``), with its pmap's."""

    faults: int = 0  # fault events served (counted as they are read)
    minor: int = 0  # ... of pages already in the memfd (UFFD_PAGEFAULT_FLAG_MINOR)
    writes: int = 0  # ... served as writes (a store to a missing or write-protected page)
    wp: int = 0  # ... synchronous write-protect faults
    poisoned: int = 0  # faults answered with UFFDIO_POISON (SIGBUS in the client)
    forks: int = 0  # fork events (child spaces made)
    maps: int = 0  # maps live now
    pmap: uffd_pmap.PmapStatistics = field(default_factory=uffd_pmap.PmapStatistics)


@dataclass(eq=False)
class _Map:
    """One map of the client: the hold on its object and its arguments."""

    file: FileObject
    length: int
    offset: int
    prot: int
    shared: bool
    va: int = -1  # the client's address, once mapped

    @property
    def end(self) -> int:
        return self.va + mmap_round(self.length)

    @property
    def entry_prot(self) -> int:
        """The protection of its entry in the server: a private map's is
        read-only (its copies on write are the client kernel's)."""
        return self.prot if self.shared else PROT_READ

    @property
    def wp(self) -> bool:
        """Registered MODE_WP: a writable shared map."""
        return self.shared and bool(self.prot & PROT_WRITE)


def mmap_round(n: int) -> int:
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE


class ClientSpace:
    """The server's side of one client process (see the module docstring).

    *uffd* is the client's userfaultfd, opened with
    ``arch.uffd.MACHINE_FEATURES`` (synchronous write-protect: not
    WP_ASYNC); the space owns it from now on.  *pid* is the client's.
    """

    def __init__(self, vm: VM, uffd: Uffd, pid: int, *, start: bool = True) -> None:
        if vm.machine is not uffd_pmap:
            raise ValueError("a ClientSpace needs a VM made with machine='uffd'")
        if uffd.has(uapi.UFFD_FEATURE_WP_ASYNC):
            raise ValueError("the client's uffd has WP_ASYNC: the uffd machine needs synchronous "
                             "write-protect faults (arch.uffd.MACHINE_FEATURES)")
        self.vm = vm
        self.uffd = uffd
        self.pid = pid
        self.space = Vmspace(vm)
        self.pmap: uffd_pmap.Pmap = self.space.pmap  # type: ignore[assignment]
        self.process = _pidfd(pid)
        self.pmap.attach(uffd, self.process)
        self.lock = threading.Lock()
        self.grants: dict[int, _Map] = {}
        self.files: dict[int, FileObject] = {}  # fopen's handles
        self.maps: dict[int, _Map] = {}  # by the client's address
        self.forked: deque[ClientSpace] = deque()
        self.forked_cv = threading.Condition(self.lock)
        self.closed = False
        self.stats = SpaceStatistics(pmap=self.pmap.stats)
        self._faults: queue.SimpleQueue[UffdMsg | None] = queue.SimpleQueue()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._reader = threading.Thread(target=self._read, name=f"uffd-reader-{pid}", daemon=True)
        self._worker = threading.Thread(target=self._work, name=f"uffd-worker-{pid}", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        """Start serving the client's faults (the constructor does, unless
        told not to: a fork's child space is filled in first)."""
        self._reader.start()
        self._worker.start()

    # ---------------------------------------------------------------- maps

    def map(self, target: int | str, length: int, offset: int, prot: int, flags: int) -> Grant:
        """Attach the file open on descriptor *target* (the client's,
        received: we keep a descriptor of our own), or the object at URL
        *target* (close-to-open: one lookup in its store), for a map of
        *length* bytes (0: to the end) from *offset*, and hand out its
        object's memfd.  Raises as CPython's mmap would: OverflowError,
        ValueError, OSError (a URL's: the store's)."""
        if length < 0:
            raise OverflowError("memory mapped length must be positive")
        if offset < 0:
            raise OverflowError("memory mapped offset must be positive")
        if offset % mmap.ALLOCATIONGRANULARITY:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        shared = not flags & MAP_PRIVATE
        prot &= PROT_READ | PROT_WRITE
        file = FileObject.open(self.vm, target, prot if shared else PROT_READ)
        try:
            file.follow_size()
            size = file.uvn.u_size
            if length == 0:
                if offset >= size:
                    raise ValueError("mmap offset is greater than file size")
                length = size - offset
            elif offset > size or size - offset < length:
                raise ValueError("mmap length is greater than file size")
            memfd = self.vm.frames.memfd(file.uvn)
        except BaseException:
            file.close()
            raise
        m = _Map(file, length, offset, prot, shared)
        grant = Grant(next(_grant_ids), memfd, size)
        with self.lock:
            self._check_open()
            self.grants[grant.id] = m
        return grant

    def mapped(self, grant_id: int, addr: int, length: int) -> None:
        """The client mapped the grant's memfd at *addr* for *length* bytes:
        enter it in the space there and register it with the client's uffd.
        A map of ours still at that range (the client unmapped it without
        telling) is dropped first."""
        with self.lock:
            self._check_open()
            m = self.grants.pop(grant_id)
        m.length = length
        for stale in self._maps_in(addr, addr + mmap_round(length)):
            self.unmap(stale.va)
        mode = uapi.UFFDIO_REGISTER_MODE_MISSING | uapi.UFFDIO_REGISTER_MODE_MINOR
        if m.wp:
            mode |= uapi.UFFDIO_REGISTER_MODE_WP
        m.va = m.file.map(self.space, length, m.offset, m.entry_prot, m.entry_prot, MAP_SHARED, va=addr)
        try:
            self.uffd.register(addr, mmap_round(length), mode)
        except BaseException:
            m.file.close()
            raise
        with self.lock:
            self.maps[addr] = m
            self.stats.maps = len(self.maps)

    def release(self, grant_id: int) -> None:
        """A grant the client could not map (its mmap of the memfd failed):
        drop its hold on the object.  ValueError if there is no such grant."""
        with self.lock:
            m = self.grants.pop(grant_id, None)
        if m is None:
            raise ValueError(f"no grant {grant_id}")
        self._release(m)

    def unmap(self, addr: int) -> None:
        """The client unmapped the map at *addr*: remove it (its object
        persists with its pages, dirty ones written back later)."""
        with self.lock:
            m = self.maps.pop(addr, None)
            self.stats.maps = len(self.maps)
        if m is None:
            raise ValueError(f"no map at {addr:#x}")
        self._release(m)

    def _release(self, m: _Map) -> None:
        """Drop the map's hold on its object (and the object's memfd, if
        that was the last hold of an object with no page)."""
        m.file.close()
        uvn = m.file.uvn
        with uvn.vmobjlock:
            self.vm.frames.release(uvn)

    def flush(self, addr: int, offset: int, size: int) -> None:
        """msync(MS_SYNC) of [offset, offset+size) of the map at *addr*:
        write back and wait.  Raises OSError with the write-back's errno,
        once per map for each error (errseq), as the software MMU's flush."""
        m = self._map_at(addr)
        if offset < 0 or size < 0 or offset + size > m.length:
            raise ValueError("flush values out of range")
        m.file.sync(m.offset + offset, m.offset + offset + size)

    def madvise(self, addr: int, start: int, length: int, advice: int) -> None:
        """madvise(*advice*) of [start, start+length) of the map at *addr*:
        the advice sizes the read-ahead of its faults (uvm_map_advice)."""
        m = self._map_at(addr)
        if start < 0 or length < 0 or start + length > m.length:
            raise ValueError("madvise start or length out of range")
        uvm_map_advice(self.space, m.va + start, m.va + mmap_round(start + length), advice)

    def size(self, addr: int) -> int:
        """The size of the map's file now (taking up a change from outside)."""
        m = self._map_at(addr)
        m.file.follow_size()
        return m.file.uvn.u_size

    def resize(self, addr: int, newsize: int) -> None:
        """Set the size of the map's file (and object and memfd) to the
        map's offset + *newsize*, under the object's size lock; the map's
        entry follows.  The client then mremaps its mapping (in place, or
        see :meth:`moved`)."""
        m = self._map_at(addr)
        if newsize <= 0:
            raise ValueError("new size out of range")
        if not m.shared or not m.prot & PROT_WRITE:
            raise TypeError("mmap can't resize a readonly or copy-on-write memory map.")
        m.file.setsize(m.offset + newsize)
        self._reenter(m, m.va, newsize)

    def moved(self, addr: int, newaddr: int, length: int) -> None:
        """The client's mremap moved (or resized) the map at *addr* to
        *newaddr*: enter it there and register it again (mremap without
        UFFD_FEATURE_EVENT_REMAP drops a moved range's registration)."""
        m = self._map_at(addr)
        self._reenter(m, newaddr, length)
        mode = uapi.UFFDIO_REGISTER_MODE_MISSING | uapi.UFFDIO_REGISTER_MODE_MINOR
        if m.wp:
            mode |= uapi.UFFDIO_REGISTER_MODE_WP
        self.uffd.register(newaddr, mmap_round(length), mode)

    def _reenter(self, m: _Map, va: int, length: int) -> None:
        m.file.unmap(self.space, m.va)
        m.file.map(self.space, length, m.offset, m.entry_prot, m.entry_prot, MAP_SHARED, va=va)
        with self.lock:
            del self.maps[m.va]
            m.va, m.length = va, length
            self.maps[va] = m

    def _map_at(self, addr: int) -> _Map:
        with self.lock:
            self._check_open()
            m = self.maps.get(addr)
        if m is None:
            raise ValueError(f"no map at {addr:#x}")
        return m

    def _maps_in(self, start: int, end: int) -> list[_Map]:
        with self.lock:
            return [m for m in self.maps.values() if m.va < end and start < m.end]

    def _check_open(self) -> None:
        """=> self.lock held."""
        if self.closed:
            raise ValueError("the client's space is closed")

    # ---------------------------------------------------------------- files

    def fopen(self, target: int | str, prot: int, create: bool = False, excl: bool = False) -> int:
        """Hold the object of the file open on descriptor *target* (the
        client's: we keep a descriptor of our own), or of the object at URL
        *target* (made if missing with *create*, EEXIST with *excl* if it
        exists), for I/O through its pages, as the software VM's
        ``pread``/``pwrite``/``open`` do; its handle."""
        file = FileObject.open(self.vm, target, prot & (PROT_READ | PROT_WRITE), create=bool(create),
                               excl=bool(excl))
        handle = next(_grant_ids)
        with self.lock:
            if self.closed:
                file.close()
                raise ValueError("the client's space is closed")
            self.files[handle] = file
        return handle

    def fread(self, handle: int, n: int, off: int) -> bytes:
        """Up to *n* bytes at *off* (MAX_DATA at most), through the pages."""
        if n < 0 or off < 0:
            raise ValueError("negative count or offset")
        return ubc_read(self._file(handle).uvn, min(n, MAX_DATA), off)

    def fwrite(self, handle: int, off: int, data: bytes) -> int:
        """Write *data* at *off* into the pages (dirty; the file grows)."""
        if off < 0:
            raise ValueError("negative offset")
        return ubc_write(self._file(handle).uvn, data, off)

    def fsize(self, handle: int) -> int:
        file = self._file(handle)
        file.follow_size()
        return file.uvn.u_size

    def ftruncate(self, handle: int, size: int) -> None:
        if size < 0:
            raise ValueError("negative size")
        self._file(handle).setsize(size)

    def fsync(self, handle: int) -> None:
        """Write the file's dirty pages back and wait (errseq, as flush)."""
        self._file(handle).sync()

    def fclose(self, handle: int, sync: bool) -> None:
        """Drop the handle's hold (writing back first if *sync*: raises its error)."""
        with self.lock:
            file = self.files.pop(handle, None)
        if file is None:
            raise ValueError(f"no file {handle}")
        file.close(sync=sync)

    def _file(self, handle: int) -> FileObject:
        with self.lock:
            self._check_open()
            file = self.files.get(handle)
        if file is None:
            raise ValueError(f"no file {handle}")
        return file

    # ---------------------------------------------------------------- fork

    def adopt_fork(self, pid: int, timeout: float = ADOPT_TIMEOUT) -> ClientSpace:
        """The space of a child of this client (made by its fork event, the
        oldest not yet adopted: the event does not name the child), now
        known as process *pid*, the caller's to close.  Raises LookupError
        if no fork event came within *timeout* seconds."""
        with self.lock:
            if not self.forked_cv.wait_for(lambda: self.forked or self.closed, timeout):
                raise LookupError(f"no fork of client {self.pid} to adopt for {pid}")
            self._check_open()
            child = self.forked.popleft()
        child.pid = pid
        child.process = _pidfd(pid)
        child.pmap.attach(child.uffd, child.process)
        return child

    def _fork_protect(self, ufd: int) -> ClientSpace | None:
        """A fork event: the child's space, not started yet.  The child's
        vmas are registered already (the kernel copied them, with the new
        uffd) and may hold PTEs copied from our writable ones: they are
        write-protected at once, before anything else (see
        arch/uffd/pmap._protect), so that no store of the child goes unseen
        (its pmap knows none of them: a store faults and is served).
        => called by the reader, with ``pmap.reader_busy`` set."""
        try:
            child = ClientSpace(self.vm, Uffd(ufd, self.uffd.features), 0, start=False)
            for m in self._maps_in(0, 1 << 64):
                if m.wp:
                    uffd_pmap.uffd_call(partial(child.uffd.writeprotect, m.va, mmap_round(m.length)))
        except Exception:
            log.exception("making the space of a fork of client %d", self.pid)
            return None
        return child

    def _fork_finish(self, child: ClientSpace) -> None:
        """Give the child a copy of our maps, start it and queue it for
        adoption (:meth:`adopt_fork`).  => called by the reader."""
        try:
            self._copy_maps(child)
        except Exception:  # served all the same: a fault outside the maps copied is SIGBUS
            log.exception("copying the maps of client %d to its fork", self.pid)
        child.stats.maps = len(child.maps)
        child.start()  # its faults waited in its uffd until its maps were there
        with self.lock:
            self.stats.forks += 1
            if self.closed:
                orphan = True
            else:
                orphan = False
                self.forked.append(child)
                self.forked_cv.notify_all()
        if orphan:
            child.close()

    def _copy_maps(self, child: ClientSpace) -> None:
        """Give *child* (not started) a map of its own for each of ours."""
        for m in self._maps_in(0, 1 << 64):
            uvn = m.file.uvn
            uvn.pgops.pgo_reference(uvn)
            cm = _Map(FileObject(uvn), m.length, m.offset, m.prot, m.shared)
            cm.va = cm.file.map(child.space, m.length, m.offset, m.entry_prot, m.entry_prot, MAP_SHARED,
                                va=m.va)
            child.maps[m.va] = cm

    # ---------------------------------------------------------------- faults

    def _read(self) -> None:
        """The reader thread: events off the uffd as soon as they come."""
        poller = select.poll()
        poller.register(self.uffd.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        if self.process is not None:
            poller.register(self.process.fd, select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll(POLL_MS)}
                if self._stop_r in ready or (self.process is not None and self.process.fd in ready):
                    return
                if self.uffd.fd not in ready:
                    continue
                self.pmap.reader_busy = True  # see arch/uffd/pmap._protect
                try:
                    msgs = self.uffd.read_events()
                    made = [self._fork_protect(msg.ufd) for msg in msgs if msg.event == uapi.UFFD_EVENT_FORK]
                    children = [child for child in made if child is not None]
                finally:
                    self.pmap.reader_busy = False
                for msg in msgs:
                    if msg.is_pagefault and not self._emulated(msg):
                        self._faults.put(msg)
                for child in children:
                    self._fork_finish(child)
        finally:
            self._faults.put(None)

    def _work(self) -> None:
        """The worker thread: serve the faults the reader queued, in order.
        A fault the server fails to serve by a bug of ours is logged and
        answered SIGBUS: never leave a client hanging in its fault."""
        while (msg := self._faults.get()) is not None:
            try:
                self._serve(msg)
            except Exception:
                log.exception("serving %r of client %d", msg, self.pid)
                va = msg.address & ~(self.vm.page_size - 1)
                with contextlib.suppress(OSError):
                    self._poison(va, self._map_of(va))

    def _emulated(self, msg: UffdMsg) -> bool:
        """Count the fault (before anyone wakes the faulting thread) and, for
        a write-protect fault, serve it at once in the pmap if it can be
        (arch/uffd/pmap.pmap_emulate_modify: no trip through uvm_fault);
        False if uvm_fault must serve it.  => called by the reader: never
        sleeps.  The counters bumped here have no other writer: no lock."""
        stats = self.stats
        stats.faults += 1
        if msg.is_minor:
            stats.minor += 1
        if not (msg.is_write or msg.is_wp):
            return False
        va = msg.address & ~(self.vm.page_size - 1)
        m = self._map_of(va)
        if m is None or m.shared:
            stats.writes += 1
        if not msg.is_wp:
            return False
        stats.wp += 1
        return m is not None and m.wp and uffd_pmap.pmap_emulate_modify(self.pmap, va, m.end)

    def _serve(self, msg: UffdMsg) -> None:
        ps = self.vm.page_size
        va = msg.address & ~(ps - 1)
        write = msg.is_write or msg.is_wp
        m = self._map_of(va)
        if m is not None and not m.shared:
            write = False  # the client's kernel copies on write
        if not msg.is_wp:
            uffd_pmap.pmap_forget(self.pmap, va)  # a fault there: what we mapped left its page tables
        self.pmap.updated.clear()
        try:
            uvm_fault(self.space, va, PROT_WRITE if write else PROT_READ)
        except (BusError, SegvError, OSError):
            self._poison(va, m)
            return
        if not any(s <= va < e for s, e in self.pmap.updated):
            uffd_pmap.uffd_call(lambda: self.uffd.wake(va, ps))  # nothing changed there: retry it

    def _map_of(self, va: int) -> _Map | None:
        with self.lock:
            for m in self.maps.values():
                if m.va <= va < m.end:
                    return m
        return None

    def _poison(self, va: int, m: _Map | None) -> None:
        """SIGBUS for the accesses at *va*: UFFDIO_POISON (a write-protect
        marker there would make it EEXIST: clear it first)."""
        ps = self.vm.page_size
        with self.lock:
            self.stats.poisoned += 1
        if m is not None and m.wp:
            uffd_pmap.uffd_call(lambda: self.uffd.writeprotect(va, ps, False, wake=False))
        try:
            uffd_pmap.uffd_call(lambda: self.uffd.poison(va, ps))
        except FileExistsError:
            uffd_pmap.uffd_call(lambda: self.uffd.wake(va, ps))  # mapped meanwhile: let it retry

    # ---------------------------------------------------------------- life

    def statistics(self) -> SpaceStatistics:
        """A copy of what the space served (see SpaceStatistics)."""
        with self.lock:
            return SpaceStatistics(**{**vars(self.stats), "pmap": uffd_pmap.PmapStatistics(
                **vars(self.pmap.stats))})

    def close(self) -> None:
        """The client is gone (or done): stop serving, unmap every map,
        release the references, drop the children never adopted."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            maps, self.maps = list(self.maps.values()), {}
            grants, self.grants = list(self.grants.values()), {}
            files, self.files = list(self.files.values()), {}
            forked, self.forked = list(self.forked), deque()
            self.forked_cv.notify_all()
        os.write(self._stop_w, b"x")
        for t in (self._reader, self._worker):
            if t.ident is not None and t is not threading.current_thread():
                t.join(JOIN_TIMEOUT)
        for m in maps + grants:
            self._release(m)
        for file in files:
            file.close()
        self.pmap.detach()
        for child in forked:
            child.close()
        self.uffd.close()
        if self.process is not None:
            self.process.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    def __repr__(self) -> str:
        return f"<ClientSpace pid={self.pid} maps={len(self.maps)}>"


def _pidfd(pid: int) -> Process | None:
    """The client's pidfd, or None if it is gone already (or unknown: 0)."""
    if pid <= 0:
        return None
    try:
        return Process(pid)
    except ProcessLookupError:
        return None
