"""The real servers under the object filesystem (vnpager.tools.objstore): what the
S3 and HTTP vnodes rely on, checked against Ceph's RADOS Gateway through s3fs
and against nginx through fsspec's HTTP filesystem, and the servers' own
start and stop."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from objstore_helpers import LATENCY, Bucket, WebDir
from vnpager.tools import objstore
from vnpager.tools.objstore import CephRGW, Nginx, S3User, ServerError

PAGE = 4096
DATA = os.urandom(1 << 20)


def _client_call(bucket: Bucket, method: str, **kwargs: Any) -> Any:
    """One aiobotocore client call on the bucket's s3fs loop (what the object filesystem does)."""
    return bucket.fs.call_s3(method, Bucket=bucket.name, **kwargs)


def test_put_get_and_ranged_get(s3_bucket: Bucket) -> None:
    path = s3_bucket.path("obj")
    s3_bucket.fs.pipe_file(path, DATA)
    assert s3_bucket.fs.cat_file(path) == DATA
    # keywords: cat_file's second positional parameter is version_id
    assert s3_bucket.fs.cat_file(path, start=5 * PAGE, end=21 * PAGE) == DATA[5 * PAGE:21 * PAGE]
    assert s3_bucket.fs.cat_file(path, start=len(DATA) - 10, end=len(DATA) + PAGE) == DATA[-10:]


def test_ranged_get_is_one_request_of_the_range(s3_bucket: Bucket) -> None:
    """A ranged GET returns only the range: Content-Range and Content-Length say so."""
    s3_bucket.fs.pipe_file(s3_bucket.path("obj"), DATA)
    r = _client_call(s3_bucket, "get_object", Key="obj", Range=f"bytes={PAGE}-{2 * PAGE - 1}")
    assert r["ContentLength"] == PAGE
    assert r["ContentRange"] == f"bytes {PAGE}-{2 * PAGE - 1}/{len(DATA)}"


def test_info_etag_and_mtime_change_on_replace(s3_bucket: Bucket) -> None:
    path = s3_bucket.path("obj")
    s3_bucket.fs.pipe_file(path, DATA)
    first = s3_bucket.fs.info(path)
    assert first["size"] == len(DATA) and first["ETag"] and first["LastModified"]
    time.sleep(1.1)  # LastModified has a resolution of one second
    s3_bucket.fs.pipe_file(path, DATA[::-1])
    s3_bucket.fs.invalidate_cache(path)
    second = s3_bucket.fs.info(path)
    assert second["ETag"] != first["ETag"]
    assert second["LastModified"] > first["LastModified"]


def test_versioned_bucket_keeps_versions(s3_versioned_bucket: Bucket) -> None:
    b = s3_versioned_bucket
    path = b.path("obj")
    b.fs.pipe_file(path, DATA[:PAGE])
    v1 = b.fs.info(path)["VersionId"]
    b.fs.pipe_file(path, DATA[PAGE:2 * PAGE])
    b.fs.invalidate_cache(path)
    v2 = b.fs.info(path)["VersionId"]
    assert v1 and v2 and v1 != v2
    assert b.fs.cat_file(path) == DATA[PAGE:2 * PAGE]
    assert b.fs.cat_file(path, version_id=v1) == DATA[:PAGE]
    assert b.fs.cat_file(path, version_id=v1, start=10, end=20) == DATA[10:20]


def test_multipart_of_uploaded_and_copied_pages(s3_bucket: Bucket) -> None:
    """Write-back's shape: a new version made of a dirty page uploaded and clean
    ranges copied server-side (UploadPartCopy with CopySourceRange), in parts of
    one 4 KiB page (under AWS's 5 MiB minimum) numbered past AWS's 10,000."""
    s3_bucket.fs.pipe_file(s3_bucket.path("old"), DATA)
    up = _client_call(s3_bucket, "create_multipart_upload", Key="new")
    dirty = os.urandom(PAGE)

    def copy(number: int, start: int, end: int) -> dict[str, Any]:
        r = _client_call(s3_bucket, "upload_part_copy", Key="new", UploadId=up["UploadId"], PartNumber=number,
                         CopySource={"Bucket": s3_bucket.name, "Key": "old"},
                         CopySourceRange=f"bytes={start}-{end - 1}")
        return {"PartNumber": number, "ETag": r["CopyPartResult"]["ETag"]}

    put = _client_call(s3_bucket, "upload_part", Key="new", UploadId=up["UploadId"], PartNumber=10_001,
                       Body=dirty)
    parts = [copy(1, 0, PAGE), {"PartNumber": 10_001, "ETag": put["ETag"]}, copy(20_000, 2 * PAGE, len(DATA))]
    _client_call(s3_bucket, "complete_multipart_upload", Key="new", UploadId=up["UploadId"],
                 MultipartUpload={"Parts": parts})
    assert s3_bucket.fs.cat_file(s3_bucket.path("new")) == DATA[:PAGE] + dirty + DATA[2 * PAGE:]


def test_multipart_part_smaller_than_a_page_is_refused(s3_bucket: Bucket) -> None:
    """The minimum part is one page, not less: RGW still enforces its (lowered) limit."""
    up = _client_call(s3_bucket, "create_multipart_upload", Key="new")
    parts = []
    for number, size in ((1, PAGE - 1), (2, PAGE)):
        r = _client_call(s3_bucket, "upload_part", Key="new", UploadId=up["UploadId"], PartNumber=number,
                         Body=DATA[:size])
        parts.append({"PartNumber": number, "ETag": r["ETag"]})
    with pytest.raises(OSError) as e:
        _client_call(s3_bucket, "complete_multipart_upload", Key="new", UploadId=up["UploadId"],
                     MultipartUpload={"Parts": parts})
    assert e.value.__cause__.response["Error"]["Code"] == "EntityTooSmall"  # type: ignore[union-attr]


def test_wrong_keys_are_refused(rgw: CephRGW, s3_bucket: Bucket) -> None:
    import s3fs

    bad = S3User(rgw.url, rgw.user.access_key, "not" + rgw.user.secret_key)
    fs = s3fs.S3FileSystem(**bad.storage_options(), skip_instance_cache=True)
    with pytest.raises(PermissionError):
        fs.pipe_file(s3_bucket.path("obj"), b"x")


def test_latency_proxy_delays_each_request_and_passes_bytes(rgw_latency: S3User, s3_bucket: Bucket) -> None:
    import s3fs

    s3_bucket.fs.pipe_file(s3_bucket.path("obj"), DATA)
    fs = s3fs.S3FileSystem(**rgw_latency.storage_options(), skip_instance_cache=True)
    fs.cat_file(s3_bucket.path("obj"), start=0, end=1)  # connect and sign once
    t = time.monotonic()
    got = fs.cat_file(s3_bucket.path("obj"), start=PAGE, end=17 * PAGE)
    assert time.monotonic() - t >= LATENCY
    assert got == DATA[PAGE:17 * PAGE]


def test_nginx_ranged_reads(http_dir: WebDir) -> None:
    import fsspec

    (http_dir.dir / "obj").write_bytes(DATA)
    fs = fsspec.filesystem("http", skip_instance_cache=True)
    url = f"{http_dir.url}/obj"
    assert fs.info(url)["size"] == len(DATA)
    assert fs.cat_file(url, start=3 * PAGE, end=5 * PAGE) == DATA[3 * PAGE:5 * PAGE]
    with fs.open(url, block_size=PAGE) as f:
        f.seek(len(DATA) - 100)
        assert f.read() == DATA[-100:]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_nginx_stop_leaves_nothing(tmp_path: Path) -> None:
    server = Nginx(tmp_path)
    with server:
        pids = [p.pid for _, p in server.daemons.procs]
        assert _listening(server.port)
    assert not _listening(server.port)
    assert not server.workdir.exists()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_failed_start_reports_logs_and_stops_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nginx refuses its configuration: start raises with nginx's message and leaves nothing."""
    monkeypatch.setattr(objstore, "_NGINX_CONF", "no_such_directive on;\n" + objstore._NGINX_CONF)
    server = Nginx(tmp_path, timeout=30)
    with pytest.raises(ServerError, match=r'(?s)nginx exited.*unknown directive "no_such_directive"'):
        server.start()
    assert not server.daemons.procs
    assert not server.workdir.exists()


def test_rgw_failing_late_stops_the_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """radosgw cannot bind its port (taken), after the monitor, manager and OSD are up:
    start raises with radosgw's log, and every daemon of the cluster is gone."""
    started: list[int] = []
    spawn = objstore._Daemons.spawn

    def spawn_and_note(self: objstore._Daemons, name: str, argv: list[str]) -> Any:
        proc = spawn(self, name, argv)
        started.append(proc.pid)
        return proc

    monkeypatch.setattr(objstore._Daemons, "spawn", spawn_and_note)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1]])
        real_free_port = objstore.free_port
        monkeypatch.setattr(objstore, "free_port", lambda: next(ports, None) or real_free_port())
        server = CephRGW(timeout=60)
        with pytest.raises(ServerError, match=r"(?s)client.rgw exited.*--- client.rgw.log"):
            server.start()
    assert len(started) == 4
    for pid in started:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not server.workdir.exists()


def test_rgw_counters_count_requests(rgw: CephRGW, s3_bucket: Bucket) -> None:
    """The server's own count: a ranged GET of 64 KiB is one GET of 64 KiB (Ceph 16: one byte short)."""
    s3_bucket.fs.pipe_file(s3_bucket.path("obj"), DATA)
    before = rgw.counters()
    s3_bucket.fs.cat_file(s3_bucket.path("obj"), start=16 * PAGE, end=32 * PAGE)
    after = rgw.counters()
    assert after["get"] - before["get"] == 1
    assert after["get_b"] - before["get_b"] in (16 * PAGE - 1, 16 * PAGE)


def test_rgw_daemons_run_and_bind_localhost_only(rgw: CephRGW) -> None:
    names = {name for name, p in rgw.daemons.procs if p.poll() is None}
    assert names == {"mon.a", "mgr.x", "osd.0", "client.rgw"}
    with pytest.raises(OSError):
        socket.create_connection((_other_address(), rgw.port), timeout=2).close()


def _other_address() -> str:
    """An address of this host that is not loopback (so a server bound to 127.0.0.1 is not on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
        return str(s.getsockname()[0])


def test_latency_proxy_overlaps_connections() -> None:
    """Eight connections' requests are in flight at once through the proxy: a server
    that answers none until it has all eight answers them all (a proxy that passed
    one connection at a time would never fill the barrier)."""
    async def main() -> list[bytes]:
        arrived: list[bytes] = []
        all_in = asyncio.Event()

        async def barrier(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            arrived.append(await r.read(100))
            if len(arrived) == 8:
                all_in.set()
            await all_in.wait()
            w.write(b"all %d" % len(arrived))
            await w.drain()
            w.close()

        server = await asyncio.start_server(barrier, "127.0.0.1", 0)
        proxy = objstore.LatencyProxy(server.sockets[0].getsockname()[1], 0.2)
        try:
            async def one(i: int) -> bytes:
                r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
                w.write(b"ping%d" % i)
                await w.drain()
                data = await r.read(100)
                w.close()
                return data

            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8))), 30)
        finally:
            proxy.stop()
            server.close()

    assert asyncio.run(main()) == [b"all 8"] * 8
