"""The tools on the hardware MMU (issue 10): the bench's hardware cases make
their rows, torture --mmu hardware loses nothing acknowledged, and the
instrumented server profiles and injects what it is asked to.  Timing is
the bench's business: these check behaviour only."""

from __future__ import annotations

import os
from pathlib import Path

from vnpager.tools import bench_hw
from vnpager.tools.hw_server import Spawned

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
