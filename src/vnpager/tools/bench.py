"""``vnpager bench``: vnpager.mmap against CPython's mmap, os.preadv and
fsspec's BlockCache, in one run on one file.  A benchmark, not a test.

Every figure is a rate (MB/s) and its ratio to a baseline measured in the
same run, so that the ratios, not the times, are what carries over from one
machine to another.  "Cold" means not resident in the reader: a fresh VM
for vnpager, a fresh mapping for mmap, a fresh cache for BlockCache.  The
file stays in the host's page cache throughout, for every reader.

Some rows have targets, each checked on its own (a row shows which of its
targets it met and which it missed): resident reads at a fraction of
mmap's rate, a cold sequential read of a file bigger than the VM (and the
read calls per page it takes, and the MI layer's own work per page: the
read's wall time less the host's preadv time, per page, beside bare
preadv's cost per page), sequential writes then flush (and the write
calls per page), and eight threads each reading their own file from a
backend that takes 1 ms per read call.  One row has no target: sequential
writes through ``vm.open`` of a file 4 times the VM, then sync, which the
page daemon writes back as it goes.

The eight threads map their files MADV_RANDOM, so that every page is one
backend call: the target is about I/O overlap (eight threads sleeping in
the backend at once), and with read-ahead one thread would make a call per
64 pages, too few for the ratio to measure overlap rather than how many
calls each thread happens to make.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import mmap as std_mmap
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table

from vnpager.tools.show import human, progress
from vnpager.vfs.hostfs import HostFS
from vnpager.vfs.vnode import Uio, Vnode

KiB, MiB = 1 << 10, 1 << 20
PAGE = 4096


@dataclass(frozen=True)
class Config:
    file_size: int  # the file all readers share
    min_time: float  # seconds each figure is measured for, at least
    thread_file_size: int  # per thread, in the eight-thread case
    delay: float = 0.001  # per read call of the slow backend


QUICK = Config(file_size=32 * MiB, min_time=0.3, thread_file_size=512 * KiB)
FULL = Config(file_size=128 * MiB, min_time=1.0, thread_file_size=2 * MiB)


# --- readers ------------------------------------------------------------------

class Reader(Protocol):
    def read(self, off: int, n: int) -> object: ...
    def write(self, off: int, data: bytes) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class _Mmap:
    """CPython's mmap.mmap of the whole file."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.m: Any = std_mmap.mmap(self.fd, 0)

    def read(self, off: int, n: int) -> object:
        return self.m[off:off + n]

    def write(self, off: int, data: bytes) -> None:
        self.m[off:off + len(data)] = data

    def flush(self) -> None:
        self.m.flush()

    def close(self) -> None:
        self.m.close()
        os.close(self.fd)


class _Vnpager(_Mmap):
    """vnpager.mmap of the whole file, in a fresh VM of *physmem* bytes
    (whose host filesystem is *host* if given)."""

    def __init__(self, path: str, physmem: int, host: HostFS | None = None) -> None:
        from vnpager import VM, mmap

        self.vm = VM(physmem=physmem)
        if host is not None:  # before any vnode: each takes its ops from the mount
            self.vm.hostfs.mnt_op = host
        self.fd = os.open(path, os.O_RDWR)
        self.m = mmap(self.fd, 0, vm=self.vm)


class _VmFile:
    """``vm.open(path, "r+b")`` in a fresh VM of *physmem* bytes: file I/O
    through the pages; flush writes the dirty pages back (sync)."""

    def __init__(self, path: str, physmem: int) -> None:
        from vnpager import VM

        self.vm = VM(physmem=physmem)
        self.f = self.vm.open(path, "r+b")

    def read(self, off: int, n: int) -> object:
        self.f.seek(off)
        return self.f.read(n)

    def write(self, off: int, data: bytes) -> None:
        self.f.seek(off)
        self.f.write(data)

    def flush(self) -> None:
        self.f.sync()

    def close(self) -> None:
        self.f.close()
        self.vm.close()


class _TimedHostFS(HostFS):
    """The host filesystem, adding up the wall time of its reads (the
    host's preadv calls), which the MI figure of a cold read leaves out."""

    seconds = 0.0

    def read(self, vp: Vnode, uio: Uio, ioflag: int) -> int:
        t0 = time.perf_counter()
        try:
            return super().read(vp, uio, ioflag)
        finally:
            self.seconds += time.perf_counter() - t0


class _Preadv:
    """os.preadv into a buffer reused across calls; os.pwritev to write."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.buf = bytearray(MiB)

    def read(self, off: int, n: int) -> object:
        view = memoryview(self.buf)[:n]
        os.preadv(self.fd, [view], off)
        return view

    def write(self, off: int, data: bytes) -> None:
        os.pwritev(self.fd, [data], off)

    def flush(self) -> None:
        """pwritev has left the data in the host's page cache: nothing to do."""

    def close(self) -> None:
        os.close(self.fd)


class _BlockCache:
    """fsspec's BlockCache over os.pread, big enough to hold the whole file."""

    blocksize = 64 * KiB

    def __init__(self, path: str) -> None:
        from fsspec.caching import BlockCache

        self.fd = os.open(path, os.O_RDONLY)
        size = os.fstat(self.fd).st_size
        self.cache = BlockCache(self.blocksize, self._fetch, size,
                                maxblocks=-(-size // self.blocksize))

    def _fetch(self, start: int, end: int) -> bytes:
        return os.pread(self.fd, end - start, start)

    def read(self, off: int, n: int) -> object:
        return self.cache._fetch(off, off + n)

    def write(self, off: int, data: bytes) -> None:
        raise NotImplementedError("BlockCache is read-only")

    def flush(self) -> None:
        raise NotImplementedError("BlockCache is read-only")

    def close(self) -> None:
        os.close(self.fd)


# --- measuring ----------------------------------------------------------------

Ops = list[tuple[int, int]]  # (offset, length) of each call


def sequential(size: int, n: int) -> Ops:
    return [(off, n) for off in range(0, size - n + 1, n)]


def scattered(size: int, n: int, rng: random.Random) -> Ops:
    """As many calls as a sequential pass, at random aligned offsets."""
    return [(rng.randrange(size // n) * n, n) for _ in range(size // n)]


def _read_pass(r: Reader, ops: Ops) -> int:
    for off, n in ops:
        r.read(off, n)
    return sum(n for _, n in ops)


def read_rate(fresh: Callable[[], Reader], ops: Ops, warm: bool, min_time: float) -> float:
    """Bytes per second of *ops*, repeated for at least *min_time* seconds.

    Warm: one untimed pass first, then timed passes on the same reader.
    Cold: each timed pass on a reader just made.
    """
    nbytes, elapsed = 0, 0.0
    r = fresh()
    try:
        if warm:
            _read_pass(r, ops)
        while elapsed < min_time:
            if not warm and nbytes:
                r.close()
                r = fresh()
            t0 = time.perf_counter()
            nbytes += _read_pass(r, ops)
            elapsed += time.perf_counter() - t0
    finally:
        r.close()
    return nbytes / elapsed


def write_rate(fresh: Callable[[], Reader], size: int, chunk: int, min_time: float) -> float:
    """Bytes per second of writing the file sequentially in *chunk* calls, then flushing."""
    data = os.urandom(chunk)
    nbytes, elapsed = 0, 0.0
    while elapsed < min_time:
        r = fresh()
        try:
            t0 = time.perf_counter()
            for off in range(0, size - chunk + 1, chunk):
                r.write(off, data)
            r.flush()
            elapsed += time.perf_counter() - t0
            nbytes += size - size % chunk
        finally:
            r.close()
    return nbytes / elapsed


@dataclass
class Row:
    case: str
    reader: str
    value: float  # MB/s (10**6 bytes per second)
    baseline: str  # the reader the ratio is taken against
    ratio: float = 1.0
    target: str = ""  # what is wanted of this row, if anything: "ratio >= 0.5; ..."
    checks: list[tuple[str, bool]] = field(default_factory=list)  # (each target, met)
    met: bool | None = None  # every target met (None: no target)
    note: str = ""

    def want(self, checks: list[tuple[str, str, bool]]) -> None:
        """Give the row its targets: (what is wanted, what was measured, met)."""
        self.target = "; ".join(wanted for wanted, _, _ in checks)
        self.checks = [(measured, ok) for _, measured, ok in checks]
        self.met = all(ok for _, ok in self.checks)


@dataclass
class Report:
    machine: dict[str, Any]
    config: dict[str, Any]
    rows: list[Row] = field(default_factory=list)

    def add(self, case: str, rates: dict[str, float], baseline: str = "mmap") -> None:
        """One row per reader of *rates*, each with its ratio to *baseline*."""
        for reader, rate in rates.items():
            self.rows.append(Row(case, reader, rate / 1e6, baseline, rate / rates[baseline]))

    def mark(self, case: str, want: float, beat: str | None = None) -> None:
        """Give vnpager's row of *case* its targets: *want* times its
        baseline, and no slower than the reader *beat* if given."""
        rows = {r.reader: r for r in self.rows if r.case == case}
        row = rows["vnpager"]
        checks = [_ratio_check(row.ratio, want)]
        if beat:
            checks.append((f"MB/s >= {beat}'s", f"{row.value / rows[beat].value:.2f} x {beat}",
                           row.value >= rows[beat].value))
        row.want(checks)

    def target(self, case: str, value: float, baseline: str, base_value: float, want: float,
               also: Iterable[tuple[str, str, bool]] = (), note: str = "") -> None:
        """A row with targets: at least *want* times the baseline, and each
        of *also* (what is wanted, what was measured, met)."""
        row = Row(case, "vnpager", value / 1e6, baseline, value / base_value, note=note)
        row.want([_ratio_check(row.ratio, want), *also])
        self.rows.append(row)


MI_TARGET_US = 2.0  # issue 10: the MI layer's own work per page of a cold cluster


def _mi_check(seconds: float, npages: int, base: float) -> tuple[str, str, bool]:
    """The target on the MI layer's cost per cold page: *seconds* (the
    read's wall time less the host's preadv time in it) over *npages*, in
    microseconds and as a ratio to bare os.preadv's cost per page (*base*
    bytes per second, in the same run)."""
    mi, bare = seconds / npages * 1e6, PAGE / base * 1e6
    return (f"MI work <= {MI_TARGET_US:g} us per page",
            f"MI {mi:.1f} us per page = {mi / bare:.0f} x preadv's {bare:.2f} us", mi <= MI_TARGET_US)


def _ratio_check(ratio: float, want: float) -> tuple[str, str, bool]:
    return f"ratio >= {want:g}", f"ratio {_ratio(ratio)}", ratio >= want


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "implementation": platform.python_implementation(), "system": platform.platform(),
            "date": time.strftime("%Y-%m-%d")}


# --- the cases -------------------------------------------------------------------

def make_file(path: str, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(0, size, 4 * MiB):
            f.write(os.urandom(min(4 * MiB, size - f.tell())))


def bench_readers(report: Report, path: str, cfg: Config, log: Callable[[str], None]) -> None:
    """4 KiB and 1 MiB reads, sequential and random, cold and warm, by every reader."""
    size = cfg.file_size
    physmem = size + 8 * MiB  # the whole file fits: warm means resident
    rng = random.Random(1)
    readers: dict[str, Callable[[], Reader]] = {
        "vnpager": lambda: _Vnpager(path, physmem),
        "mmap": lambda: _Mmap(path),
        "os.preadv": lambda: _Preadv(path),
        "fsspec BlockCache": lambda: _BlockCache(path),
    }
    for n, label in ((4 * KiB, "4 KiB"), (MiB, "1 MiB")):
        for order, ops in (("sequential", sequential(size, n)), ("random", scattered(size, n, rng))):
            for warm in (False, True):
                case = f"read {label} {order} {'warm' if warm else 'cold'}"
                log(case)
                report.add(case, {name: read_rate(fresh, ops, warm, cfg.min_time)
                                  for name, fresh in readers.items()})
    # the targets for resident pages
    report.mark("read 4 KiB sequential warm", 0.5, beat="fsspec BlockCache")
    report.mark("read 1 MiB sequential warm", 0.8)
    report.mark("read 1 MiB random warm", 0.8)

    log("write 64 KiB sequential, then flush")
    writers = {"vnpager": readers["vnpager"], "mmap": readers["mmap"], "os.pwritev": readers["os.preadv"]}
    report.add("write 64 KiB sequential, flush",
               {name: write_rate(fresh, size, 64 * KiB, cfg.min_time) for name, fresh in writers.items()})


@contextmanager
def counted(vm: Any, into: dict[str, int]) -> Iterator[None]:
    """Store in *into* how much each counter of ``vm.stats()`` grew in the block."""
    before = dataclasses.asdict(vm.stats())
    yield
    into.update({k: v - before[k] for k, v in dataclasses.asdict(vm.stats()).items()})


def bench_targets(report: Report, path: str, tmp: str, cfg: Config, log: Callable[[str], None]) -> None:
    """The targets that need more than the table of readers."""
    size = cfg.file_size
    chunk = 64 * KiB
    npages = size // PAGE

    log("cold sequential read of a file 4 times the VM")
    delta: dict[str, int] = {}
    host = _TimedHostFS()
    r = _Vnpager(path, size // 4, host)
    with counted(r.vm, delta):
        t0 = time.perf_counter()
        _read_pass(r, sequential(size, chunk))
        elapsed = time.perf_counter() - t0
    r.close()
    base = read_rate(lambda: _Preadv(path), sequential(size, chunk), False, cfg.min_time)
    per_page = delta["read_ios"] / max(delta["pageins"], 1)
    report.target("cold sequential read, file 4x physmem, 64 KiB", size / elapsed, "os.preadv", base, 0.5,
                  [("read calls per page <= 1/16", f"{per_page:.3f} read calls per page", per_page <= 1 / 16),
                   _mi_check(elapsed - host.seconds, npages, base)])

    log("sequential write of N pages, then flush")
    delta = {}
    r = _Vnpager(path, size + 8 * MiB)
    data = os.urandom(chunk)
    with counted(r.vm, delta):
        t0 = time.perf_counter()
        for off in range(0, size, chunk):
            r.write(off, data)
        r.flush()
        elapsed = time.perf_counter() - t0
    r.close()
    base = write_rate(lambda: _Preadv(path), size, chunk, cfg.min_time)
    report.target(f"write N={npages} pages sequential + flush", size / elapsed, "os.pwritev", base, 0.5,
                  [(f"write calls <= N/16 = {npages // 16}", f"{delta['write_ios']} write calls",
                    delta["write_ios"] <= npages // 16)])

    # the page daemon writes the file back while the writer runs (its lock
    # held across a whole scan made this 0.08 of 2f066f7's rate)
    log("sequential write through vm.open of a file 4 times the VM, then sync")
    report.add("write 64 KiB sequential via vm.open, file 4x physmem, sync",
               {"vnpager": write_rate(lambda: _VmFile(path, size // 4), size, chunk, cfg.min_time),
                "os.pwritev": base}, baseline="os.pwritev")

    log("eight threads on a slow backend against one")
    paths = [os.path.join(tmp, f"thread{i}") for i in range(8)]
    for p in paths:
        make_file(p, cfg.thread_file_size)
    one = _slow_read_rate(paths[:1], cfg)
    eight = _slow_read_rate(paths, cfg)
    report.target(f"8 threads, own files, {cfg.delay * 1e3:g} ms per read call", eight,
                  "1 thread", one, 5.0, note="throughput of all threads together")


def _slow_read_rate(paths: list[str], cfg: Config) -> float:
    """Bytes per second of one thread per file reading it all, in a fresh VM
    whose files come through a faultfs mount that sleeps on every read call,
    mapped MADV_RANDOM (one read call per page)."""
    from vnpager import ACCESS_READ, MADV_RANDOM, VM, mmap
    from vnpager.vfs.faultfs import FaultFS, FaultPlan
    from vnpager.vfs.hostfs import HostFS, hostfs_vget_path

    plan = FaultPlan()
    plan.delay("read", cfg.delay)
    size = cfg.thread_file_size
    with VM(physmem=len(paths) * size + 8 * MiB) as vm:
        mp = vm.vfs.mount(FaultFS(HostFS(), plan), "slow")
        maps = []
        for p in paths:
            vp = hostfs_vget_path(vm.vfs, mp, p)
            maps.append(vm.map(vp, size, access=ACCESS_READ))
            vm.vfs.vrele(vp)  # the map holds the object
            maps[-1].madvise(MADV_RANDOM)  # a call per page: see the module doc

        def scan(m: mmap) -> None:
            for off in range(0, size, 64 * KiB):
                m[off:off + 64 * KiB]

        threads = [threading.Thread(target=scan, args=(m,)) for m in maps]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        for m in maps:
            m.close()
        return len(paths) * size / elapsed


def run(cfg: Config, log: Callable[[str], None]) -> Report:
    report = Report(machine(), asdict(cfg))
    with tempfile.TemporaryDirectory(prefix="vnpager-bench-") as tmp:
        path = os.path.join(tmp, "data")
        make_file(path, cfg.file_size)
        bench_readers(report, path, cfg, log)
        bench_targets(report, path, tmp, cfg, log)
    return report


# --- output -------------------------------------------------------------------------

def _ratio(x: float) -> str:
    return f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"


def _outcome(row: Row, rich: bool = False) -> str:
    """What each target of *row* measured, and whether it was met (a met
    target never shows under a missed one's verdict), then the note."""
    parts = []
    for measured, ok in row.checks:
        text = f"{measured}: {'met' if ok else 'MISSED'}"
        parts.append(f"[{'green' if ok else 'red'}]{text}[/]" if rich else text)
    return "; ".join([*parts, *([row.note] if row.note else [])])


def table(report: Report) -> Table:
    m = report.machine
    t = Table(title=f"vnpager bench: {human(report.config['file_size'])} file, {m['nproc']} x {m['cpu']}, "
                    f"Python {m['python']}, {m['date']}", title_justify="left")
    t.add_column("case")
    t.add_column("reader")
    t.add_column("MB/s", justify="right")
    t.add_column("ratio", justify="right")
    t.add_column("to")
    t.add_column("target")
    t.add_column("outcome")
    last = ""
    for row in report.rows:
        t.add_row("" if row.case == last else row.case, row.reader, f"{row.value:,.1f}", _ratio(row.ratio),
                  row.baseline, row.target, _outcome(row, rich=True))
        last = row.case
    return t


def markdown(report: Report) -> Iterable[str]:
    """The table as Markdown, for the README."""
    yield "| case | reader | MB/s | ratio | to | target | outcome |"
    yield "|---|---|---:|---:|---|---|---|"
    for row in report.rows:
        yield (f"| {row.case} | {row.reader} | {row.value:,.1f} | {_ratio(row.ratio)} | {row.baseline} "
               f"| {row.target} | {_outcome(row)} |")


def run_bench(args: argparse.Namespace) -> int:
    # a wide table: do not squeeze it into 80 columns when piped
    console = Console(stderr=args.json, highlight=False, width=None if sys.stdout.isatty() else 160)
    if args.mount:  # fio on FUSE mounts: vnpager.tools.bench_mount
        try:
            from vnpager.tools.bench_mount import run_mount_bench
        except ImportError as e:
            print(f"vnpager bench --mount needs the fuse extra (pip install -e '.[fuse]'): {e}",
                  file=sys.stderr)
            return 1
        return run_mount_bench(args, console)
    if args.s3:  # an object on Ceph's RADOS Gateway: vnpager.tools.bench_s3
        from vnpager.tools.bench_s3 import run_s3_bench

        return run_s3_bench(args, console)
    if args.mmu == "hardware":  # the hardware MMU's targets: vnpager.tools.bench_hw
        from vnpager.tools.bench_hw import run_hw_bench

        return run_hw_bench(args, console)
    cfg = QUICK if args.quick else FULL
    emit(args, console, measured(lambda log: run(cfg, log)), markdown, table)
    return 0


def cells_table(title: str, header: list[str], left: Iterable[str], rows: Iterable[list[str]]) -> Table:
    """A rich table of *rows* under *header*, the columns named in *left* aligned left."""
    left = set(left)
    t = Table(title=title, title_justify="left")
    for h in header:
        t.add_column(h, justify="left" if h in left else "right")
    for cells in rows:
        t.add_row(*cells)
    return t


def cells_markdown(header: list[str], left: Iterable[str], rows: Iterable[list[str]]) -> Iterator[str]:
    """The same as Markdown, for the README."""
    left = set(left)
    yield "| " + " | ".join(header) + " |"
    yield "|" + "|".join("---" if h in left else "---:" for h in header) + "|"
    for cells in rows:
        yield "| " + " | ".join(cells) + " |"


def measured(measure: Callable[[Callable[[str], None]], Any]) -> Any:
    """The report of ``measure(log)``, shown in progress: *log* names each case as it starts."""
    with progress(total=False) as bar:
        task = bar.add_task("measuring")
        return measure(lambda case: bar.update(task, description=f"measuring: {case}"))


def emit(args: argparse.Namespace, console: Console, report: Any,
         markdown: Callable[[Any], Iterable[str]], table: Callable[[Any], Table]) -> None:
    """Print *report* as --json, --markdown or a rich table asks."""
    if args.json:
        print(json.dumps({"machine": report.machine, "config": report.config,
                          "rows": [asdict(r) for r in report.rows]}, indent=2))
    elif args.markdown:
        print("\n".join(markdown(report)))
    else:
        console.print(table(report))


def add_subcommands(subparsers: Any) -> None:
    p = subparsers.add_parser("bench", help="measure vnpager.mmap against mmap, os.preadv and fsspec",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="a smaller file, shorter measurements")
    p.add_argument("--mount", action="store_true",
                   help="fio, dbench and sqlite3 on a vnpager mount, on its SRC directly and on rclone")
    p.add_argument("--s3", action="store_true",
                   help="an object on Ceph's RADOS Gateway (localhost): vnpager against s3fs and rclone")
    p.add_argument("--mmu", choices=("software", "hardware"), default="software",
                   help="hardware: the hardware MMU's targets (a pager server, userfaultfd)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the results as JSON")
    out.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.set_defaults(func=run_bench)
