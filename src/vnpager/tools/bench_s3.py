"""``vnpager bench --s3``: readers and a writer of one object on Ceph's RADOS
Gateway on localhost (:class:`vnpager.tools.objservers.CephRGW`), vnpager
against what fsspec users have today.  A benchmark, not a test.

The readers, each from a cold start (a new VM, filesystem or mount):

* **vnpager**: ``vm.open(url)`` of a software VM of *physmem* bytes (its
  clusters and read-ahead windows are ranged GETs);
* **s3fs readahead**: s3fs's default file (its read-ahead cache, 50 MiB blocks);
* **s3fs blockcache**: s3fs's block cache (``cache_type="blockcache"``);
* **rclone**: an ``rclone mount`` of the bucket with ``--vfs-cache-mode full``.

The cases: a sequential read of the whole object in 1 MiB reads; random
page-aligned 4 KiB reads (the same offsets for every reader but the read-ahead cache); and a write of
random 4 KiB pages into the object, then the flush that publishes it
(vnpager) against downloading and re-uploading the object whole (what a
program on s3fs does to change a few pages: objects are immutable).

Every request is counted by the server itself: RGW's ops log
(``CephRGW.ops_log``) names each request with its bytes, so GETs per MiB
read and bytes fetched per byte used are the same measure for every reader,
rclone's included; uploads are the bytes of the parts' bodies.  The log
also has RGW's time for each request, so every row says in how much of its
time the server was serving it ("server busy"), and a missed target's row
has a profile: the requests by operation, with RGW's mean time for each.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table

from vnpager.tools.bench import cells_markdown, cells_table, emit, machine, measured
from vnpager.tools.objservers import CephRGW, S3User
from vnpager.tools.show import human

MiB = 1 << 20
PAGE = 4096
OPS_SETTLE = 0.5  # seconds of no new ops-log entry before a count is taken
OPS_WAIT = 30.0  # seconds for RGW to log the requests of a case
REQUEST_TIMEOUT = 900  # seconds botocore waits for an answer (see _options)


@dataclass(frozen=True)
class Obj:
    """The object measured: its server's user, bucket and key."""

    user: S3User
    bucket: str
    key: str = "object.bin"

    @property
    def path(self) -> str:
        return f"{self.bucket}/{self.key}"


@dataclass(frozen=True)
class S3Config:
    object_size: int
    physmem: int
    random_reads: int  # 4 KiB reads at random pages
    dirty_pages: int  # 4 KiB pages written at random, then published
    chunk: int = MiB  # a sequential reader's read size


QUICK = S3Config(object_size=64 * MiB, physmem=16 * MiB, random_reads=300, dirty_pages=256)
FULL = S3Config(object_size=1024 * MiB, physmem=16 * MiB, random_reads=2000, dirty_pages=16384)


@dataclass
class Row:
    case: str
    reader: str
    rate: float  # MB/s (10**6 bytes a second), or operations a second
    unit: str
    used: int  # bytes the program read or wrote
    gets: int = 0  # GET requests the server answered (HEADs not counted)
    fetched: int = 0  # bytes the server sent for them
    uploaded: int = 0  # bytes of part and object bodies the server received
    ratio: float | None = None  # to the case's baseline
    baseline: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""
    elapsed: float = 0.0  # seconds of the case, the reader's open and close included
    # what the server did for it: per RGW operation, [requests, ms of RGW's total_time]
    server: dict[str, list[int]] = field(default_factory=dict)
    busy: float = 0.0  # seconds in which the server was serving at least one of its requests
    most: int = 0  # the most of its requests the server had under way at once

    @property
    def gets_per_mib(self) -> float:
        return self.gets / (self.used / MiB) if self.used else 0.0

    @property
    def fetched_per_used(self) -> float:
        return self.fetched / self.used if self.used else 0.0


@dataclass
class S3Report:
    machine: dict[str, Any]
    config: dict[str, Any]
    rows: list[Row] = field(default_factory=list)

    def case(self, name: str) -> dict[str, Row]:
        return {r.reader: r for r in self.rows if r.case == name}


# --- the server's count of requests ---------------------------------------------

class OpsLog:
    """RGW's ops log: one JSON line per request it served, with its bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        """Where the requests from now on begin (wait for the log to settle first)."""
        self._settled()
        return self.path.stat().st_size if self.path.exists() else 0

    def since(self, mark: int) -> list[dict[str, Any]]:
        """The requests logged after *mark*, once RGW has logged them all."""
        self._settled()
        with open(self.path, "rb") as f:
            f.seek(mark)
            text = f.read().decode()
        entries, decoder, pos = [], json.JSONDecoder(), 0
        while (pos := _skip_space(text, pos)) < len(text):  # RGW does not always end an entry's line
            entry, pos = decoder.raw_decode(text, pos)
            entries.append(entry)
        return entries

    def _settled(self) -> None:
        deadline = time.monotonic() + OPS_WAIT
        size = -1
        while time.monotonic() < deadline:
            now = self.path.stat().st_size if self.path.exists() else 0
            if now == size:
                return
            size = now
            time.sleep(OPS_SETTLE)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def count(row: Row, ops: Iterable[dict[str, Any]]) -> Row:
    """Put the server's figures for *ops* into *row*."""
    spans = []
    for op in ops:
        if op["uri"].startswith("GET ") and op["operation"] == "get_obj":
            row.gets += 1
            row.fetched += int(op["bytes_sent"])
        if op["uri"].startswith(("PUT ", "POST ")):
            row.uploaded += int(op["bytes_received"])
        ms = int(op.get("total_time", 0))
        name = "head_obj" if op["uri"].startswith("HEAD ") else str(op["operation"])  # RGW: get_obj
        n_ms = row.server.setdefault(name, [0, 0])
        n_ms[0], n_ms[1] = n_ms[0] + 1, n_ms[1] + ms
        if "time" in op:  # when RGW began it
            begin = datetime.datetime.fromisoformat(op["time"].replace("Z", "+00:00")).timestamp()
            spans.append((begin, begin + ms / 1000))
    row.busy, row.most = _busy(spans)
    return row


def _busy(spans: list[tuple[float, float]]) -> tuple[float, int]:
    """The length of the union of *spans*, and the most of them that overlap."""
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], e[1]))
    busy, depth, most, since = 0.0, 0, 0, 0.0
    for t, step in edges:
        if depth == 0:
            since = t
        depth += step
        most = max(most, depth)
        if depth == 0:
            busy += t - since
    return busy, most


def profile(row: Row) -> str:
    """Where a row's time went, as far as the server says: its requests by
    operation with RGW's mean time for each, and the share of the case's
    wall time in which the server was serving any of them (the rest is the
    client's: its CPU, the copies, the reader's own work)."""
    ops = ", ".join(f"{name} {n:,} x {ms / n:.1f} ms" for name, (n, ms) in
                    sorted(row.server.items(), key=lambda kv: -kv[1][1]) if n)
    share = row.busy / row.elapsed if row.elapsed else 0.0
    return (f"server: {ops or 'no request'}; serving {row.busy:.1f} s of the case's {row.elapsed:.1f} s "
            f"({share:.0%}), at most {row.most} at once")


# --- readers ---------------------------------------------------------------------

class Reader(Protocol):
    def seek(self, pos: int) -> int: ...
    def readinto(self, b: Any) -> int | None: ...


Open = Callable[[], contextlib.AbstractContextManager[Reader]]
# a read-ahead cache of 50 MiB blocks reads one for each random page: 12,800
# times the bytes used, hours for the full case; it is no random reader's choice
SEQUENTIAL_ONLY = ("s3fs readahead",)


@contextlib.contextmanager
def _vnpager_file(obj: Obj, cfg: S3Config, mode: str = "rb") -> Iterator[Any]:
    import vnpager
    from vnpager.vfs.objstore import PartPolicy

    vm = vnpager.VM(physmem=cfg.physmem)
    try:
        # the parts RGW is configured to take (objservers' ceph.conf)
        vm.mount_objects("s3", policy=PartPolicy(min_part=PAGE, max_parts=1 << 20), **_options(obj.user))
        with vm.open(f"s3://{obj.path}", mode) as f:
            yield f
    finally:
        vm.close()


def _options(user: S3User) -> dict[str, Any]:
    """s3fs's options for every reader and writer: RGW on a loaded machine may
    take minutes to complete an upload of thousands of parts, and botocore,
    whose read timeout is 60 s, then sends the completion again, which RGW
    refuses while the first is under way ("already in progress")."""
    return {**user.storage_options(), "config_kwargs": {"read_timeout": REQUEST_TIMEOUT}}


def _s3fs(user: S3User) -> Any:
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **_options(user))


@contextlib.contextmanager
def _s3fs_file(obj: Obj, cache_type: str) -> Iterator[Any]:
    with _s3fs(obj.user).open(obj.path, "rb", cache_type=cache_type) as f:
        yield f


@contextlib.contextmanager
def _rclone_file(obj: Obj, tmp: str) -> Iterator[Any]:
    from vnpager.tools.bench_mount import serving

    mnt, cache = os.path.join(tmp, "rclone"), os.path.join(tmp, "rclone-cache")
    os.makedirs(mnt, exist_ok=True)
    shutil.rmtree(cache, ignore_errors=True)  # cold: nothing cached from an earlier case
    argv = ["rclone", "mount", f"rgw:{obj.bucket}", mnt, "--config", os.devnull, "--vfs-cache-mode", "full",
            "--cache-dir", cache]
    env = {**os.environ, **obj.user.rclone_env("rgw")}
    with serving(argv, mnt, os.path.join(tmp, "rclone.log"), env), \
            open(os.path.join(mnt, obj.key), "rb", buffering=0) as f:
        yield f


def readers(obj: Obj, cfg: S3Config, tmp: str) -> dict[str, Open]:
    out: dict[str, Open] = {
        "vnpager": lambda: _vnpager_file(obj, cfg),
        "s3fs readahead": lambda: _s3fs_file(obj, "readahead"),
        "s3fs blockcache": lambda: _s3fs_file(obj, "blockcache"),
    }
    if shutil.which("rclone") and shutil.which("fusermount3"):
        out["rclone"] = lambda: _rclone_file(obj, tmp)
    return out


def sequential(f: Reader, cfg: S3Config) -> int:
    buf = bytearray(cfg.chunk)
    total = 0
    while n := f.readinto(buf):
        total += n
    return total


def scattered(f: Reader, offsets: list[int]) -> int:
    buf = bytearray(PAGE)
    total = 0
    for off in offsets:
        f.seek(off)
        total += f.readinto(buf) or 0
    return total


def measure(case: str, reader: str, opener: Open, work: Callable[[Reader], int], ops: OpsLog,
            per_op: int = 0) -> Row:
    """One reader's row of *case*: its rate (MB/s, or operations a second
    with *per_op* bytes an operation) and the server's count."""
    mark = ops.mark()
    start = time.perf_counter()
    with opener() as f:
        used = work(f)
    elapsed = time.perf_counter() - start
    rate, unit = (used / per_op / elapsed, "ops/s") if per_op else (used / elapsed / 1e6, "MB/s")
    return count(Row(case, reader, rate, unit, used, elapsed=elapsed), ops.since(mark))


# --- the write case --------------------------------------------------------------

def _write_pages(f: Any, offsets: list[int], rng: random.Random) -> int:
    for off in offsets:
        f.seek(off)
        f.write(rng.randbytes(PAGE))
    return len(offsets) * PAGE


def write_rows(obj: Obj, cfg: S3Config, ops: OpsLog, offsets: list[int]) -> list[Row]:
    """vnpager writes the pages and publishes; s3fs rewrites the object whole."""
    rows = []
    mark = ops.mark()
    start = time.perf_counter()
    with _vnpager_file(obj, cfg, "r+b") as f:
        dirty = _write_pages(f, offsets, random.Random(7))
    # the close published the new version
    elapsed = time.perf_counter() - start
    rows.append(count(Row("write pages, publish", "vnpager", dirty / elapsed / 1e6, "MB/s", dirty,
                          elapsed=elapsed), ops.since(mark)))
    mark = ops.mark()
    start = time.perf_counter()
    fs = _s3fs(obj.user)
    data = bytearray(fs.cat_file(obj.path))
    rng = random.Random(7)
    for off in offsets:
        data[off:off + PAGE] = rng.randbytes(PAGE)
    fs.pipe_file(obj.path, bytes(data))
    elapsed = time.perf_counter() - start
    rows.append(count(Row("write pages, publish", "s3fs whole object", dirty / elapsed / 1e6, "MB/s",
                          dirty, elapsed=elapsed), ops.since(mark)))
    return rows


# --- targets -----------------------------------------------------------------------

def targets(report: S3Report) -> None:
    """Ratios to each case's baseline, and the issue's targets on vnpager's rows."""
    seq = report.case("sequential read")
    best = max((r for name, r in seq.items() if name.startswith("s3fs")), key=lambda r: r.rate)
    _ratios(seq, best.reader)
    v = seq["vnpager"]
    checks = [(f"MB/s >= {best.reader}'s", v.rate >= best.rate)]
    if "rclone" in seq:
        checks.append(("MB/s >= rclone's", v.rate >= seq["rclone"].rate))
    _want(v, checks)
    rnd = report.case("random 4 KiB reads")
    _ratios(rnd, "s3fs blockcache")
    v = rnd["vnpager"]
    _want(v, [("ops/s >= s3fs blockcache's", v.rate >= rnd["s3fs blockcache"].rate),
              ("fetched <= 2 x used", v.fetched <= 2 * v.used)])
    wr = report.case("write pages, publish")
    _ratios(wr, "s3fs whole object")
    v = wr["vnpager"]
    _want(v, [("uploaded <= 2 x dirty", v.uploaded <= 2 * v.used)])


def _ratios(rows: dict[str, Row], baseline: str) -> None:
    for r in rows.values():
        r.baseline, r.ratio = baseline, r.rate / rows[baseline].rate


def _want(row: Row, checks: list[tuple[str, bool]]) -> None:
    row.target = "; ".join(what for what, _ in checks)
    row.met = all(ok for _, ok in checks)
    row.note = ", ".join(f"{'met' if ok else 'MISSED'}: {what}" for what, ok in checks)
    if not row.met:
        row.note += f"<br>profile: {profile(row)}"


# --- the run -------------------------------------------------------------------------

def _upload(obj: Obj, cfg: S3Config) -> None:
    fs = _s3fs(obj.user)
    fs.mkdir(obj.bucket)
    with fs.open(obj.path, "wb", block_size=64 * MiB) as f:
        rng = random.Random(1)
        for off in range(0, cfg.object_size, 16 * MiB):
            f.write(rng.randbytes(min(16 * MiB, cfg.object_size - off)))


def run(cfg: S3Config, log: Callable[[str], None], rgw: CephRGW | None = None) -> S3Report:
    """Measure every case on *rgw*, or on a CephRGW of its own."""
    report = S3Report(machine(), asdict(cfg))
    rng = random.Random(3)
    npages = cfg.object_size // PAGE
    offsets = [rng.randrange(npages) * PAGE for _ in range(cfg.random_reads)]
    dirty = sorted(rng.sample(range(npages), cfg.dirty_pages))
    with tempfile.TemporaryDirectory(prefix="vnpager-bench-s3-") as tmp, \
            contextlib.nullcontext(rgw) if rgw else CephRGW() as rgw:
        ops = OpsLog(rgw.ops_log)
        log(f"uploading a {human(cfg.object_size)} object")
        obj = Obj(rgw.user, f"vnpager-bench-{uuid.uuid4().hex[:8]}")
        _upload(obj, cfg)
        for name, opener in readers(obj, cfg, tmp).items():
            log(f"{name}: sequential read")
            report.rows.append(measure("sequential read", name, opener, lambda f: sequential(f, cfg), ops))
            if name in SEQUENTIAL_ONLY:
                continue
            log(f"{name}: random 4 KiB reads")
            report.rows.append(measure("random 4 KiB reads", name, opener,
                                       lambda f: scattered(f, offsets), ops, per_op=PAGE))
        log("writing pages")
        report.rows.extend(write_rows(obj, cfg, ops, [p * PAGE for p in dirty]))
    targets(report)
    return report


# --- output --------------------------------------------------------------------------

HEADER = ["case", "reader", "rate", "ratio", "to", "GETs/MiB", "fetched/used", "uploaded/written",
          "server busy", "outcome"]
LEFT = ("case", "reader", "to", "outcome")


def _cells(r: Row) -> list[str]:
    return [r.case, r.reader, f"{r.rate:,.1f} {r.unit}", "" if r.ratio is None else f"{r.ratio:.2f}",
            r.baseline, f"{r.gets_per_mib:.2f}", f"{r.fetched_per_used:.2f}",
            f"{r.uploaded / r.used:.2f}" if r.uploaded else "",
            f"{r.busy / r.elapsed:.0%}, {r.most} at once" if r.elapsed else "", r.note]


def table(report: S3Report) -> Table:
    m, c = report.machine, report.config
    return cells_table(f"vnpager bench --s3: a {human(c['object_size'])} object on RGW (localhost), vnpager "
                       f"physmem {human(c['physmem'])}; {m['nproc']} x {m['cpu']}, {m['date']}",
                       HEADER, LEFT, map(_cells, report.rows))


def markdown(report: S3Report) -> Iterable[str]:
    return cells_markdown(HEADER, LEFT, map(_cells, report.rows))


def run_s3_bench(args: argparse.Namespace, console: Console) -> int:
    if os.geteuid() != 0 or not shutil.which("radosgw"):
        print("vnpager bench --s3 runs Ceph's RADOS Gateway: as root, with Debian's radosgw, "
              "ceph-mon, ceph-mgr and ceph-osd installed (make sysdeps)", file=sys.stderr)
        return 1
    cfg = QUICK if args.quick else FULL
    emit(args, console, measured(lambda log: run(cfg, log)), markdown, table)
    return 0
