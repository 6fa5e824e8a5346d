"""Real object-store servers on localhost, for the tests and ``vnpager bench --s3``.

``CephRGW`` brings up a one-node Ceph cluster from Debian's packages (one
monitor, one manager, one OSD on memstore) and Ceph's RADOS Gateway serving
S3 on it, with an S3 user; ``Nginx`` serves a directory over HTTP (nginx
answers Range requests on static files by default).  Both run by hand, with
no systemd and nothing of the host's ``/etc/ceph``: every file (config, data,
logs, sockets) lives in a private temporary directory that ``stop()``
removes, and every daemon listens on 127.0.0.1 only, on ports free at start.

Either is a context manager; ``start()`` returns once the server answers
(within a bounded time; on failure the exception carries the tail of every
daemon's log) and ``stop()`` kills every process it started, even after a
failed start.  The daemons also die with the Python thread that started them
(``setpriv --pdeathsig``): a test run killed hard leaves nothing running.

``latency=`` puts a ``LatencyProxy`` in front of the server: the endpoint
returned is then the proxy's, which holds every byte from the client for
that long before passing it on, like a network's one-way delay.  It delays
each request without serialising them (the bytes of many connections are
in flight at once, as on a real link), so parallel readers overlap their
waits as they would against a distant server.

=> run as root (the daemons need no more, but Debian's packages put their
   data under root-owned paths and the tests install them as root).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

START_TIMEOUT = 120.0  # seconds for a cluster or server to answer
COMMAND_TIMEOUT = 60.0  # seconds for one ceph / radosgw-admin command
STOP_TIMEOUT = 10.0  # seconds for a killed daemon (or the proxy's thread) to be gone
LOG_TAIL = 30  # lines of each log in a start-up failure's message
# The ops the RGW user's keys sign with; RGW checks the signature, not the region name.
REGION = "default"


class ServerError(RuntimeError):
    """A server did not come up (or a command on it failed); the message has the logs' tails."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 free now (the daemon binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


class _Daemons:
    """The processes one server started, their logs, and how to stop them all.

    Each runs in its own session under ``setpriv --pdeathsig KILL`` so that it
    dies with the thread that started it even if ``stop()`` never runs."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._outs: list[IO[bytes]] = []

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        out = open(self.workdir / f"{name}.out", "wb")  # noqa: SIM115 (closed by stop)
        self._outs.append(out)
        proc = subprocess.Popen(["setpriv", "--pdeathsig", "KILL", "--", *argv], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise ServerError(f"{name} exited with status {proc.returncode}\n{self.logs()}")

    def logs(self) -> str:
        """The tail of every log in the work directory, for an exception's message."""
        parts = []
        for path in sorted(self.workdir.glob("*.out")) + sorted(self.workdir.glob("*.log")):
            tail = _tail(path)
            if tail:
                parts.append(f"--- {path.name}\n{tail}")
        return "\n".join(parts)

    def stop(self) -> None:
        """SIGKILL every process group and reap it.  Nothing of theirs is worth keeping
        (the directory goes next), and a memstore OSD told to exit cleanly would first
        write all the objects it holds in memory to disk."""
        for _, proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for _, proc in self.procs:
            proc.wait(STOP_TIMEOUT)
        self.procs.clear()
        for out in self._outs:
            out.close()
        self._outs.clear()


def _wait(what: str, ready: Any, daemons: _Daemons, timeout: float) -> None:
    """Poll ``ready()`` until it is true; a daemon's exit or the timeout raises with the logs."""
    deadline = time.monotonic() + timeout
    while True:
        daemons.check_alive()
        if ready():
            return
        if time.monotonic() > deadline:
            raise ServerError(f"{what} not ready after {timeout:.0f} s\n{daemons.logs()}")
        time.sleep(0.2)


def _http_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0):
            return True
    except urllib.error.HTTPError:
        return True  # it answered, if only to refuse
    except OSError:
        return False


class _Server:
    """What both servers share: the work directory, the daemons, the optional proxy."""

    def __init__(self, *, latency: float = 0.0, timeout: float = START_TIMEOUT) -> None:
        self.latency = latency
        self.timeout = timeout
        self.workdir = Path(tempfile.mkdtemp(prefix=f"vnpager-{type(self).__name__.lower()}-"))
        self.daemons = _Daemons(self.workdir)
        self.proxy: LatencyProxy | None = None
        self.port = 0  # the server's own port; url is the proxy's when there is one
        self.url = ""
        self.direct_url = ""  # the server itself, past the proxy

    def _serve(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        try:
            self._serve()
            self.direct_url = f"http://127.0.0.1:{self.port}"
            self.url = self.direct_url
            if self.latency > 0:
                self.proxy = LatencyProxy(self.port, self.latency)
                self.url = f"http://127.0.0.1:{self.proxy.port}"
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the proxy and every daemon, and remove the work directory."""
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        self.daemons.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@dataclass(frozen=True)
class S3User:
    """An S3 endpoint and the keys of a user on it."""

    url: str
    access_key: str
    secret_key: str

    def storage_options(self) -> dict[str, Any]:
        """The ``storage_options`` an fsspec user gives s3fs for this endpoint."""
        return {"key": self.access_key, "secret": self.secret_key,
                "client_kwargs": {"endpoint_url": self.url, "region_name": REGION}}

    def env(self) -> dict[str, str]:
        """The same as environment variables (botocore reads them; AWS_ENDPOINT_URL needs botocore>=1.31)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.url, "AWS_DEFAULT_REGION": REGION}


# The cluster's ceph.conf.  Why each non-default knob is set:
_CEPH_CONF = """\
[global]
fsid = {fsid}
mon_host = {mon_addr}
public_addr = 127.0.0.1
ms_bind_msgr1 = false
ms_bind_ipv6 = false
# No cephx: a throwaway cluster on 127.0.0.1 in a root-only directory has
# nothing to protect, and it saves making and distributing keyrings.  S3 has
# its own authentication (the user's keys), which the tests do exercise.
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
# Everything in the private directory, nothing under /var or /etc/ceph.
mon_data = {dir}/$name
mgr_data = {dir}/$name
osd_data = {dir}/$name
log_file = {dir}/$name.log
admin_socket = {dir}/$name.asok
run_dir = {dir}
pid_file = {dir}/$name.pid
keyring = {dir}/keyring
log_to_stderr = false
err_to_stderr = true
debug_ms = 0
# One OSD: pools of one copy, no warning about it, PGs placed on one host.
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_crush_chooseleaf_type = 0
# Few PGs (RGW makes about eight pools) and no autoscaler to change them.
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_max_pg_per_osd = 1000
mon_warn_on_insecure_global_id_reclaim_allowed = false
# The monitor's store is a few MiB: no warning (or shutdown) over a host's full disk.
mon_data_avail_warn = 2
mon_data_avail_crit = 1
# 2 cores shared with the test suite: no more threads than the load needs.
osd_op_num_shards = 2
osd_op_num_threads_per_shard = 2
# The manager loads every module it finds (seconds of CPU, 150 MiB): only
# the ones Ceph 16 always runs (without them the cluster reports errors).
mgr_initial_modules =
mgr_disabled_modules = {mgr_disabled}
# paxos: a monitor commits a change of its maps at most once a second by
# default; RGW's first start makes eight pools one after the other.
paxos_propose_interval = 0.05
paxos_min_wait = 0.01

[osd]
# memstore: no block device, no RocksDB, up in seconds; data in the OSD's
# memory (device_bytes is only the capacity it reports, not an allocation).
osd_objectstore = memstore
memstore_device_bytes = {store_bytes}
osd_memory_target = 1073741824

[client.rgw]
# tcp_nodelay: without it a small ranged GET's reply waits out the client's
# delayed ACK (Nagle), ~40 ms added to a 4 KiB GET here.
rgw_frontends = beast endpoint=127.0.0.1:{rgw_port} tcp_nodelay=1
# radosgw's own default is "secure" alone, which auth none cannot offer.
ms_mon_client_mode = crc
rgw_thread_pool_size = 64
# Write-back publishes a new version as a multipart upload of its dirty
# pages (uploaded) and clean ranges (UploadPartCopy), so a part may be one
# 4 KiB page (the default minimum is 5 MiB, AWS's) ...
rgw_multipart_min_part_size = 4096
# ... and 64 MiB of random 4 KiB pages in a 1 GiB object make up to ~32,768
# parts (a dirty page and the clean run after it each), past AWS's 10,000;
# allow every page of an object of up to 4 GiB to be its own part ...
rgw_multipart_part_upload_limit = 1048576
# ... whose CompleteMultipartUpload body (~80 bytes a part) is then far
# over the default 1 MiB limit on a request's XML.
rgw_max_put_param_size = 134217728
rgw_dns_name = localhost
# A deleted or replaced object's data goes to RGW's garbage collector, which
# frees it after two hours by default: the OSD holds it in memory, so sooner,
# though not before a GET still streaming the old data is done.
rgw_gc_obj_min_wait = 60
rgw_gc_processor_period = 30
rgw_enable_usage_log = false
debug_rgw = 1
"""


MGR_MODULE_PATH = Path("/usr/share/ceph/mgr")  # Debian's mgr_module_path
# The modules Ceph 16's monitor makes every manager run (`ceph mgr module ls`: always_on_modules).
MGR_ALWAYS_ON = frozenset({"balancer", "crash", "devicehealth", "orchestrator", "pg_autoscaler",
                           "progress", "rbd_support", "status", "telemetry", "volumes"})


def _optional_mgr_modules() -> list[str]:
    found = (p.name for p in MGR_MODULE_PATH.iterdir() if (p / "module.py").exists())
    return sorted(set(found) - MGR_ALWAYS_ON)


class CephRGW(_Server):
    """A one-node Ceph cluster and RADOS Gateway serving S3 on 127.0.0.1.

    After ``start()``: ``url`` (the S3 endpoint), ``user`` (an ``S3User``
    with its keys).  ``ceph(...)`` and ``admin(...)`` run ``ceph`` and
    ``radosgw-admin`` on the cluster."""

    def __init__(self, *, latency: float = 0.0, timeout: float = START_TIMEOUT,
                 store_bytes: int = 16 << 30) -> None:
        super().__init__(latency=latency, timeout=timeout)
        self.store_bytes = store_bytes
        self.conf = self.workdir / "ceph.conf"
        self._user: S3User | None = None

    @property
    def user(self) -> S3User:
        assert self._user is not None, "CephRGW not started"
        return self._user

    def _run(self, argv: list[str]) -> str:
        try:
            done = subprocess.run([*argv, "-c", str(self.conf)], capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise ServerError(f"{argv} took over {COMMAND_TIMEOUT:.0f} s\n{self.daemons.logs()}") from e
        if done.returncode != 0:
            raise ServerError(f"{argv} failed ({done.returncode}): {done.stderr.strip()}\n"
                              f"{self.daemons.logs()}")
        return done.stdout

    def ceph(self, *args: str) -> str:
        """``ceph ARGS`` on this cluster (bounded: --connect-timeout)."""
        return self._run(["ceph", "--connect-timeout", str(int(COMMAND_TIMEOUT)), *args])

    def counters(self) -> dict[str, int]:
        """radosgw's perf counters (``perf dump rgw``), counted since it started: ``req``
        (requests), ``get`` and ``put`` (object GETs; PUTs, including each UploadPart
        and UploadPartCopy), ``get_b`` and ``put_b`` (their bytes).  Ceph 16's own
        quirks: ``get_b`` counts a ranged GET one byte short, and ``put_b`` counts the
        bytes a part copies server-side as if uploaded."""
        out = json.loads(self._run(["ceph", "--admin-daemon", str(self.workdir / "client.rgw.asok"),
                                    "perf", "dump", "rgw"]))
        return {k: v for k, v in out["rgw"].items() if isinstance(v, int)}

    def admin(self, *args: str) -> str:
        """``radosgw-admin ARGS`` on this cluster (as client.admin: radosgw holds client.rgw's socket)."""
        return self._run(["radosgw-admin", *args])

    def _serve(self) -> None:
        self.port = free_port()
        fsid, mon_addr = str(uuid.uuid4()), f"[v2:127.0.0.1:{free_port()}]"
        self.conf.write_text(_CEPH_CONF.format(fsid=fsid, mon_addr=mon_addr, dir=self.workdir,
                                               store_bytes=self.store_bytes, rgw_port=self.port,
                                               mgr_disabled=" ".join(_optional_mgr_modules())))
        start = time.monotonic()
        self._start_mon(fsid, mon_addr)
        self.daemons.spawn("mgr.x", ["ceph-mgr", "-f", "-i", "x", "-c", str(self.conf)])
        self._start_osd()
        self.daemons.spawn("client.rgw", ["radosgw", "-f", "-n", "client.rgw", "-c", str(self.conf)])
        _wait("radosgw", lambda: _http_answers(f"http://127.0.0.1:{self.port}/"), self.daemons,
              self._left(start))
        self._user = self._make_user()

    def _left(self, start: float) -> float:
        return max(1.0, self.timeout - (time.monotonic() - start))

    def _start_mon(self, fsid: str, mon_addr: str) -> None:
        monmap = str(self.workdir / "monmap")
        self._run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", mon_addr, monmap])
        (self.workdir / "mon.a").mkdir()
        self._run(["ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap])
        self.daemons.spawn("mon.a", ["ceph-mon", "-f", "-i", "a", "-c", str(self.conf)])

    def _start_osd(self) -> None:
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid).strip()
        (self.workdir / f"osd.{osd_id}").mkdir()
        self._run(["ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid])
        # No wait for it to be up: radosgw waits for the cluster, and _wait sees an OSD that exits.
        self.daemons.spawn(f"osd.{osd_id}", ["ceph-osd", "-f", "-i", osd_id, "-c", str(self.conf)])

    def _make_user(self) -> S3User:
        out = json.loads(self.admin("user", "create", "--uid", "vnpager", "--display-name", "vnpager tests"))
        keys = out["keys"][0]
        return S3User(self.url or f"http://127.0.0.1:{self.port}", keys["access_key"], keys["secret_key"])

    def start(self) -> None:
        super().start()
        # The user's endpoint is the proxy's when there is one (start set url after the user was made).
        self._user = S3User(self.url, self.user.access_key, self.user.secret_key)


_NGINX_CONF = """\
# One process, in the foreground: no worker to outlive a killed master.
daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        # Directory listings: fsspec's HTTP filesystem lists by scraping links.
        autoindex on;
    }}
}}
"""


class Nginx(_Server):
    """nginx serving the directory ``root`` (static files: Range, ETag, Last-Modified) on 127.0.0.1."""

    def __init__(self, root: str | os.PathLike[str], *, latency: float = 0.0,
                 timeout: float = START_TIMEOUT) -> None:
        super().__init__(latency=latency, timeout=timeout)
        self.root = Path(root).resolve()

    def _serve(self) -> None:
        self.port = free_port()
        conf = self.workdir / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(dir=self.workdir, port=self.port, root=self.root))
        self.daemons.spawn("nginx", ["nginx", "-c", str(conf), "-p", str(self.workdir)])
        _wait("nginx", lambda: _http_answers(f"http://127.0.0.1:{self.port}/"), self.daemons, self.timeout)


class LatencyProxy:
    """A TCP proxy on 127.0.0.1 that delays every byte from its clients by ``delay`` seconds.

    Each chunk read from a client is sent on to the target ``delay`` after it
    arrived, in order, without waiting for the chunks before it to be sent:
    a one-way delay (like ``tc netem`` on a link, but for this port only),
    so every request's round trip grows by ``delay`` and concurrent
    connections wait at the same time.  Runs its own event loop thread."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, name="latency-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT) or self._server is None:
            raise ServerError("latency proxy did not start")
        self.port: int = self._server.sockets[0].getsockname()[1]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._connection, "127.0.0.1", 0))
        finally:
            self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _connection(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        try:
            sreader, swriter = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            cwriter.close()
            return
        await asyncio.gather(self._delayed(creader, swriter), self._pipe(sreader, cwriter),
                             return_exceptions=True)

    async def _delayed(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Client to server: each chunk queued with its due time, a second task sends when due."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.ensure_future(self._send_due(queue, writer))
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(1 << 16):
                queue.put_nowait((loop.time() + self.delay, data))
        finally:
            queue.put_nowait((loop.time() + self.delay, b""))
            await sender

    @staticmethod
    async def _send_due(queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(OSError):
                writer.write_eof()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(STOP_TIMEOUT)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(STOP_TIMEOUT)
