"""``vnpager bench --mmu hardware``: the hardware MMU's targets (issue 10), each
as a ratio to a baseline measured in the same run.

* warm 4 KiB slices ``m[a:a+4096]`` and ``numpy.frombuffer(m).sum()`` over
  a resident hardware map, against the stdlib mmap of the same file
  (target >= 0.9): the two are measured in alternating passes, so that a
  noisy machine slows both alike;
* cold sequential first touch of a file 4 times the server's physmem,
  MADV_SEQUENTIAL, copying each 64 KiB into a buffer, against os.preadv
  in 64 KiB calls into a buffer (target >= 0.25);
* sequential write of N pages in 64 KiB stores, then flush, against
  os.pwritev in 64 KiB calls (target >= 0.3), and at most N/16 write
  calls (the server VM's ``write_ios``);
* server throughput: four client processes on one shared server, each
  touching one byte of every page of its own file in random order
  (MADV_RANDOM: one fault a page), faults per second of them all
  (target >= 15,000).

Each case runs on a fresh pager server of its own
(:mod:`vnpager.tools.hw_server`, which gives the VM's counters).  A row
that misses a target gets a profile line: what the server did (faults,
pages per fault, read or write calls, the time per fault), and the
functions of the server where the time went, from a second run of the
case under cProfile (every server thread), when profiling is on.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap as std_mmap
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vnpager.tools.bench import (
    Reader,
    Row,
    _outcome,
    _Preadv,
    emit,
    machine,
    make_file,
    measured,
    read_rate,
    sequential,
    write_rate,
)
from vnpager.tools.hw_server import Spawned
from vnpager.tools.show import human

KiB, MiB = 1 << 10, 1 << 20
PAGE = 4096
CHUNK = 64 * KiB
CLIENT_TIMEOUT = 300.0  # seconds a throughput client may take, start to end


@dataclass(frozen=True)
class HwConfig:
    file_size: int  # the warm and write cases' file
    cold_physmem: int  # the cold case's server; its file is 4 times this
    min_time: float  # seconds each baseline (and warm figure) is measured for, at least
    client_pages: int  # pages each throughput client faults
    clients: int = 4


QUICK = HwConfig(file_size=16 * MiB, cold_physmem=8 * MiB, min_time=0.5, client_pages=1024)
FULL = HwConfig(file_size=64 * MiB, cold_physmem=32 * MiB, min_time=1.0, client_pages=4096)
TINY = HwConfig(file_size=1 * MiB, cold_physmem=1 * MiB, min_time=0.05, client_pages=64)  # the tests'


@dataclass
class HwRow(Row):
    """A row of bench's table, whose value may be faults/s, with its baseline's value and a profile."""

    unit: str = "MB/s"
    base_value: float = 0.0  # in unit
    profile: str = ""  # where the time goes, for a missed target


@dataclass
class HwReport:
    machine: dict[str, Any]
    config: dict[str, Any]
    rows: list[HwRow] = field(default_factory=list)


def ratio_row(case: str, value: float, baseline: str, base: float, want: float,
              *also: tuple[str, str, bool]) -> HwRow:
    """A MB/s row (rates in bytes/s) wanting *want* times the baseline, and *also*."""
    row = HwRow(case, "hardware map", value / 1e6, baseline, value / base, base_value=base / 1e6)
    shown = math.floor(row.ratio * 1000) / 1000  # truncated: 0.8998 must not show as 0.90
    row.want([(f"ratio >= {want:g}", f"ratio {shown:.3f}", row.ratio >= want), *also])
    return row


# --- the server's counters -------------------------------------------------------

SPACE_COUNTERS = ("faults", "writes", "wp", "continues", "mapped")  # one client's; the rest are the VM's


def counters(hw: Any) -> dict[str, int]:
    """The counters the profile lines use: the client's space's, the server VM's."""
    stats, vm = hw.statistics(), hw.stats()
    pmap = stats["pmap"]
    return {"faults": stats["faults"], "writes": stats["writes"], "wp": stats["wp"],
            "continues": pmap["continues"], "mapped": pmap["mapped"], "read_ios": vm["read_ios"],
            "pageins": vm["pageins"], "write_ios": vm["write_ios"], "pageouts": vm["pageouts"],
            "frames_resident": vm["frames_resident"]}


@contextmanager
def counted(vm: Any, into: dict[str, int]) -> Iterator[None]:
    """Store in *into* how much each counter grew in the block (frames: the level after)."""
    before = counters(vm)
    yield
    after = counters(vm)
    into.update({k: v if k == "frames_resident" else v - before[k] for k, v in after.items()})


def server_line(d: dict[str, int], elapsed: float, pages: int) -> str:
    """What the server did for *pages* pages in *elapsed* seconds."""
    faults = max(d["faults"], 1)
    return (f"server: {d['faults']} faults ({d['wp']} write-protect), {d['mapped'] / faults:.1f} pages "
            f"mapped per fault in {d['continues']} CONTINUEs, {d['read_ios']} read calls, "
            f"{d['write_ios']} write calls; {elapsed / faults * 1e6:,.0f} us per fault, "
            f"{elapsed / max(pages, 1) * 1e6:,.1f} us per page")


_WAITS = ("acquire", "select", "poll", "SimpleQueue", "sleep", "recvmsg", "wait")  # blocking builtins
# a lock's wrapper, the fault's whole, and the loops of threads (the daemons', the receives)
_WRAPPERS = ("entry", "uvm_fault", "_fault_entry", "_run", "_loop", "recv", "_read", "_work")


def top_functions(path: str, n: int = 5) -> str:
    """Where the server's busy time went: the faults served (space.py's
    ``_serve``) and the requests (serve.py's ``_call``), then the pager's
    functions with the most of it (cumulative), and the calls with the
    most time of their own (waits left out)."""
    st: Any = pstats.Stats(path)
    busy = sum(ct for (file, _, name), (_, _, _, ct, _) in st.stats.items()
               if (file.endswith("space.py") and name == "_serve") or (file.endswith("serve.py")
                                                                         and name == "_call")) or 1.0
    cum, own = [], []
    for (file, line, name), (_, calls, tottime, cumtime, _) in st.stats.items():
        if ("/uvm/" in file or "/arch/" in file) and name not in _WRAPPERS and cumtime < busy:
            cum.append((cumtime, calls, name))
        if not any(w in name for w in _WAITS):
            own.append((tottime, calls, f"{os.path.basename(file)}:{name}" if line else name))
    cum.sort(reverse=True)
    own.sort(reverse=True)
    return (f"server cProfile: {busy:.2f} s serving faults and requests; in the pager (cumulative): "
            + ", ".join(f"{label} {t / busy:.0%}" for t, _, label in cum[:n])
            + "; own time: " + ", ".join(f"{label} {t / busy:.0%} ({calls} calls)"
                                         for t, calls, label in own[:3]))


# --- measuring ---------------------------------------------------------------------

def interleaved(passes: dict[str, Callable[[], int]], min_time: float) -> dict[str, float]:
    """Bytes per second of each pass, run in turns (one of each a round)
    until each had *min_time* seconds: a load on the machine falls on all."""
    nbytes = dict.fromkeys(passes, 0)
    elapsed = dict.fromkeys(passes, 0.0)
    while min(elapsed.values()) < min_time:
        for name, fn in passes.items():
            t0 = time.perf_counter()
            nbytes[name] += fn()
            elapsed[name] += time.perf_counter() - t0
    return {name: nbytes[name] / elapsed[name] for name in passes}


def slices(m: Any) -> int:
    size = len(m) - len(m) % PAGE
    for a in range(0, size, PAGE):
        m[a:a + PAGE]
    return size


def numpy_sum(m: Any) -> int:
    import numpy as np

    a = np.frombuffer(m, dtype=np.uint64)
    try:
        a.sum()
        return a.nbytes
    finally:
        del a  # the map can be closed only when no array holds it


@contextmanager
def hw_map(path: str, server: str) -> Iterator[tuple[Any, Any]]:
    """(the VM, a shared map of the whole of *path*) on the server at *server*."""
    from vnpager import VM

    vm = VM.connect(server)
    fd = os.open(path, os.O_RDWR)
    try:
        m = vm.mmap(fd, 0)
        try:
            yield vm, m
        finally:
            m.close()
    finally:
        os.close(fd)
        vm.close()


def case_warm(path: str, server: str, cfg: HwConfig) -> list[HwRow]:
    """Warm slices and numpy sums, hardware map against the stdlib mmap."""
    fd = os.open(path, os.O_RDWR)
    std = std_mmap.mmap(fd, 0)
    try:
        with hw_map(path, server) as (vm, m):
            numpy_sum(m)  # resident now: every page faulted in
            d: dict[str, int] = {}
            with counted(vm, d):
                sl = interleaved({"hw": lambda: slices(m), "mmap": lambda: slices(std)}, cfg.min_time)
                ns = interleaved({"hw": lambda: numpy_sum(m), "mmap": lambda: numpy_sum(std)}, cfg.min_time)
    finally:
        std.close()
        os.close(fd)
    stayed = ("no fault once resident", f"{d['faults']} faults while warm", d["faults"] == 0)
    rows = [ratio_row("warm 4 KiB slices m[a:a+4096]", sl["hw"], "mmap", sl["mmap"], 0.9, stayed),
            ratio_row("warm numpy.frombuffer(m).sum()", ns["hw"], "mmap", ns["mmap"], 0.9, stayed)]
    for r in rows:  # no server to profile: CPython's own code on the same kind of memory
        r.profile = (f"client only: {d['faults']} faults, so the server had no part; the map is "
                     f"CPython's mmap over a memfd (shmem pages), the baseline over the file's page cache")
    return rows


def cold_pass(m: Any) -> int:
    """Copy the map to a buffer in 64 KiB pieces, sequentially: every page's first touch."""
    buf = bytearray(CHUNK)
    view = memoryview(m)
    try:
        size = len(m) - len(m) % CHUNK
        for off in range(0, size, CHUNK):
            buf[:] = view[off:off + CHUNK]
        return size
    finally:
        view.release()


def case_cold(path: str, server: str, cfg: HwConfig) -> list[HwRow]:
    """Cold sequential first touch of a file 4x physmem, MADV_SEQUENTIAL."""
    size = os.path.getsize(path)
    d: dict[str, int] = {}
    with hw_map(path, server) as (vm, m):
        m.madvise(std_mmap.MADV_SEQUENTIAL)
        with counted(vm, d):
            t0 = time.perf_counter()
            cold_pass(m)
            elapsed = time.perf_counter() - t0
    base = read_rate(lambda: _Preadv(path), sequential(size, CHUNK), False, cfg.min_time)
    within = ("resident <= physmem", f"{d['frames_resident'] * PAGE // KiB} KiB resident after",
              d["frames_resident"] * PAGE <= cfg.cold_physmem)
    row = ratio_row(f"cold sequential first touch, file {human(size)} = 4x physmem, 64 KiB copies",
                    size / elapsed, "os.preadv 64 KiB", base, 0.25, within)
    row.profile = server_line(d, elapsed, size // PAGE)
    return [row]


def write_pass(m: Any, data: bytes) -> None:
    for off in range(0, len(m) - len(m) % CHUNK, CHUNK):
        m[off:off + CHUNK] = data
    m.flush()


def case_write(path: str, server: str, cfg: HwConfig) -> list[HwRow]:
    """Sequential write of N pages in 64 KiB stores, then flush."""
    size = os.path.getsize(path) // CHUNK * CHUNK
    npages = size // PAGE
    data = os.urandom(CHUNK)
    d: dict[str, int] = {}
    with hw_map(path, server) as (vm, m), counted(vm, d):
        t0 = time.perf_counter()
        write_pass(m, data)
        elapsed = time.perf_counter() - t0
    pw: Callable[[], Reader] = lambda: _Preadv(path)  # noqa: E731
    base = write_rate(pw, size, CHUNK, cfg.min_time)
    calls = (f"write calls <= N/16 = {npages // 16}", f"{d['write_ios']} write calls",
             d["write_ios"] <= npages // 16)
    row = ratio_row(f"write N={npages} pages sequential + flush", size / elapsed, "os.pwritev 64 KiB", base,
                    0.3, calls)
    row.profile = server_line(d, elapsed, npages)
    return [row]


def case_throughput(tmp: str, server: str, cfg: HwConfig) -> list[HwRow]:
    """Faults per second of *clients* processes on one server, one fault a page."""
    from vnpager import VM

    paths = [os.path.join(tmp, f"client{i}") for i in range(cfg.clients)]
    for p in paths:
        make_file(p, cfg.client_pages * PAGE)
    d: dict[str, int] = {}
    with VM.connect(server) as vm, counted(vm, d):  # the VM's counters, once for all the clients
        results = _clients(server, paths)
    elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
    for k in SPACE_COUNTERS:  # each client's own space's
        d[k] = sum(r["delta"][k] for r in results)
    rate = d["faults"] / elapsed
    row = HwRow(f"server throughput, {cfg.clients} clients, one fault a page", "hardware map", rate, "",
                unit="faults/s")
    row.want([("faults/s >= 15,000", f"{rate:,.0f} faults/s", rate >= 15_000)])
    row.profile = server_line(d, elapsed, cfg.clients * cfg.client_pages)
    return [row]


def _clients(server: str, paths: list[str]) -> list[dict[str, Any]]:
    """Run a client process per file (:func:`run_client`), started together; their reports."""
    cmd = [sys.executable, "-m", "vnpager.tools.bench_hw", "--client", server]
    procs = [subprocess.Popen([*cmd, p], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for p in paths]
    try:
        for proc in procs:  # each has mapped its file
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a throughput client did not start")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return [json.loads(proc.communicate(timeout=CLIENT_TIMEOUT)[0]) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def run_client(server: str, path: str) -> int:
    """A throughput client: map *path*, say ready, wait for go, touch every
    page once in random order; print when it started and ended, and the
    server's counters of its faults."""
    with hw_map(path, server) as (vm, m):
        m.madvise(std_mmap.MADV_RANDOM)
        offsets = list(range(0, len(m), PAGE))
        random.Random(os.getpid()).shuffle(offsets)
        print("ready", flush=True)
        sys.stdin.readline()
        d: dict[str, int] = {}
        with counted(vm, d):
            start = time.monotonic()
            for off in offsets:
                m[off]
            end = time.monotonic()
    print(json.dumps({"start": start, "end": end, "delta": d}), flush=True)
    return 0


# --- the run -------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    physmem: Callable[[HwConfig], int]
    measure: Callable[[str, str, HwConfig], list[HwRow]]  # (file or folder, server, cfg) -> rows
    file_size: Callable[[HwConfig], int] | None  # its file (None: the case makes its own in the folder)
    profiled: bool = True  # a second run under the server's profiler can say where the time goes


CASES = (
    Case("warm", lambda c: c.file_size + 8 * MiB, case_warm, lambda c: c.file_size, profiled=False),
    Case("cold", lambda c: c.cold_physmem, case_cold, lambda c: 4 * c.cold_physmem),
    Case("write", lambda c: c.file_size + 8 * MiB, case_write, lambda c: c.file_size),
    Case("throughput", lambda c: c.clients * c.client_pages * PAGE + 8 * MiB, case_throughput, None),
)


def run_case(case: Case, tmp: str, cfg: HwConfig, profile: bool) -> list[HwRow]:
    """The case's rows on a fresh server; for a missed target, a second run
    under the profiler says where the server's time goes."""
    target = tmp
    if case.file_size is not None:
        target = os.path.join(tmp, case.name)
        make_file(target, case.file_size(cfg))
    with Spawned(case.physmem(cfg)) as s:
        rows = case.measure(target, s.path, cfg)
    if profile and case.profiled and not all(r.met for r in rows):
        prof = os.path.join(tmp, f"{case.name}.prof")
        with Spawned(case.physmem(cfg), profile=prof) as s:
            case.measure(target, s.path, cfg)
        line = top_functions(prof)
        for r in rows:
            if not r.met:
                r.profile = "; ".join(filter(None, [r.profile, line]))
    for r in rows:
        if r.met:
            r.profile = ""
    return rows


def run(cfg: HwConfig, log: Callable[[str], None], profile: bool = True) -> HwReport:
    report = HwReport(machine(), asdict(cfg))
    with tempfile.TemporaryDirectory(prefix="vnpager-bench-hw-") as tmp:
        for case in CASES:
            log(case.name)
            report.rows += run_case(case, tmp, cfg, profile)
    return report


# --- output ----------------------------------------------------------------------------

def _value(row: HwRow, x: float) -> str:
    return f"{x:,.0f} {row.unit}" if row.unit == "faults/s" else f"{x:,.1f} {row.unit}"


def _baseline(row: HwRow) -> str:
    return f"{row.baseline}: {_value(row, row.base_value)}" if row.baseline else ""


def table(report: HwReport) -> Table:
    m = report.machine
    t = Table(title=f"vnpager bench --mmu hardware: {m['nproc']} x {m['cpu']}, Python {m['python']}, "
                    f"{m['date']}", title_justify="left")
    for name, justify in (("case", "left"), ("hardware map", "right"), ("baseline", "left"),
                          ("ratio", "right"), ("target", "left"), ("outcome", "left")):
        t.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in report.rows:
        profile = f"\n[dim]profile: {escape(row.profile)}[/]" if row.profile else ""
        t.add_row(escape(row.case), _value(row, row.value), _baseline(row),
                  f"{row.ratio:.2f}" if row.baseline else "", row.target, _outcome(row, rich=True) + profile)
    return t


def markdown(report: HwReport) -> Iterable[str]:
    yield "| case | hardware map | baseline | ratio | target | outcome |"
    yield "|---|---:|---|---:|---|---|"
    for row in report.rows:
        profile = f"<br>profile: {row.profile}" if row.profile else ""
        yield (f"| {row.case} | {_value(row, row.value)} | {_baseline(row)} | "
               f"{f'{row.ratio:.2f}' if row.baseline else ''} | {row.target} | {_outcome(row)}{profile} |")


def run_hw_bench(args: argparse.Namespace, console: Console) -> int:
    """``vnpager bench --mmu hardware`` (bench.py hands over to this)."""
    from vnpager.arch.uffd import Uffd, UffdUnavailable

    try:
        Uffd.open().close()
    except UffdUnavailable as e:
        print(f"vnpager bench --mmu hardware: {e}", file=sys.stderr)
        return 1
    cfg = QUICK if args.quick else FULL
    emit(args, console, measured(lambda log: run(cfg, log)), markdown, table)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vnpager.tools.bench_hw")
    p.add_argument("--client", nargs=2, metavar=("SOCKET", "FILE"), required=True,
                   help="be one client of the throughput case")
    args = p.parse_args(argv)
    return run_client(*args.client)


if __name__ == "__main__":
    sys.exit(main())
