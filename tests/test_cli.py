"""The vnpager command: the demo tells the pager's story and checks the file;
--trace shows the calls of the story's steps only."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vnpager.tools.cli import build_parser, size_arg
from vnpager.tools.show import stats_table
from vnpager.uvm.uvm import VmStats


def vnpager(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200")  # no wrapped lines to match across
    env.pop("VNPAGER_TRACE", None)
    return subprocess.run([sys.executable, "-m", "vnpager", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


SMALL = ("demo", "--physmem", "256K", "--ops", "300")


def test_demo_tells_the_story_and_checks_the_file() -> None:
    proc = vnpager(*SMALL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "a VM of 256.0 KiB (64 pages of 4096 bytes) maps a file of 2.0 MiB (512 pages)" in out
    assert re.search(r"attach .*nothing is read yet: read_ios \+0, resident 0", out)
    assert re.search(r"fault .*faults \+1, pageins \+1, read_ios \+1", out)
    assert re.search(r"touching it again costs no fault: faults \+0, read_ios \+0", out)
    assert re.search(r"300 mixed reads and writes, every read checked \(0 wrong\)", out)
    assert re.search(r"flush .*one cluster, uvn_put writes it: pageouts \+3, write_ios \+1", out)
    assert "plain file reads see all 2.0 MiB as written" in out
    assert re.search(r"persist .*persisting 1, resident [1-9]", out)
    assert re.search(r"without I/O: faults \+[1-9]\d*, pageins \+0, read_ios \+0", out)
    assert re.search(r"terminate .*persisting 0, resident 0", out)
    for key in ("faults", "faultahead", "pageins", "pageouts", "read_ios", "write_ios", "resident",
                "persisting"):
        assert re.search(rf"│ {key} +│ +[\d,]+ │", out), key


def test_demo_trace_shows_the_steps_not_the_workload() -> None:
    proc = vnpager(*SMALL, "--trace")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[MainThread] ")]
    text = [line.removeprefix("[MainThread] ") for line in lines]
    # the first fault, nested down to the read and back
    start = text.index("uvm_fault(<Vmspace>, vaddr=0x100001000, access_type=PROT_READ)")
    assert text[start + 1].startswith("  uvn_get(")
    io = next(i for i in range(start, len(text)) if text[i].startswith("    uvn_io("))
    assert "rw=UIO_READ" in text[io] and text[io + 1] == "    uvn_io -> VM_PAGER_OK"
    assert "uvm_fault -> None" in text[io + 2:io + 4]
    assert any(t.startswith("  uvn_cluster -> (0x4000, ") for t in text)  # offsets in hex
    for name in ("uvn_attach(", "uvn_flush(", "uvn_put(", "uvn_detach(", "uvm_vnp_terminate("):
        assert any(t.lstrip().startswith(name) for t in text), name
    # hundreds of faults in the workload, a handful traced
    faults = sum(t.startswith("uvm_fault(") for t in text)
    assert 1 <= faults <= 20


def test_help_lists_the_commands() -> None:
    proc = vnpager("--help")
    assert proc.returncode == 0
    assert "demo" in proc.stdout and "bench" in proc.stdout


def test_subcommands_set_their_function() -> None:
    args = build_parser().parse_args(["demo", "--physmem", "1M"])
    assert callable(args.func) and args.physmem == 1 << 20 and args.file_size == 0


@pytest.mark.parametrize(("text", "size"), [("4096", 4096), ("256K", 256 << 10), ("4M", 4 << 20),
                                            ("4MiB", 4 << 20), ("1g", 1 << 30)])
def test_size_arg(text: str, size: int) -> None:
    assert size_arg(text) == size


def test_size_arg_rejects_nonsense() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not a size: 'four megs'"):
        size_arg("four megs")


def test_stats_table_explains_every_counter() -> None:
    table = stats_table(VmStats(faults=12345, resident=3))
    names = list(table.columns[0].cells)
    assert names[:2] == ["faults", "faultahead"] and names[-5:] == ["resident", "free", "active",
                                                                     "inactive", "persisting"]
    values = dict(zip(names, table.columns[1].cells, strict=True))
    assert values["faults"] == "12,345" and values["resident"] == "3"
    assert all(table.columns[2].cells)  # a meaning for each


@pytest.mark.parametrize("command", [[], ["demo"], ["bench"], ["mount"], ["umount"], ["torture"]])
def test_help_is_plain_text(command: list[str]) -> None:
    proc = vnpager(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: vnpager" in proc.stdout
    assert not re.search(r"``|:[a-z]+:`", proc.stdout), proc.stdout  # no reST roles or literals


def test_version() -> None:
    proc = vnpager("--version")
    assert proc.returncode == 0 and re.fullmatch(r"vnpager \S+\n", proc.stdout), proc.stdout


@pytest.mark.parametrize("detached", [False, True])
def test_mount_errors_are_one_line(tmp_path: Path, detached: bool) -> None:
    there = tmp_path / "dir"
    there.mkdir()
    fg = () if detached else ("--foreground",)
    nowhere, nosrc = tmp_path / "nowhere", tmp_path / "nosrc"
    for src, mnt, why in ((there, nowhere, f"mount point {nowhere}: no such directory"),
                          (nosrc, there, f"SRC {nosrc}: no such directory"),
                          (there, __file__, f"mount point {__file__}: not a directory")):
        proc = vnpager("mount", str(src), str(mnt), *fg)
        assert proc.returncode == 1 and proc.stdout == ""
        assert proc.stderr == f"vnpager mount: {why}\n"


def test_detached_mount_leaves_our_pipes(tmp_path: Path) -> None:
    """out=$(vnpager mount SRC MNT 2>&1) returns: the server keeps neither pipe."""
    pytest.importorskip("pyfuse3", reason="pyfuse3 is not installed (pip install -e '.[fuse]')")
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("FUSE mounts are impossible here (no /dev/fuse or fusermount3)")
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "f").write_bytes(b"through the pager")
    try:
        proc = vnpager("mount", str(src), str(mnt), "--physmem", "1M", timeout=60)  # pipes, both
        assert proc.returncode == 0, proc.stderr
        assert f"mounted at {mnt}" in proc.stdout and (mnt / "f").read_bytes() == b"through the pager"
        log = re.search(r"its messages in (\S+)\)", proc.stdout)
        assert log and Path(log[1]).exists()
    finally:
        done = vnpager("umount", str(mnt), "--timeout", "60")
        if done.returncode:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, timeout=30)
    assert done.returncode == 0 and not os.path.ismount(mnt)
    os.unlink(log[1])


def test_bench_shows_each_target_met_or_missed() -> None:
    """A row whose ratio misses but whose read calls meet their target says
    so per target: a met target never shows under a MISSED verdict."""
    from vnpager.tools.bench import Report, markdown

    report = Report({}, {})
    report.target("cold read", 40e6, "os.preadv", 100e6, 0.5,
                  [("read calls per page <= 1/16", "0.016 read calls per page", True)])
    report.add("warm read", {"vnpager": 90e6, "mmap": 100e6, "fsspec BlockCache": 80e6})
    report.mark("warm read", 0.8, beat="fsspec BlockCache")
    cold, warm = report.rows[0], report.rows[1]
    assert cold.met is False and warm.met is True
    lines = list(markdown(report))
    assert lines[2].endswith("| ratio >= 0.5; read calls per page <= 1/16 "
                             "| ratio 0.40: MISSED; 0.016 read calls per page: met |")
    assert lines[3].endswith("| ratio >= 0.8; MB/s >= fsspec BlockCache's "
                             "| ratio 0.90: met; 1.12 x fsspec BlockCache: met |")
    assert "issue" not in "\n".join(lines)


def test_bench_mount_reads_dbench_and_keeps_failed_jobs_out_of_ratios() -> None:
    """dbench's throughput line and its table of operations are what the
    mount bench reports; a job that failed on a target has no ratio, and
    nothing is compared with it."""
    pytest.importorskip("pyfuse3")
    from vnpager.tools.bench_mount import MountReport, Row, markdown, parse_dbench

    out = ("   2      3264     9.20 MB/sec  execute   4 sec  latency 16.121 ms\n\n"
           " Operation      Count    AvgLat    MaxLat\n ----------------------------------------\n"
           " NTCreateX       1070     2.704    22.419\n Close            852     0.019     1.175\n\n"
           "Throughput 9.20478 MB/sec  2 clients  2 procs  max_latency=219.567 ms\n")
    assert parse_dbench(out, 2.0) == (9.20478, 961.0)
    report = MountReport({}, {}, [Row("sqlite3", "SRC", None, 500.0), Row("sqlite3", "vnpager", None, 50.0),
                                  Row("sqlite3", "rclone", None, float("nan"), error="OSError: refused")])
    report.ratios()
    assert [(r.to_src, r.to_rclone) for r in report.rows] == [(1.0, None), (0.1, None), (None, None)]
    assert list(markdown(report))[4] == "| sqlite3 | rclone | failed |  |  | OSError: refused |"


def test_quiesce_waits_for_the_pages_read_ahead_asked_for() -> None:
    """The demo's persist step quiesces the VM so that no page daemon pass
    frees the pages it is about to find resident: a pass that read-ahead
    asked for (ra_wanted, served when the daemon next runs) counts as work
    to wait for, as a shortage does."""
    from vnpager import VM

    with VM(physmem="256K") as vm:
        vm.quiesce()
        vm.ra_wanted = 2  # asked for, the daemon not woken yet (it would be, by uvm_pagewant_ra)
        vm.quiesce()
        assert vm.ra_wanted == 0  # the daemon's pass ran before quiesce returned


def test_no_library_module_imports_the_tools() -> None:
    """Every module of the library imports, and none of them pulls in
    vnpager.tools (the CLI, demo, bench, torture sit above the library)."""
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        import vnpager
        names = []
        def walk(package):
            for m in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
                if m.name not in ("vnpager.tools", "vnpager.__main__"):
                    names.append(m.name)
                    module = importlib.import_module(m.name)
                    if m.ispkg:
                        walk(module)
        walk(vnpager)
        print(len(names), sorted(n for n in sys.modules if n.startswith("vnpager.tools")))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    count, loaded = proc.stdout.split(" ", 1)
    assert int(count) > 30 and loaded.strip() == "[]"


def test_bench_gives_the_mi_work_per_cold_page_against_preadv() -> None:
    """The cold read's MI figure is the wall time less the host's preadv
    time, per page, in microseconds and as a multiple of bare preadv's cost
    per page measured in the same run."""
    from vnpager.tools.bench import MI_TARGET_US, _mi_check

    wanted, measured, met = _mi_check(0.256, 16384, 4096 / 1e-6)  # 15.6 us a page against 1 us
    assert wanted == f"MI work <= {MI_TARGET_US:g} us per page" and not met
    assert measured == "MI 15.6 us per page = 16 x preadv's 1.00 us"
    assert _mi_check(0.016384, 16384, 4096 / 1e-6)[2]  # 1 us a page: met
