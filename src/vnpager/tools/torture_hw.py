"""``vnpager torture --mmu hardware``: torture's work on hardware maps.

The same stripes, model and checks as :mod:`vnpager.tools.torture`, on the
hardware MMU: a pager server (:mod:`vnpager.tools.hw_server`) with a VM of
a few pages, and threads of this process mapping its files through it.  A
hardware map's accesses are plain memory, so the operations are slices
and numpy views (``numpy.frombuffer``) that read and write the pages with
no call into the pager; a missing page faults into the server.  Besides,
threads flush ranges and check the file, map privately (copy on write in
this process: none of it may reach the file or the shared pages), map a
second time (both maps show the same pages), advise, and remap.

Faults: on this machine a failed read is SIGBUS (the kernel's mmap
semantics), which no thread survives, so only write-back is made to fail
(EIO, ENOSPC, short writes), by the server's files and its page daemon
alike.  A flush that raises has acknowledged nothing, and the model says
what a later flush must write; at the end, with the faults cleared, each
map's flush may raise once (an error it had not been told of yet) and
then must not again: an error is told once per map.  The resident pages
never exceed the server's physmem (checked as the run goes).
"""

from __future__ import annotations

import errno
import faulthandler
import mmap as std_mmap
import os
import random
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vnpager.tools.hw_server import Spawned
from vnpager.tools.torture import Config, Figures, ModelFile, Owner, compare_files, run_workers
from vnpager.uvm.uvm_param import PAGE_SIZE

ADVICE = (std_mmap.MADV_NORMAL, std_mmap.MADV_RANDOM, std_mmap.MADV_SEQUENTIAL, std_mmap.MADV_WILLNEED,
          std_mmap.MADV_DONTNEED)


class HwFile(ModelFile):
    fd: int  # open read-write, for this process's maps

    def __init__(self, path: str, size: int, model: bytearray) -> None:
        super().__init__(path, size, model)
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)


class _HwWorker(Owner):
    """Operations on hardware maps (see the module docstring)."""

    def __init__(self, run: HwTorture, tid: int) -> None:
        super().__init__(run.cfg, run.files, run.stop, tid)
        self.run_ = run
        self.maps: list[Any] = [None] * len(run.files)

    def mapping(self, i: int) -> Any:
        m = self.maps[i]
        if m is None:
            f = self.run_.files[i]
            m = self.maps[i] = self.open_map(f)
        return m

    def open_map(self, f: HwFile, flags: int = std_mmap.MAP_SHARED) -> Any:
        return self.run_.vm.mmap(f.fd, f.size, flags=flags)

    @contextmanager
    def another_map(self, f: HwFile, flags: int = std_mmap.MAP_SHARED) -> Iterator[Any]:
        m = self.open_map(f, flags)
        try:
            yield m
        finally:
            m.close()

    def _stripes(self, f: ModelFile) -> list[tuple[int, int, bytes]]:
        """My stripes in up to three pages from a random place, each with new data."""
        lo = self.rng.randrange(f.size)
        return [(off, n, self.rng.randbytes(n))
                for off, n in self.own_stripes(f, lo, min(f.size, lo + 3 * PAGE_SIZE))]

    # -- operations
    def op_write(self, i: int) -> None:
        f, m = self.run_.files[i], self.mapping(i)
        for off, n, data in self._stripes(f):
            m[off:off + n] = data
            f.model[off:off + n] = data

    def op_write_numpy(self, i: int) -> None:
        import numpy as np

        f, m = self.run_.files[i], self.mapping(i)
        a = np.frombuffer(m, dtype=np.uint8)
        try:
            for off, n, data in self._stripes(f):
                a[off:off + n] = np.frombuffer(data, dtype=np.uint8)
                f.model[off:off + n] = data
        finally:
            del a  # an array over the map would keep it from closing

    def op_read_numpy(self, i: int) -> None:
        import numpy as np

        f, m = self.run_.files[i], self.mapping(i)
        lo, hi = self.span(f)
        a = np.frombuffer(m, dtype=np.uint8)
        try:
            got = a[lo:hi].tobytes()
        finally:
            del a
        self.compare_own(f"numpy read of {f.path}", f, lo, hi, got)

    def op_sync(self, i: int) -> None:
        f, m = self.run_.files[i], self.mapping(i)
        lo = self.rng.randrange(f.size // PAGE_SIZE) * PAGE_SIZE
        hi = min(f.size, lo + self.rng.randint(1, 8) * PAGE_SIZE) if self.rng.random() < 0.7 else f.size
        m.flush(lo, hi - lo)
        self.verify_file(f, lo, hi)

    def op_private(self, i: int) -> None:
        """Copy on write: my writes are seen in the private map only."""
        f, shared = self.run_.files[i], self.mapping(i)
        with self.another_map(f, std_mmap.MAP_PRIVATE) as m:
            mine = self._stripes(f)
            for off, n, data in mine:
                m[off:off + n] = data
            for off, n, data in mine:
                self.compare(f"private read of {f.path}", off, m[off:off + n], data)
                self.compare(f"shared read beside a private write of {f.path}", off, shared[off:off + n],
                             f.model[off:off + n])

    def op_alias(self, i: int) -> None:
        """A second map of the file: writes through one are seen through the other."""
        f, m = self.run_.files[i], self.mapping(i)
        with self.another_map(f) as alias:
            for off, n, data in self._stripes(f):
                alias[off:off + n] = data
                f.model[off:off + n] = data
                self.compare(f"read through another map of {f.path}", off, m[off:off + n], data)

    def op_remap(self, i: int) -> None:
        m, self.maps[i] = self.maps[i], None
        if m is not None:
            m.close()  # closed even when its write-back fails (then it raises)
        self.mapping(i)

    def op_advise(self, i: int) -> None:
        m = self.mapping(i)
        lo = self.rng.randrange(len(m) // PAGE_SIZE) * PAGE_SIZE
        m.madvise(self.rng.choice(ADVICE), lo, min(4 * PAGE_SIZE, len(m) - lo))

    def op_budget(self, i: int) -> None:
        vm = self.run_.vm.stats()
        if vm["frames_resident"] > self.cfg.physmem_pages:
            self.fig.problems.append(f"thread {self.tid}: {vm['frames_resident']} pages resident in the "
                                     f"memfds, over physmem's {self.cfg.physmem_pages}")

    OPS: tuple[tuple[str, float], ...] = (("write", 0.25), ("write_numpy", 0.1), ("read", 0.17),
                                          ("read_numpy", 0.1), ("sync", 0.15), ("private", 0.05),
                                          ("alias", 0.05), ("remap", 0.05), ("advise", 0.06),
                                          ("budget", 0.02))


class HwTorture:
    """One run: a pager server with write faults, files, this process's VM, the workers."""

    def __init__(self, cfg: Config, directory: str) -> None:
        self.cfg = cfg
        self.server = Spawned(cfg.physmem_pages * PAGE_SIZE, faults=f"{cfg.seed}:{cfg.fault_rate}")
        from vnpager import VM

        self.vm = VM.connect(self.server.path)
        self.stop = threading.Event()
        rng = random.Random(cfg.seed)
        self.files: list[HwFile] = []
        for i in range(cfg.files):
            path = os.path.join(directory, f"f{i}")
            size = cfg.file_pages * PAGE_SIZE - rng.randrange(PAGE_SIZE)
            data = rng.randbytes(size)
            with open(path, "wb") as fh:
                fh.write(data)
            self.files.append(HwFile(path, size, bytearray(data)))

    def run(self) -> tuple[Figures, bool]:
        workers = [_HwWorker(self, t) for t in range(self.cfg.threads)]
        # a fault nobody serves freezes the whole process (the faulting thread holds the GIL), so
        # run_workers' own watchdog could not run: faulthandler's C thread prints the stacks and exits
        faulthandler.dump_traceback_later(self.cfg.seconds + self.cfg.hang_grace, exit=True,
                                          file=2)  # the process's stderr, whatever sys.stderr is now
        try:
            fig, hung = run_workers(workers, self.stop, self.cfg)
        finally:
            faulthandler.cancel_dump_traceback_later()
        if not hung:
            self.server.clear_faults()
            self._final_check(workers, fig)
        return fig, hung

    def _final_check(self, workers: list[_HwWorker], fig: Figures) -> None:
        """With the faults gone: each map's flush raises at most once (an
        error not yet told), then is clean; every file equals the model."""
        for w in workers:
            for i, m in enumerate(w.maps):
                if m is None:
                    continue
                for attempt in range(2):
                    try:
                        m.flush()
                        break
                    except OSError as e:
                        if attempt or e.errno not in (errno.EIO, errno.ENOSPC):
                            fig.problems.append(f"final flush {attempt + 1} of {self.files[i].path}: {e!r}")
                        fig.errors += 1
                try:
                    m.close()
                except OSError as e:
                    fig.problems.append(f"close after a clean flush of {self.files[i].path}: {e!r}")
        compare_files(self.files, fig)
        self.vm.check_invariants()

    def close(self) -> Counter[str]:
        """Stop it all; the faults the server injected, by kind."""
        for f in self.files:
            os.close(f.fd)
        self.vm.close()
        self.server.stop()
        return self.server.injected


def torture_hw(cfg: Config) -> tuple[Figures, Counter[str], bool]:
    """:func:`vnpager.tools.torture.torture` on the hardware MMU."""
    with tempfile.TemporaryDirectory(prefix="vnpager-torture-hw-") as tmp:
        t = HwTorture(cfg, tmp)
        hung = True
        try:
            fig, hung = t.run()
        finally:
            if hung:  # threads may hold this VM's lock: only the server can be stopped
                t.server.stop()
            injected = t.server.injected if hung else t.close()
        return fig, injected, hung
