"""Shared fixtures.  The suite always runs with invariant checks on, and
pytest-timeout (thread method) turns a hang into a failure that prints the
stack of every thread."""

from __future__ import annotations

import faulthandler
import os
import sys
import threading

os.environ.setdefault("VNPAGER_DEBUG", "1")

from collections.abc import Iterator

import pytest

from vnpager import VM
from vnpager.kern.debug import DEBUG
from vnpager.kern.synch import sleepers

assert DEBUG, "the test suite runs with VNPAGER_DEBUG=1"


@pytest.fixture
def vm() -> Iterator[VM]:
    """A small machine: 64 pages of 4 KiB.  Its invariants must hold after."""
    machine = VM(physmem=64 * 4096)
    yield machine
    machine.check_invariants()
    machine.close()


_exitstatus = 0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exitstatus
    _exitstatus = int(exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    """A thread a failed test left asleep would keep the interpreter from
    exiting, and CI would hang: print every stack and exit now instead."""
    stuck = [t for t in threading.enumerate()
             if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not stuck:
        return
    sys.stderr.write(f"\n{len(stuck)} non-daemon threads still running at exit: "
                     f"{[t.name for t in stuck]}; wait messages: {sleepers()}\n")
    faulthandler.dump_traceback(all_threads=True)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(_exitstatus or 1)
