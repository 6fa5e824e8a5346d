"""``vnpager bench --mount``: fio, dbench and sqlite3 inserts on a vnpager
mount, on SRC directly, and on an rclone mount of SRC (``--vfs-cache-mode
full``) when rclone is installed.  A benchmark, not a test.

Four fio jobs, one after the other, on one file four times the mount's
physmem: sequential reads and writes of 1 MiB, random reads and writes of
4 KiB, each for a fixed time, synchronous (psync, one request at a time).
Writes end with an fsync, so their figures include getting the data to
SRC.  The file starts in the host's page cache, as every target's backing
store.  On the two mounts fio opens the file with O_DIRECT, so that every
request reaches the FUSE server: without it the kernel's page cache of the
open file would serve repeated passes, and we would measure the kernel
twice.  On SRC directly fio reads and writes through the host's page cache,
the ceiling that a mount on SRC cannot pass.

Then the programs that are mostly metadata and small synchronous writes:
dbench (its standard NetBench load, ``client.txt``, one client per CPU, for
a fixed time; creates, opens, stats, directory listings, renames, unlinks,
reads, writes and fsyncs of many small files) and sqlite3 inserts through
Python's sqlite3 module, in the default rollback journal and in WAL: single
-row transactions for a fixed time (each commit syncs), and one transaction
of many rows.  These run as programs do, through the kernel's page cache of
each mount (no O_DIRECT).

Each mount is made, measured and unmounted in turn (never two on SRC at
once), its server process reaped; every figure is in MB/s (10**6 bytes a
second) where the job moves file data, and in operations a second (fio's
IOPS, dbench's operations, sqlite3's rows), with its ratio to SRC directly
and to rclone (of MB/s where there are MB/s, else of operations).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from vnpager.fuse.mount import mount_source
from vnpager.tools.bench import cells_markdown, cells_table, emit, machine, make_file
from vnpager.tools.show import human, progress

MiB = 1 << 20
MOUNT_WAIT = 30.0  # seconds for a server to mount
UNMOUNT_WAIT = 300.0  # seconds for a server to write back and exit after fusermount3 -u
DBENCH_LOAD = "/usr/share/dbench/client.txt"  # Debian's dbench package
SQLITE_ROW = b"x" * 100  # the value of each inserted row


@dataclass(frozen=True)
class MountConfig:
    physmem: int  # of the vnpager mount
    runtime: int  # seconds per fio job, and per sqlite3 single-row job
    dbench_time: int  # seconds of dbench
    bulk_rows: int  # rows of the one-transaction sqlite3 job

    @property
    def file_size(self) -> int:
        return 4 * self.physmem  # the pager must page


QUICK = MountConfig(physmem=8 * MiB, runtime=1, dbench_time=3, bulk_rows=20_000)
FULL = MountConfig(physmem=32 * MiB, runtime=5, dbench_time=10, bulk_rows=100_000)

# a job runs on the directory where a target shows SRC (mounted: True on the
# two mounts) and gives its MB/s (None if it moves no measured data) and ops/s
Measure = Callable[[str, bool, MountConfig], tuple[float | None, float]]


@dataclass(frozen=True)
class Job:
    name: str
    measure: Measure


@dataclass
class Row:
    job: str
    target: str
    mbps: float | None  # None: the job's figure is its operations
    ops: float  # a second: fio's IOPS, dbench's operations, sqlite3's rows
    to_src: float | None = None  # None if either failed
    to_rclone: float | None = None  # None without rclone
    error: str | None = None  # why the job failed on this target

    @property
    def rate(self) -> float:
        """The figure that ratios compare."""
        return self.mbps if self.mbps is not None else self.ops


@dataclass
class MountReport:
    machine: dict[str, Any]
    config: dict[str, Any]
    rows: list[Row] = field(default_factory=list)

    def ratios(self) -> None:
        """Each row's ratio to SRC directly and to rclone, of the same job."""
        base = {(r.job, r.target): r.rate for r in self.rows if r.error is None}
        for r in self.rows:
            r.to_src = _ratio(r, base.get((r.job, "SRC")))
            r.to_rclone = _ratio(r, base.get((r.job, "rclone")))


def _ratio(r: Row, base: float | None) -> float | None:
    return None if r.error is not None or not base else r.rate / base


def fio(rw: str, bs: str, where: str, mounted: bool, cfg: MountConfig) -> tuple[float, float]:
    """MB/s and IOPS of one fio job on the file ``fio.dat`` in *where*."""
    argv = ["fio", "--name=job", f"--filename={os.path.join(where, 'fio.dat')}", f"--rw={rw}",
            f"--bs={bs}", f"--size={cfg.file_size}", "--ioengine=psync", f"--direct={int(mounted)}",
            "--invalidate=0", "--fallocate=none", "--time_based", f"--runtime={cfg.runtime}",
            "--output-format=json"]
    write = "write" in rw
    if write:
        argv.append("--end_fsync=1")
    out = subprocess.run(argv, capture_output=True, text=True, check=True,
                         timeout=cfg.runtime * 10 + 120).stdout
    stats = json.loads(out)["jobs"][0]["write" if write else "read"]
    return float(stats["bw_bytes"]) / 1e6, float(stats["iops"])


@contextlib.contextmanager
def scratch(where: str, name: str) -> Iterator[str]:
    """A new directory for one job in *where*, its name starting with *name*,
    removed after it, so that every target starts each job on the same tree
    (of a name of its own: rclone may not have let the last one go yet)."""
    d = tempfile.mkdtemp(prefix=f"{name}-", dir=where)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def dbench(where: str, mounted: bool, cfg: MountConfig) -> tuple[float, float]:
    """dbench's MB/s and operations a second: its NetBench load, one client per CPU."""
    clients = os.cpu_count() or 1
    with scratch(where, "dbench") as d:
        out = subprocess.run(["dbench", "-D", d, "-t", str(cfg.dbench_time), "-c", DBENCH_LOAD,
                              str(clients)], capture_output=True, text=True, check=True,
                             timeout=cfg.dbench_time * 10 + 120).stdout
    return parse_dbench(out, cfg.dbench_time)


def parse_dbench(out: str, seconds: float) -> tuple[float, float]:
    """The throughput line of dbench's output *out*, and its operations
    counted (the table of operations) over *seconds*."""
    found = re.search(r"^Throughput ([\d.]+) MB/sec", out, re.M)
    if found is None:
        raise RuntimeError(f"no throughput in dbench's output: {out[-500:]}")
    ops = sum(int(m[1]) for m in re.finditer(r"^ +[A-Za-z]+ +(\d+) +[\d.]+ +[\d.]+ *$", out, re.M))
    return float(found[1]), ops / seconds


def sqlite_inserts(wal: bool, bulk: bool, where: str, mounted: bool, cfg: MountConfig
                   ) -> tuple[None, float]:
    """Rows a second inserted into a new database in *where*: one transaction
    of ``cfg.bulk_rows`` rows (*bulk*) or single-row transactions for
    ``cfg.runtime`` seconds, each committed (synced) on its own; in WAL or
    the default rollback journal, synchronous=FULL (the default) either way."""
    with scratch(where, "sqlite") as d:
        db = sqlite3.connect(os.path.join(d, "bench.db"), isolation_level=None)  # autocommit
        try:
            if wal and db.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
                raise RuntimeError("WAL refused")
            db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
            insert = "INSERT INTO t (v) VALUES (?)"
            start = time.perf_counter()
            if bulk:
                db.execute("BEGIN")
                db.executemany(insert, ((SQLITE_ROW,) for _ in range(cfg.bulk_rows)))
                db.execute("COMMIT")
                rows = cfg.bulk_rows
            else:
                rows, deadline = 0, start + cfg.runtime
                while time.perf_counter() < deadline:
                    db.execute(insert, (SQLITE_ROW,))
                    rows += 1
            return None, rows / (time.perf_counter() - start)
        finally:
            db.close()


JOBS = (
    Job("sequential read 1 MiB", functools.partial(fio, "read", "1M")),
    Job("random read 4 KiB", functools.partial(fio, "randread", "4k")),
    Job("sequential write 1 MiB", functools.partial(fio, "write", "1M")),
    Job("random write 4 KiB", functools.partial(fio, "randwrite", "4k")),
    Job("dbench", dbench),
    Job("sqlite3 1-row transactions", functools.partial(sqlite_inserts, False, False)),
    Job("sqlite3 1-row transactions, WAL", functools.partial(sqlite_inserts, True, False)),
    Job("sqlite3 one transaction", functools.partial(sqlite_inserts, False, True)),
    Job("sqlite3 one transaction, WAL", functools.partial(sqlite_inserts, True, True)),
)


def measure(job: Job, target: str, where: str, cfg: MountConfig) -> Row:
    """One job on one target; a job that fails there is a row that says why
    (rclone may refuse what a program asks), not the end of the run."""
    try:
        mbps, ops = job.measure(where, target != "SRC", cfg)
    except (OSError, RuntimeError, sqlite3.Error, subprocess.SubprocessError) as e:
        return Row(job.name, target, None, math.nan, error=f"{type(e).__name__}: {e}"[:200])
    return Row(job.name, target, mbps, ops)


@contextlib.contextmanager
def serving(argv: list[str], mnt: str, log: str, env: dict[str, str] | None = None) -> Iterator[None]:
    """Run the FUSE server *argv* (in the foreground, in *env*) until it has
    mounted *mnt*; at the end unmount, wait for it to write back and exit,
    and make sure neither it nor the mount is left behind."""
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + MOUNT_WAIT
        while mount_source(mnt) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(log) as f:
                    raise RuntimeError(f"{argv[0]} did not mount {mnt}: {f.read()[-2000:]}")
            time.sleep(0.05)
        yield
    finally:
        if mount_source(mnt) is not None:
            subprocess.run(["fusermount3", "-u", mnt], check=False)
        try:
            proc.wait(timeout=UNMOUNT_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if mount_source(mnt) is not None:  # killed before it unmounted
            subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)


def target_names() -> list[str]:
    return ["SRC", "vnpager"] + (["rclone"] if shutil.which("rclone") else [])


@contextlib.contextmanager
def mounted(target: str, tmp: str, src: str, cfg: MountConfig) -> Iterator[str]:
    """Where SRC appears for *target*, mounted (if it is a mount) for the block."""
    if target == "SRC":
        yield src
        return
    mnt = os.path.join(tmp, target)
    os.mkdir(mnt)
    if target == "vnpager":
        argv = [sys.executable, "-m", "vnpager", "mount", src, mnt, "--foreground",
                "--physmem", str(cfg.physmem)]
    else:
        config = os.path.join(tmp, "rclone.conf")
        open(config, "w").close()  # no remotes: SRC is a local path
        argv = ["rclone", "mount", src, mnt, "--config", config, "--vfs-cache-mode", "full",
                "--cache-dir", os.path.join(tmp, "rclone-cache")]
    with serving(argv, mnt, os.path.join(tmp, f"{target}.log")):
        yield mnt


def run(cfg: MountConfig, log: Callable[[str], None]) -> MountReport:
    report = MountReport(machine(), {**asdict(cfg), "file_size": cfg.file_size,
                                     "rclone": _rclone_version(), "dbench": DBENCH_LOAD,
                                     "sqlite": sqlite3.sqlite_version})
    with tempfile.TemporaryDirectory(prefix="vnpager-bench-mount-") as tmp:
        src = os.path.join(tmp, "src")
        os.mkdir(src)
        make_file(os.path.join(src, "fio.dat"), cfg.file_size)
        for target in target_names():
            log(f"mounting {target}")
            with mounted(target, tmp, src, cfg) as where:
                for job in JOBS:
                    log(f"{target}: {job.name}")
                    report.rows.append(measure(job, target, where, cfg))
            log(f"{target}: unmounted")
    order = [j.name for j in JOBS]
    report.rows.sort(key=lambda r: order.index(r.job))
    report.ratios()
    return report


def _rclone_version() -> str | None:
    if not shutil.which("rclone"):
        return None
    out = subprocess.run(["rclone", "version"], capture_output=True, text=True, check=False).stdout
    return out.split("\n", 1)[0]


# --- output ---------------------------------------------------------------------------

def _cells(r: Row) -> list[str]:
    if r.error is not None:
        return [r.job, r.target, "failed", "", "", r.error]
    return [r.job, r.target, "" if r.mbps is None else f"{r.mbps:,.1f}", f"{r.ops:,.0f}",
            "" if r.to_src is None else f"{r.to_src:.3f}",
            "" if r.to_rclone is None else f"{r.to_rclone:.2f}"]


HEADER = ["job", "target", "MB/s", "ops/s", "to SRC", "to rclone"]
LEFT = ("job", "target")


def table(report: MountReport) -> Table:
    m, c = report.machine, report.config
    return cells_table(f"vnpager bench --mount: {human(c['file_size'])} file, vnpager physmem "
                       f"{human(c['physmem'])}, {c['runtime']} s per fio job, dbench {c['dbench_time']} s; "
                       f"{m['nproc']} x {m['cpu']}, {m['date']}", HEADER, LEFT, map(_cells, report.rows))


def markdown(report: MountReport) -> Iterable[str]:
    return cells_markdown(HEADER, LEFT, map(_cells, report.rows))


def run_mount_bench(args: argparse.Namespace, console: Console) -> int:
    if not shutil.which("fio"):
        print("vnpager bench --mount needs fio (apt-get install fio, or make sysdeps)", file=sys.stderr)
        return 1
    if not shutil.which("dbench") or not os.path.exists(DBENCH_LOAD):
        print("vnpager bench --mount needs dbench (apt-get install dbench, or make bench-deps)",
              file=sys.stderr)
        return 1
    with progress(total=False) as bar:
        task = bar.add_task("measuring")
        report = run(QUICK if args.quick else FULL,
                     lambda what: bar.update(task, description=f"measuring: {what}"))
    emit(args, console, report, markdown, table)
    return 0
