"""The tools on the hardware MMU (issue 10): the bench's hardware cases make
their rows, torture --mmu hardware loses nothing acknowledged, and the
instrumented server profiles and injects what it is asked to.  Timing is
the bench's business: these check behaviour only."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vnpager.tools import bench_hw
from vnpager.tools.cli import main
from vnpager.tools.hw_server import Spawned
from vnpager.tools.torture import Config
from vnpager.tools.torture_hw import torture_hw

PAGE = 4096


def test_bench_hw_cases_make_their_rows() -> None:
    seen: list[str] = []
    report = bench_hw.run(bench_hw.TINY, seen.append, profile=False)
    assert seen == [c.name for c in bench_hw.CASES]
    assert len(report.rows) == 5, [r.case for r in report.rows]
    for row in report.rows:
        assert row.value > 0 and row.target and row.checks, row
        assert (row.base_value > 0) == bool(row.baseline)
        assert row.met == all(ok for _, ok in row.checks)
    # what is behaviour, not speed: no fault once resident, clustered write-back, the budget
    outcome = {m: ok for r in report.rows for m, ok in r.checks}
    assert outcome["0 faults while warm"]
    assert any(m.endswith(" write calls") and ok for m, ok in outcome.items())
    assert any(m.endswith("KiB resident after") and ok for m, ok in outcome.items())
    assert [r.unit for r in report.rows] == ["MB/s"] * 4 + ["faults/s"]
    lines = list(bench_hw.markdown(report))
    assert len(lines) == 2 + 5 and all(line.count("|") >= 7 for line in lines)


def test_server_profile_names_the_pager(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(64 * PAGE))
    prof = str(tmp_path / "server.prof")
    with Spawned(1 << 20, profile=prof) as s, bench_hw.hw_map(str(path), s.path) as (_, m):
        assert m[:] == path.read_bytes()
    line = bench_hw.top_functions(prof)
    assert line.startswith("server cProfile") and "calls)" in line


def test_torture_on_the_hardware_mmu() -> None:
    fig, injected, hung = torture_hw(Config(seconds=4, seed=3, hang_grace=30, mmu="hardware"))
    assert not hung and not fig.problems and fig.mismatches == 0, fig.problems
    assert fig.ops > 0 and fig.bytes_verified > 0
    # write-back faults only (a failed read is SIGBUS here), and flushes told of them
    assert injected and not any(k.startswith("read ") and "delay" not in k for k in injected)
    assert fig.errors > 0 and {"write EIO", "write ENOSPC"} & set(injected)
    assert {"write_numpy", "read_numpy", "private", "alias", "remap", "sync"} <= set(fig.by_op)


def test_torture_command_hardware(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["torture", "--mmu", "hardware", "--seconds", "1", "--seed", "7", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "hardware MMU" in out and "mismatches:       0" in out


def test_demo_on_the_hardware_mmu_shows_numpy_a_second_process_and_the_budget() -> None:
    cmd = [sys.executable, "-m", "vnpager", "demo", "--mmu", "hardware", "--physmem", "256K", "--ops", "100"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    # a fault each at most (a store to a page mapped write-protected is served without uvm_fault)
    assert re.search(r"writing 3 pages through the array faults them in once \(faults \+[123]\)", out)
    assert "its write is in our array at once, with no call: yes" in out
    peak = re.search(r"at most (\d+) pages resident in the server's memfds \(physmem: 64\)", out)
    assert peak and int(peak[1]) <= 64
    assert "plain file reads see the array's writes and the other process's" in out
