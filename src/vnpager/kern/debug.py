"""Panics and assertions.

``VNPAGER_DEBUG=1`` turns on the seed's KASSERT and DEBUG checks (the test
suite always runs with it); without it :func:`KASSERT` costs one test of a
module global.  :func:`panic` always raises: a broken invariant is a bug in
vnpager, never something a caller should catch and carry on from.
"""

from __future__ import annotations

import os

DEBUG = os.environ.get("VNPAGER_DEBUG", "") not in ("", "0")


class Panic(AssertionError):
    """An invariant of the VM did not hold (the kernel's panic())."""


def panic(msg: str) -> None:
    raise Panic(msg)


def KASSERT(cond: object, msg: str = "KASSERT failed") -> None:
    if DEBUG and not cond:
        raise Panic(msg)
