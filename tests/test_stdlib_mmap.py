"""CPython's own mmap tests (``test.test_mmap``), run on ``vnpager.mmap``.

The stdlib test module is imported, not copied; its global ``mmap`` (the
stdlib module) is replaced by a module holding vnpager's class and
constants, so every ``mmap.mmap(...)`` in it makes a vnpager map in the
default VM.  Tests the stdlib skips on Linux (Windows-only ones) stay
skipped; every test that passes for the stdlib on Linux passes here, with
one adaptation, listed in ``ADAPTED``.  With ``VNPAGER_MMU=hardware`` the
default VM is a hardware one, whose maps are memory: then nothing is
adapted (test_hw_stdlib_mmap.py runs this module so, in a subprocess).
"""

from __future__ import annotations

import os
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vnpager

cpython = pytest.importorskip("test.test_mmap", reason="this Python has no test package")

_vn_mmap_module = sys.modules["vnpager.mmap"]

HARDWARE = os.environ.get("VNPAGER_MMU") == "hardware"

# test name -> why it cannot run unchanged
ADAPTED = {} if HARDWARE else {
    "test_basic": "re.search(pattern, m) needs the buffer protocol, which a paged map cannot "
                  "offer (its pages are not contiguous): the test's `re` searches m[:] instead",
}


def _search(pattern: Any, string: Any, flags: int = 0) -> re.Match[Any] | None:
    """re.search on a copy of a vnpager map (see ADAPTED)."""
    if isinstance(string, vnpager.mmap):
        string = string[:]
    return re.search(pattern, string, flags)


def _shim() -> types.ModuleType:
    shim = types.ModuleType("mmap", "vnpager.mmap standing in for the stdlib's mmap")
    for name in _vn_mmap_module.__all__:
        setattr(shim, name, getattr(_vn_mmap_module, name))
    return shim


cpython.mmap = _shim()
if not HARDWARE:
    cpython.re = types.SimpleNamespace(compile=re.compile, search=_search)
assert cpython.PAGESIZE == vnpager.PAGESIZE

# collected by pytest as unittest cases
MmapTests = cpython.MmapTests
LargeMmapTests = cpython.LargeMmapTests


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The stdlib tests make their files (TESTFN) in the working directory;
    afterwards the default VM must still be consistent."""
    monkeypatch.chdir(tmp_path)
    assert (vnpager.default_vm().mmu == "hardware") == HARDWARE
    yield
    vnpager.default_vm().check_invariants()  # a hardware VM's server checks its own
