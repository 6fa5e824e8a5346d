"""Shared fixtures.  The suite always runs with invariant checks on, and
pytest-timeout (thread method) turns a hang into a failure that prints the
stack of every thread."""

from __future__ import annotations

import faulthandler
import os
import sys
import threading

os.environ.setdefault("VNPAGER_DEBUG", "1")

import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from hw_procs import Client
from objservers_helpers import LATENCY, Bucket, WebDir, remove_bucket
from vnpager import VM
from vnpager.kern.debug import DEBUG
from vnpager.kern.synch import sleepers
from vnpager.tools.objservers import CephRGW, LatencyProxy, Nginx, S3User

assert DEBUG, "the test suite runs with VNPAGER_DEBUG=1"


@pytest.fixture
def vm() -> Iterator[VM]:
    """A small machine: 64 pages of 4 KiB.  Its invariants must hold after."""
    machine = VM(physmem=64 * 4096)
    yield machine
    machine.check_invariants()
    machine.close()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    """The hardware-MMU client processes (hw_procs.Client) a test made: killed after it."""
    made: list[Client] = []
    try:
        yield made
    finally:
        for c in made:
            c.kill()


# Real object stores (vnpager.tools.objservers): one Ceph cluster with RADOS
# Gateway and one nginx a session, started by the first test that asks and
# stopped at the session's end; each test gets its own bucket or directory.
# Their start-up is bounded below pytest-timeout's 120 s, so that a server
# that does not come up fails with its logs rather than a stack dump.
SERVER_START_TIMEOUT = 90.0


@pytest.fixture(scope="session")
def rgw() -> Iterator[CephRGW]:
    """A one-node Ceph cluster and RADOS Gateway on 127.0.0.1 (S3 at ``rgw.url``, keys in ``rgw.user``)."""
    with CephRGW(timeout=SERVER_START_TIMEOUT) as server:
        yield server


_buckets = itertools.count()


@pytest.fixture(scope="session")
def rgw_s3fs(rgw: CephRGW) -> dict[bool, Any]:
    """The session's s3fs filesystems on RGW, keyed by version-awareness (the buckets
    share them: making one costs half a second, botocore loading its models)."""
    import s3fs

    return {versioned: s3fs.S3FileSystem(**rgw.user.storage_options(), version_aware=versioned,
                                         skip_instance_cache=True)
            for versioned in (False, True)}


def _bucket(rgw: CephRGW, fs: Any, *, versioned: bool) -> Iterator[Bucket]:
    name = f"test-{next(_buckets)}-{uuid.uuid4().hex[:8]}"
    fs.call_s3("create_bucket", Bucket=name)
    if versioned:
        fs.call_s3("put_bucket_versioning", Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    yield Bucket(name, rgw.user, fs)
    remove_bucket(fs, name)


@pytest.fixture
def s3_bucket(rgw: CephRGW, rgw_s3fs: dict[bool, Any]) -> Iterator[Bucket]:
    """An empty bucket on the session's RGW, removed with its objects after the test."""
    yield from _bucket(rgw, rgw_s3fs[False], versioned=False)


@pytest.fixture
def s3_versioned_bucket(rgw: CephRGW, rgw_s3fs: dict[bool, Any]) -> Iterator[Bucket]:
    """As s3_bucket, with versioning on: ``info()`` gives each object's VersionId."""
    yield from _bucket(rgw, rgw_s3fs[True], versioned=True)


@pytest.fixture
def rgw_latency(rgw: CephRGW) -> Iterator[S3User]:
    """The session's RGW behind a proxy that delays every request by LATENCY seconds."""
    proxy = LatencyProxy(rgw.port, LATENCY)
    try:
        yield S3User(f"http://127.0.0.1:{proxy.port}", rgw.user.access_key, rgw.user.secret_key)
    finally:
        proxy.stop()


@pytest.fixture(scope="session")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    """nginx on 127.0.0.1 serving ``nginx.root`` (Range requests on static files) at ``nginx.url``."""
    with Nginx(tmp_path_factory.mktemp("www"), timeout=SERVER_START_TIMEOUT) as server:
        yield server


@pytest.fixture
def http_dir(nginx: Nginx) -> WebDir:
    sub = f"t-{next(_buckets)}"
    (nginx.root / sub).mkdir()
    return WebDir(nginx.root / sub, f"{nginx.url}/{sub}")


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
