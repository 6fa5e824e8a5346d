"""``vnpager bench --mount``: fio on a vnpager mount, on SRC directly, and on
an rclone mount of SRC (``--vfs-cache-mode full``) when rclone is installed.
A benchmark, not a test.

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

Each mount is made, measured and unmounted in turn (never two on SRC at
once), its server process reaped; every figure is in MB/s (10**6 bytes a
second) and IOPS, with its ratio to SRC directly and to rclone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
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
from vnpager.tools.bench import emit, machine, make_file
from vnpager.tools.show import human, progress

MiB = 1 << 20
MOUNT_WAIT = 30.0  # seconds for a server to mount
UNMOUNT_WAIT = 300.0  # seconds for a server to write back and exit after fusermount3 -u


@dataclass(frozen=True)
class MountConfig:
    physmem: int  # of the vnpager mount
    runtime: int  # seconds per fio job

    @property
    def file_size(self) -> int:
        return 4 * self.physmem  # the pager must page


QUICK = MountConfig(physmem=8 * MiB, runtime=1)
FULL = MountConfig(physmem=32 * MiB, runtime=5)

# the fio jobs: (name, rw, block size)
JOBS = (
    ("sequential read 1 MiB", "read", "1M"),
    ("random read 4 KiB", "randread", "4k"),
    ("sequential write 1 MiB", "write", "1M"),
    ("random write 4 KiB", "randwrite", "4k"),
)


@dataclass
class Row:
    job: str
    target: str
    mbps: float
    iops: float
    to_src: float = 1.0
    to_rclone: float | None = None  # None without rclone


@dataclass
class MountReport:
    machine: dict[str, Any]
    config: dict[str, Any]
    rows: list[Row] = field(default_factory=list)

    def ratios(self) -> None:
        """Each row's ratio to SRC directly and to rclone, of the same job."""
        base = {(r.job, r.target): r.mbps for r in self.rows}
        for r in self.rows:
            r.to_src = r.mbps / base[r.job, "SRC"]
            if (r.job, "rclone") in base:
                r.to_rclone = r.mbps / base[r.job, "rclone"]


def fio(path: str, rw: str, bs: str, cfg: MountConfig, *, direct: bool) -> tuple[float, float]:
    """Bytes per second and IOPS of one fio job on the existing file *path*."""
    argv = ["fio", "--name=job", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
            f"--size={cfg.file_size}", "--ioengine=psync", f"--direct={int(direct)}",
            "--invalidate=0", "--fallocate=none", "--time_based", f"--runtime={cfg.runtime}",
            "--output-format=json"]
    write = "write" in rw
    if write:
        argv.append("--end_fsync=1")
    out = subprocess.run(argv, capture_output=True, text=True, check=True,
                         timeout=cfg.runtime * 10 + 120).stdout
    stats = json.loads(out)["jobs"][0]["write" if write else "read"]
    return float(stats["bw_bytes"]), float(stats["iops"])


@contextlib.contextmanager
def serving(argv: list[str], mnt: str, log: str) -> Iterator[None]:
    """Run the FUSE server *argv* (in the foreground) until it has mounted
    *mnt*; at the end unmount, wait for it to write back and exit, and make
    sure neither it nor the mount is left behind."""
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
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
                                     "rclone": _rclone_version()})
    with tempfile.TemporaryDirectory(prefix="vnpager-bench-mount-") as tmp:
        src = os.path.join(tmp, "src")
        os.mkdir(src)
        make_file(os.path.join(src, "fio.dat"), cfg.file_size)
        for target in target_names():
            log(f"mounting {target}")
            with mounted(target, tmp, src, cfg) as where:
                for job, rw, bs in JOBS:
                    log(f"{target}: {job}")
                    rate, iops = fio(os.path.join(where, "fio.dat"), rw, bs, cfg, direct=target != "SRC")
                    report.rows.append(Row(job, target, rate / 1e6, iops))
            log(f"{target}: unmounted")
    report.rows.sort(key=lambda r: [j for j, _, _ in JOBS].index(r.job))
    report.ratios()
    return report


def _rclone_version() -> str | None:
    if not shutil.which("rclone"):
        return None
    out = subprocess.run(["rclone", "version"], capture_output=True, text=True, check=False).stdout
    return out.split("\n", 1)[0]


# --- output ---------------------------------------------------------------------------

def _cells(r: Row) -> list[str]:
    return [r.job, r.target, f"{r.mbps:,.1f}", f"{r.iops:,.0f}", f"{r.to_src:.3f}",
            "" if r.to_rclone is None else f"{r.to_rclone:.2f}"]


HEADER = ["job", "target", "MB/s", "IOPS", "to SRC", "to rclone"]


def table(report: MountReport) -> Table:
    m = report.machine
    t = Table(title=f"vnpager bench --mount: {human(report.config['file_size'])} file, vnpager physmem "
                    f"{human(report.config['physmem'])}, {report.config['runtime']} s per job; "
                    f"{m['nproc']} x {m['cpu']}, {m['date']}", title_justify="left")
    for h in HEADER:
        t.add_column(h, justify="right" if h not in ("job", "target") else "left")
    for r in report.rows:
        t.add_row(*_cells(r))
    return t


def markdown(report: MountReport) -> Iterable[str]:
    yield "| " + " | ".join(HEADER) + " |"
    yield "|---|---|---:|---:|---:|---:|"
    for r in report.rows:
        yield "| " + " | ".join(_cells(r)) + " |"


def run_mount_bench(args: argparse.Namespace, console: Console) -> int:
    if not shutil.which("fio"):
        print("vnpager bench --mount needs fio (apt-get install fio, or make sysdeps)", file=sys.stderr)
        return 1
    with progress(total=False) as bar:
        task = bar.add_task("measuring")
        report = run(QUICK if args.quick else FULL,
                     lambda what: bar.update(task, description=f"measuring: {what}"))
    emit(args, console, report, markdown, table)
    return 0
