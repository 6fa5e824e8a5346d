"""CPython's own ``test.test_mmap``, unadapted, on hardware maps.

test_stdlib_mmap.py runs the stdlib's tests on ``vnpager.mmap`` of the
default VM; here it runs in a subprocess with ``VNPAGER_MMU=hardware``, so
the default VM is a hardware one (a private server) and nothing is
adapted: ``re.search(pattern, m)`` and the rest work on the map itself.
A subprocess, because the tests touch their maps in their own process: a
fault holds the GIL until the server answers, so only a timeout outside
the process can bound it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_cpython_test_mmap_unadapted_on_hardware_maps(tmp_path: Path) -> None:
    env = {**os.environ, "VNPAGER_MMU": "hardware", "VNPAGER_PHYSMEM": "64M"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
                          str(HERE / "test_stdlib_mmap.py")], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
