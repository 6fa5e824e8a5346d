"""``vnpager torture``: mixed work across threads and files under injected faults.

Threads map files of a :class:`~vnpager.vfs.faultfs.FaultFS` over hostfs
with ``vnpager.mmap`` (``vm.map`` of the files' vnodes: shared and private
maps) and open them with ``vm.open``, write, read, flush, advise and remap
at random, while the fault plan makes reads, writes and attribute lookups
fail (EIO, ENOSPC), come back short, or stall.  The VM is small, so the
page daemon writes pages back all the time, and fails too.  The figures so
certify the classes users call, through the one mapping core
(:mod:`vnpager.vnmap`) they share.

Every byte has one owner: the file is cut into stripes dealt round-robin to
the threads, so a page holds the stripes of several threads and is written
by all of them, yet each thread knows exactly what its own bytes must be.
That gives an exact model of acknowledged contents:

* a read of one's own bytes through a shared map or a file returns what
  one last wrote there (a failed write-back keeps the page dirty: nothing
  is lost);
* after a ``flush()`` of a map, or a ``sync()`` or ``close()`` of a file
  open for writing, that raised no error (a write-back, then the errseq
  check, as fsync does on Linux), one's own bytes in its range are in the
  file, read straight from the host;
* private mappings see their own writes, and none of them reach the file;
* at the end, with the faults cleared, every file is flushed and compared
  whole with the model.

Any difference is a mismatch; the run fails unless there are none, no
thread raised anything but the errors the faults explain, and no thread
hung (a watchdog prints every thread's stack and what it sleeps on).
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vnpager.kern.debug import DEBUG
from vnpager.kern.errors import BusError, SegvError
from vnpager.kern.synch import sleepers
from vnpager.mmap import MADV_DONTNEED, MAP_PRIVATE, mmap
from vnpager.uvm.uvm_param import PAGE_SIZE
from vnpager.uvm.uvm_vnode import uvm_vnp_sync
from vnpager.vfs.faultfs import FaultFS, FaultPlan
from vnpager.vfs.hostfs import HostFS, hostfs_vget_path
from vnpager.vfs.mount import Mount
from vnpager.vfs.vnode import Vnode
from vnpager.vm import VM

# ---------------------------------------------------------------- the run

@dataclass
class Config:
    seconds: float = 10.0
    seed: int = 1
    threads: int = 4
    files: int = 3
    file_pages: int = 48
    physmem_pages: int = 24  # far fewer than the files' pages: the daemon works hard
    stripe: int = 512  # bytes owned by one thread in turn
    fault_rate: float = 0.02  # per read/write call, for each kind of fault
    hang_grace: float = 60.0  # seconds past the end before the watchdog fires
    mmu: str = "software"  # hardware: vnpager.tools.torture_hw


@dataclass
class Figures:
    ops: int = 0
    errors: int = 0  # OSErrors surfaced to callers (reads, writes, flushes, maps, opens)
    bytes_verified: int = 0
    mismatches: int = 0
    by_op: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)  # mismatches and unexplained errors

    def add(self, other: Figures) -> None:
        self.ops += other.ops
        self.errors += other.errors
        self.bytes_verified += other.bytes_verified
        self.mismatches += other.mismatches
        self.by_op.update(other.by_op)
        self.problems.extend(other.problems)


@dataclass
class ModelFile:
    path: str
    size: int
    model: bytearray  # what each owner last wrote (and initially, the file)


@dataclass
class TortureFile(ModelFile):
    vp: Vnode


def fault_plan(seed: int, rate: float) -> FaultPlan:
    """Random faults of every kind the pager must survive, from *seed*.

    A short read without an error is not among them: the pager takes it for
    the end of the file (it was truncated behind its back) and zero-fills.
    """
    plan = FaultPlan(seed)
    plan.fail("write", errno.EIO, probability=rate)
    plan.fail("write", errno.ENOSPC, probability=rate)
    plan.short("write", 1000, error=errno.ENOSPC, probability=rate)
    plan.short("write", 1000, probability=rate)  # the rest follows in a second call
    plan.fail("read", errno.EIO, probability=rate)
    plan.short("read", 1000, error=errno.EIO, probability=rate)
    plan.fail("getattr", errno.EIO, probability=rate)
    plan.delay(("read", "write"), 0.0005, probability=5 * rate)
    return plan


class Owner(threading.Thread):
    """A worker thread's share of the files (its stripes), its checks
    against the model, and its loop of random operations; the subclasses
    give the operations (``OPS``: (name, weight), each ``op_NAME(i)`` on
    file *i*)."""

    OPS: tuple[tuple[str, float], ...] = ()

    def __init__(self, cfg: Config, files: Sequence[ModelFile], stop: threading.Event, tid: int) -> None:
        super().__init__(name=f"torture-{tid}", daemon=True)
        self.cfg = cfg
        self.files: list[ModelFile] = list(files)
        self.stop = stop
        self.tid = tid
        self.rng = random.Random(cfg.seed * 1000 + tid)
        self.fig = Figures()

    # -- ownership
    def own_stripes(self, f: ModelFile, lo: int, hi: int) -> list[tuple[int, int]]:
        """(offset, length) of this thread's stripes within [lo, hi)."""
        s, n = self.cfg.stripe, self.cfg.threads
        first = lo // s
        first += (self.tid - first) % n
        spans = ((max(o, lo), min(o + s, hi)) for o in range(first * s, hi, n * s))
        return [(a, b - a) for a, b in spans if a < b]

    def mapping(self, i: int) -> Any:
        """This thread's shared map of file *i*, made on first use."""
        raise NotImplementedError

    def op_read(self, i: int) -> None:
        f, m = self.files[i], self.mapping(i)
        lo, hi = self.span(f)
        self.compare_own(f"read of {f.path}", f, lo, hi, m[lo:hi])

    def span(self, f: ModelFile) -> tuple[int, int]:
        """A random range of up to three pages."""
        lo = self.rng.randrange(f.size)
        return lo, min(f.size, lo + self.rng.randint(1, 3 * PAGE_SIZE))

    # -- checks
    def compare(self, what: str, off: int, got: bytes, want: bytes | bytearray) -> None:
        self.fig.bytes_verified += len(want)
        if got != want:
            self.fig.mismatches += 1
            self.fig.problems.append(f"thread {self.tid}: {what} at {off:#x}: "
                                     f"{bytes(got[:16]).hex()} != {bytes(want[:16]).hex()}")

    def compare_own(self, what: str, f: ModelFile, lo: int, hi: int, got: bytes) -> None:
        """*got*, read from [lo, hi): my stripes there are the model's."""
        for off, n in self.own_stripes(f, lo, hi):
            self.compare(what, off, got[off - lo:off - lo + n], f.model[off:off + n])

    def verify_file(self, f: ModelFile, lo: int, hi: int) -> None:
        """After an acknowledged flush: my bytes of [lo, hi) are in the file."""
        with open(f.path, "rb", buffering=0) as fh:
            disk = os.pread(fh.fileno(), hi - lo, lo)
        self.compare_own(f"acknowledged flush of {f.path}", f, lo, hi, disk)

    def run(self) -> None:
        names, weights = zip(*self.OPS, strict=True)
        ops: dict[str, Callable[[int], None]] = {n: getattr(self, f"op_{n}") for n in names}
        try:
            while not self.stop.is_set():
                name = self.rng.choices(names, weights)[0]
                i = self.rng.randrange(len(self.files))
                self.fig.ops += 1
                self.fig.by_op[name] += 1
                try:
                    ops[name](i)
                except (BusError, SegvError) as e:
                    # the files never shrink and we touch only what we mapped
                    self.fig.problems.append(f"thread {self.tid}: {name}: {e!r}")
                    return
                except OSError as e:
                    if e.errno not in (errno.EIO, errno.ENOSPC):
                        self.fig.problems.append(f"thread {self.tid}: {name}: unexpected {e!r}")
                        return
                    self.fig.errors += 1
        except BaseException as e:  # a panic or a bug: stop the run, report it
            self.fig.problems.append(f"thread {self.tid}: {type(e).__name__}: {e}")
            self.stop.set()


class _Worker(Owner):
    """Operations on the software MMU: maps and files of the VM's vnodes."""

    def __init__(self, run: Torture, tid: int) -> None:
        super().__init__(run.cfg, run.files, run.stop, tid)
        self.run_ = run
        self.maps: list[mmap | None] = [None] * len(run.files)

    def mapping(self, i: int) -> mmap:
        m = self.maps[i]
        if m is None:
            f = self.run_.files[i]
            m = self.maps[i] = self.run_.vm.map(f.vp, f.size)
        return m

    # -- operations
    def op_write(self, i: int) -> None:
        f, m = self.run_.files[i], self.mapping(i)
        lo = self.rng.randrange(f.size)
        for off, n in self.own_stripes(f, lo, min(f.size, lo + 3 * self.run_.vm.page_size)):
            data = self.rng.randbytes(n)
            m[off:off + n] = data  # a stripe lies in one page: all of it or nothing
            f.model[off:off + n] = data

    def op_sync(self, i: int) -> None:
        f, m = self.run_.files[i], self.mapping(i)
        ps = self.run_.vm.page_size
        lo = self.rng.randrange(f.size // ps) * ps
        hi = min(f.size, lo + self.rng.randint(1, 8) * ps) if self.rng.random() < 0.7 else f.size
        m.flush(lo, hi - lo)
        self.verify_file(f, lo, hi)

    def op_private(self, i: int) -> None:
        f = self.run_.files[i]
        with self.run_.vm.map(f.vp, f.size, flags=MAP_PRIVATE) as m:
            mine: dict[int, bytes] = {}
            for off, n in self.own_stripes(f, 0, f.size)[: self.rng.randint(1, 8)]:
                data = self.rng.randbytes(n)
                m[off:off + n] = data
                mine[off] = data
            for off, data in mine.items():
                self.compare(f"private read of {f.path}", off, m[off:off + len(data)], data)

    def op_file(self, i: int) -> None:
        """Through vm.open: write some of my stripes, read a range back, and
        check the file after a sync or the close (both write back)."""
        f = self.run_.files[i]
        lo, hi = self.span(f)
        with self.run_.vm.open(f.vp, "r+b") as fh:
            for off, n in self.own_stripes(f, lo, hi):
                data = self.rng.randbytes(n)
                fh.seek(off)
                fh.write(data)  # one page: all of it or nothing
                f.model[off:off + n] = data
            lo, hi = self.span(f)
            fh.seek(lo)
            self.compare_own(f"file read of {f.path}", f, lo, hi, fh.read(hi - lo))
            if self.rng.random() < 0.5:
                fh.sync()
                self.verify_file(f, 0, f.size)
        self.verify_file(f, 0, f.size)

    def op_remap(self, i: int) -> None:
        m, self.maps[i] = self.maps[i], None
        if m is not None:
            m.close()
        self.mapping(i)

    def op_advise(self, i: int) -> None:
        m, ps = self.mapping(i), self.run_.vm.page_size
        lo = self.rng.randrange(len(m) // ps) * ps
        m.madvise(MADV_DONTNEED, lo, 4 * ps)

    def op_syncall(self, i: int) -> None:
        uvm_vnp_sync(self.run_.vm)  # errors come back through the maps' and files' errseq

    OPS: tuple[tuple[str, float], ...] = (("write", 0.35), ("read", 0.27), ("sync", 0.15),
                                          ("private", 0.06), ("file", 0.08), ("remap", 0.06),
                                          ("advise", 0.07), ("syncall", 0.04))


def compare_files(files: Sequence[ModelFile], fig: Figures) -> None:
    """Each file, read whole from the host, against its model."""
    for f in files:
        with open(f.path, "rb") as fh:
            disk = fh.read()
        fig.bytes_verified += f.size
        if disk != f.model:
            fig.mismatches += 1
            bad = next(i for i, (a, b) in enumerate(zip(disk, f.model, strict=False)) if a != b)
            fig.problems.append(f"{f.path} differs from the model at {bad:#x}")


def run_workers(workers: Sequence[Owner], stop: threading.Event, cfg: Config) -> tuple[Figures, bool]:
    """Run *workers* for the configured time, then stop them; their figures
    added up, and whether they hung (their stacks are printed on stderr then)."""
    for w in workers:
        w.start()
    stop.wait(cfg.seconds)
    stop.set()
    deadline = time.monotonic() + cfg.hang_grace
    for w in workers:
        w.join(max(0.0, deadline - time.monotonic()))
    fig = Figures()
    for w in workers:
        fig.add(w.fig)
    if any(w.is_alive() for w in workers):
        dump_hang(sys.stderr)
        return fig, True
    return fig, False


class Torture:
    """One run: a VM, files on a faulty mount, and the workers."""

    def __init__(self, cfg: Config, directory: str) -> None:
        self.cfg = cfg
        self.plan = fault_plan(cfg.seed, cfg.fault_rate)
        self.vm = VM(physmem=cfg.physmem_pages * PAGE_SIZE)
        self.mount: Mount = self.vm.vfs.mount(FaultFS(HostFS(), self.plan), "torture")
        self.stop = threading.Event()
        rng = random.Random(cfg.seed)
        self.files: list[TortureFile] = []
        for i in range(cfg.files):
            path = os.path.join(directory, f"f{i}")
            size = cfg.file_pages * self.vm.page_size - rng.randrange(self.vm.page_size)
            data = rng.randbytes(size)
            with open(path, "wb") as fh:
                fh.write(data)
            vp = hostfs_vget_path(self.vm.vfs, self.mount, path)
            self.files.append(TortureFile(path, size, bytearray(data), vp))

    def run(self) -> tuple[Figures, bool]:
        """Run the workers, then check everything; return the figures and
        whether the run hung (the stacks are printed on stderr then)."""
        workers = [_Worker(self, t) for t in range(self.cfg.threads)]
        fig, hung = run_workers(workers, self.stop, self.cfg)
        if hung:
            return fig, True
        self.plan.clear()
        self._final_check(workers, fig)
        return fig, False

    def _final_check(self, workers: list[_Worker], fig: Figures) -> None:
        """With the faults gone: every mapping flushes clean (after reporting
        what it had not yet been told), and every file equals the model."""
        for w in workers:
            for i, m in enumerate(w.maps):
                if m is None:
                    continue
                f = self.files[i]
                try:
                    m.close()
                except OSError:  # an old error, told once; the pages were written now
                    fig.errors += 1
                    try:
                        self.vm.map(f.vp, f.size).close()
                    except OSError as e:
                        fig.problems.append(f"final flush of {f.path}: {e}")
        uvm_vnp_sync(self.vm)
        compare_files(self.files, fig)
        self.vm.check_invariants()

    def close(self) -> None:
        for f in self.files:
            self.vm.vfs.vrele(f.vp)
        self.vm.close()


def dump_hang(out: Any) -> None:
    """Every thread's stack, and what each sleeping thread waits for."""
    print("torture: threads did not finish; their stacks:", file=out, flush=True)
    out.flush()
    faulthandler.dump_traceback(out, all_threads=True)
    waits = sleepers()
    for t in threading.enumerate():  # faulthandler names threads by their ident only
        wmesg = waits.get(t.ident or 0)
        print(f"  Thread 0x{t.ident or 0:016x} is {t.name}"
              + (f", asleep on {wmesg!r}" if wmesg else ""), file=out)


def torture(cfg: Config) -> tuple[Figures, Counter[str], bool]:
    """Run it in a temporary folder: (figures, faults injected by kind, hung)."""
    with tempfile.TemporaryDirectory(prefix="vnpager-torture-") as tmp:
        t = Torture(cfg, tmp)
        fig, hung = t.run()
        injected: Counter[str] = Counter()
        for (op, label), k in t.plan.injected.items():
            injected[f"{op} {label}"] += k
        if not hung:  # a hung VM cannot be closed: its threads hold its locks
            t.close()
        return fig, injected, hung


def report(cfg: Config, fig: Figures, injected: Counter[str], hung: bool, out: Any) -> int:
    print(f"vnpager torture: {cfg.mmu} MMU, seed {cfg.seed}, {cfg.seconds:g} s, {cfg.threads} threads, "
          f"{cfg.files} files of {cfg.file_pages} pages, VM of {cfg.physmem_pages} pages, "
          f"invariant checks {'on' if DEBUG else 'off (VNPAGER_DEBUG=1 turns them on)'}", file=out)
    print(f"operations done:  {fig.ops}  ({', '.join(f'{k} {v}' for k, v in sorted(fig.by_op.items()))})",
          file=out)
    print(f"faults injected:  {sum(injected.values())}  "
          f"({', '.join(f'{k} {v}' for k, v in sorted(injected.items()))})", file=out)
    print(f"errors surfaced:  {fig.errors}", file=out)
    print(f"bytes verified:   {fig.bytes_verified}", file=out)
    print(f"mismatches:       {fig.mismatches}", file=out)
    for p in fig.problems[:20]:
        print(f"  problem: {p}", file=out)
    if hung:
        print("HUNG", file=out)
    return 0 if not fig.problems and not hung else 1


def run_torture(args: argparse.Namespace) -> int:
    cfg = Config(seconds=args.seconds, seed=args.seed, threads=args.threads,
                 fault_rate=args.fault_rate, mmu=args.mmu)
    if cfg.mmu == "hardware":
        from vnpager.tools.torture_hw import torture_hw

        fig, injected, hung = torture_hw(cfg)
    else:
        fig, injected, hung = torture(cfg)
    return report(cfg, fig, injected, hung, sys.stdout)


def add_subcommands(subparsers: Any) -> None:
    p = subparsers.add_parser("torture", help="mixed work across threads under injected faults; "
                                              "checks that nothing acknowledged is lost",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=10.0, metavar="N", help="how long (default 10)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--threads", type=int, default=4, help="worker threads (default 4)")
    p.add_argument("--fault-rate", type=float, default=0.02, metavar="P",
                   help="probability of each kind of fault per I/O call (default 0.02)")
    p.add_argument("--mmu", choices=("software", "hardware"), default="software",
                   help="hardware: hardware maps through a pager server, write-back faults only")
    p.set_defaults(func=run_torture)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vnpager.tools.torture")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["torture", *(sys.argv[1:] if argv is None else argv)])
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
