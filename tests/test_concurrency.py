"""Concurrency (issue 4, point 5): threads doing mixed operations on shared
and private mappings of several files, with the invariant checks on, for a
bounded time; a watchdog turns a hang into a failure that prints every
thread's stack and what each sleeping thread waits for."""

from __future__ import annotations

import errno

import pytest

from vnpager.kern.debug import DEBUG
from vnpager.tools.torture import Config, Torture, torture


def test_mixed_operations_across_threads() -> None:
    assert DEBUG  # KASSERTs and invariant checks on all along
    fig, injected, hung = torture(Config(seconds=3, seed=11, threads=6, files=3,
                                         fault_rate=0, hang_grace=30))
    assert not hung and not fig.problems and fig.mismatches == 0
    assert not injected and fig.errors == 0  # no faults: no errors either
    # every kind of operation ran, on shared and private mappings
    assert set(fig.by_op) == {"write", "read", "sync", "private", "file", "remap", "advise", "syncall"}
    assert fig.bytes_verified > 0


def test_the_watchdog_reports_a_hang(tmp_path: object, capfd: pytest.CaptureFixture[str]) -> None:
    cfg = Config(seconds=0.2, seed=1, threads=2, files=1, fault_rate=0, hang_grace=0.3)
    run = Torture(cfg, str(tmp_path))
    run.plan.delay("read", 3.0)  # a backend that stalls longer than the watchdog waits
    run.plan.fail("write", errno.EIO)
    _, hung = run.run()
    assert hung
    err = capfd.readouterr().err
    assert "threads did not finish" in err and 'File "' in err
    assert "is torture-0" in err and "is pagedaemon, asleep on 'pgdaemon'" in err
