"""Shared fixtures.  The suite always runs with invariant checks on, and
pytest-timeout (thread method) turns a hang into a failure that prints the
stack of every thread."""

from __future__ import annotations

import os

os.environ.setdefault("VNPAGER_DEBUG", "1")

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

from vnpager import VM  # noqa: E402
from vnpager.kern.debug import DEBUG  # noqa: E402

assert DEBUG, "the test suite runs with VNPAGER_DEBUG=1"


@pytest.fixture
def vm() -> Iterator[VM]:
    """A small machine: 64 pages of 4 KiB.  Its invariants must hold after."""
    machine = VM(physmem=64 * 4096)
    yield machine
    machine.check_invariants()
    machine.close()
