"""Set-up shared by the FUSE tests: a ``vnpager mount`` server in a
subprocess, always unmounted and reaped, even on failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("pyfuse3", reason="pyfuse3 is not installed (pip install -e '.[fuse]')")
from vnpager.fuse.mount import server_pid

if not os.path.exists("/dev/fuse"):
    pytest.skip("/dev/fuse is absent: FUSE mounts are impossible here", allow_module_level=True)
if shutil.which("fusermount3") is None:
    pytest.skip("fusermount3 is not installed (make sysdeps)", allow_module_level=True)

PHYSMEM = 2 << 20  # 512 pages
MOUNT_WAIT = 20.0


class Server:
    """One ``vnpager mount`` server process and its mount point (*src* a
    directory, or a bucket's URL)."""

    def __init__(self, src: Path | str, mnt: Path, *extra: str) -> None:
        self.src, self.mnt = src, mnt
        self.output = ""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vnpager", "mount", str(src), str(mnt), "--foreground",
             "--physmem", str(PHYSMEM), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + MOUNT_WAIT
        while server_pid(str(mnt)) != self.proc.pid:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the mount did not appear: {self.output}")
            time.sleep(0.05)

    def stop(self, sig: int | None = None) -> int:
        """Unmount (by *sig* to the server, or fusermount3 -u), reap the
        server; lazily unmount and kill it if it will not go."""
        if self.proc.poll() is None:
            if sig is not None:
                self.proc.send_signal(sig)
            else:
                subprocess.run(["fusermount3", "-u", str(self.mnt)], check=False)
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            try:
                self.output, _ = self.proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.output, _ = self.proc.communicate()
        if server_pid(str(self.mnt)) is not None or os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)
        return self.proc.returncode


def mount(tmp: Path, *extra: str) -> Iterator[Server]:
    """A server of *tmp*/src at *tmp*/mnt for as long as the generator runs."""
    src, mnt = tmp / "src", tmp / "mnt"
    src.mkdir()
    mnt.mkdir()
    server = Server(src, mnt, *extra)
    try:
        yield server
    finally:
        server.stop()


def sqlite(db: Path, sql: str) -> str:
    """What the sqlite3 shell prints for *sql* on *db*."""
    return subprocess.run(["sqlite3", str(db)], input=sql, capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()


def fill_database(db: Path, batches: int, rows: int) -> int:
    """A table of *batches* transactions of *rows* blobs each, a seventh deleted and
    the rest indexed, one sqlite3 process a step; the rows left."""
    sqlite(db, "CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB);")
    for b in range(batches):
        sqlite(db, "BEGIN; " + "".join(
            f"INSERT INTO t (v) VALUES (randomblob({300 + (b * rows + i) % 400}));" for i in range(rows))
            + " COMMIT;")
    sqlite(db, "DELETE FROM t WHERE id % 7 = 0; CREATE INDEX tv ON t (v);")
    return batches * rows - batches * rows // 7
