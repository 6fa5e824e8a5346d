"""objfs against a real object store: Ceph's RADOS Gateway (and nginx for
HTTP), started by the session's fixtures (conftest.py, vnpager.tools.objservers).

RGW here takes parts of 4 KiB (rgw_multipart_min_part_size), so a publish
uploads the dirty pages alone and copies the rest server-side; it honours
x-amz-copy-source-if-match and If-Match, so a replaced base is ESTALE.
"""

from __future__ import annotations

import errno
import hashlib
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import s3fs

from objfs_helpers import checked_vm, slow_and_failing
from objservers_helpers import Bucket, WebDir
from vnpager import VM
from vnpager.tools.bench_s3 import OpsLog
from vnpager.tools.objservers import CephRGW, S3User
from vnpager.uvm.uvm_param import MADV_RANDOM
from vnpager.vfs.objfs import ObjMount
from vnpager.vfs.objstore import MiB, PartPolicy

PS = 4096
RGW_POLICY = PartPolicy(min_part=PS, max_parts=1_000_000)


def _fs(user: S3User, **kwargs: Any) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(**user.storage_options(), skip_instance_cache=True, **kwargs)


@pytest.fixture
def vm() -> Iterator[VM]:
    yield from checked_vm(256 * PS)


@pytest.fixture
def s3(vm: VM, s3_bucket: Bucket) -> ObjMount:
    return vm.mount_objects(_fs(s3_bucket.user), policy=RGW_POLICY)


def _url(b: Bucket, key: str) -> str:
    return f"s3://{b.path(key)}"


def test_objfs_rgw_cluster_reads_are_one_get_each(vm: VM, s3: ObjMount, s3_bucket: Bucket) -> None:
    data = random.Random(1).randbytes(4 * MiB)
    s3_bucket.fs.pipe_file(s3_bucket.path("k"), data)
    with vm.map(_url(s3_bucket, "k"), 0, prot=1) as m:
        ios = vm.stats().read_ios
        assert all(m[i:i + 4] == data[i:i + 4] for i in range(0, len(data), PS))
        reads = vm.stats().read_ios - ios
    st = s3.statistics()
    assert st["gets"] == reads  # one GET per uvn_io read
    assert st["gets"] <= len(data) // (64 * 1024) + 8  # windows of 64 KiB and up: none per page
    assert st["bytes_fetched"] == len(data)


def test_objfs_rgw_gets_go_direct(vm: VM, s3: ObjMount, s3_bucket: Bucket, rgw: CephRGW) -> None:
    """GETs of pages go by http.client to a presigned URL, signed once: RGW
    logs them with our User-Agent, and s3fs's get_object is never called
    (it is made to fail)."""
    data = random.Random(10).randbytes(64 * PS)
    s3_bucket.fs.pipe_file(s3_bucket.path("d"), data)
    log = OpsLog(rgw.ops_log)
    mark = log.mark()
    slow_and_failing(s3.fs, fail={"get_object": 1000})
    with vm.map(_url(s3_bucket, "d"), 0, prot=1) as m:
        assert m[:] == data
    st = s3.statistics()
    gets = [op for op in log.since(mark) if op["bucket"] == s3_bucket.name and op["uri"].startswith("GET ")]
    assert {op["user_agent"] for op in gets} == {"vnpager-objhttp"}
    assert len(gets) == st["gets"] and sum(int(op["bytes_sent"]) for op in gets) == len(data)
    assert st["signs"] == 1 and st["errors"] == 0


def _random_reads(vm: VM, url: str, pages: list[int]) -> list[bytes]:
    """Page *pages* of *url* read one GET each (MADV_RANDOM: no read-ahead)."""
    with vm.map(url, 0, prot=1) as m:
        m.madvise(MADV_RANDOM)
        return [m[p * PS:(p + 1) * PS] for p in pages]


def _page_after_outside_replace(vm: VM, b: Bucket, key: str) -> bytes | OSError:
    """Map *key* (pages of b"1"), read its first page, replace the object
    from outside (pages of b"2"), then read page 8, not cached (one GET):
    its bytes, or the error."""
    path = b.path(key)
    b.fs.pipe_file(path, b"1" * (16 * PS))
    with vm.map(_url(b, key), 0, prot=1) as m:
        m.madvise(MADV_RANDOM)
        assert m[:PS] == b"1" * PS
        b.fs.pipe_file(path, b"2" * (16 * PS))
        try:
            return m[8 * PS:9 * PS]
        except OSError as e:
            return e


def test_objfs_rgw_outside_replace_is_estale_unversioned(vm: VM, s3: ObjMount, s3_bucket: Bucket) -> None:
    """The direct path's GET pins by If-Match (unsigned, beside the
    presigned URL): a page read after an outside replace is ESTALE, not
    the new version's bytes."""
    got = _page_after_outside_replace(vm, s3_bucket, "r")
    assert isinstance(got, OSError) and got.errno == errno.ESTALE
    assert s3.statistics()["signs"] == 1
    assert vm.pread(_url(s3_bucket, "r"), 4, 8 * PS) == b"2222"  # reopened: the new version


def test_objfs_rgw_outside_replace_versioned_reads_the_pinned_version(vm: VM,
                                                                      s3_versioned_bucket: Bucket) -> None:
    """On a versioned bucket the presigned URL names the VersionId: pages
    read after an outside replace are still the old version's."""
    b = s3_versioned_bucket
    mp = vm.mount_objects(_fs(b.user, version_aware=True), policy=RGW_POLICY)
    assert _page_after_outside_replace(vm, b, "v") == b"1" * PS
    assert mp.statistics()["signs"] == 1
    assert vm.pread(_url(b, "v"), 4, 8 * PS) == b"2222"  # reopened: the new version, signed anew
    assert mp.statistics()["signs"] == 2


def _count_gets(store: Any) -> list[int]:
    """Count the direct path's GET requests of *store* (each try, a retry too)."""
    reader, calls = store._reader(), []
    real = reader.get_into

    def counted(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        real(*args, **kwargs)

    reader.get_into = counted
    return calls


def test_objfs_rgw_presigned_url_signed_again_before_it_expires(vm: VM, s3: ObjMount,
                                                                s3_bucket: Bucket) -> None:
    """Past three quarters of its time a URL is signed anew before the GET:
    none is refused and tried again."""
    data = random.Random(11).randbytes(16 * PS)
    s3_bucket.fs.pipe_file(s3_bucket.path("x"), data)
    s3.store.presign_expires = 2  # type: ignore[attr-defined]
    url, tries = _url(s3_bucket, "x"), _count_gets(s3.store)
    with vm.open(url):  # held: one vnode, one version throughout
        assert _random_reads(vm, url, [0]) == [data[:PS]]
        time.sleep(3)  # past the URL's time: a GET with it would be refused
        assert _random_reads(vm, url, [5]) == [data[5 * PS:6 * PS]]
    st = s3.statistics()
    assert st["signs"] == 2 and st["errors"] == 0 and len(tries) == 2


def test_objfs_rgw_expired_url_is_signed_again_after_403(vm: VM, s3: ObjMount, s3_bucket: Bucket) -> None:
    """A cached URL RGW finds expired (our clock ahead of its check) is
    answered 403: signed anew, and the GET tried once more."""
    data = random.Random(12).randbytes(16 * PS)
    s3_bucket.fs.pipe_file(s3_bucket.path("y"), data)
    store: Any = s3.store
    store.presign_expires = 1
    url, tries = _url(s3_bucket, "y"), _count_gets(store)
    with vm.open(url):
        assert _random_reads(vm, url, [0]) == [data[:PS]]
        with store._signed_lock:  # as if it were good for long yet
            store._signed.update({k: (t, float("inf")) for k, (t, _) in store._signed.items()})
        time.sleep(2.5)
        assert _random_reads(vm, url, [7]) == [data[7 * PS:8 * PS]]
    st = s3.statistics()
    assert st["signs"] == 2 and st["errors"] == 0 and st["gets"] == 2 and len(tries) == 3


def test_objfs_rgw_eight_readers_overlap(vm: VM, s3_bucket: Bucket, rgw_latency: S3User) -> None:
    """8 readers of one object behind 50 ms of latency: at least 5 GETs at once."""
    data = random.Random(2).randbytes(128 * PS)
    s3_bucket.fs.pipe_file(s3_bucket.path("s"), data)
    mp = vm.mount_objects(_fs(rgw_latency), policy=RGW_POLICY)
    url, start, errors = _url(s3_bucket, "s"), threading.Barrier(8), []

    def reader(i: int) -> None:
        try:
            with vm.open(url) as f:
                start.wait(timeout=30)
                f.seek(i * 16 * PS)
                assert f.read(16 * PS) == data[i * 16 * PS:(i + 1) * 16 * PS]
        except BaseException as e:
            errors.append(e)

    with vm.open(url):
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors
    assert mp.statistics()["max_gets_in_flight"] >= 5


def test_objfs_rgw_publish_copies_clean_ranges(vm: VM, s3: ObjMount, s3_bucket: Bucket) -> None:
    size = 16 * MiB
    data = bytearray(random.Random(3).randbytes(size))
    path = s3_bucket.path("w")
    s3_bucket.fs.pipe_file(path, bytes(data))
    etag = s3_bucket.fs.info(path)["ETag"]
    pages = random.Random(4).sample(range(size // PS), 64)
    with vm.map(_url(s3_bucket, "w")) as m:
        for pg in pages:
            m[pg * PS:pg * PS + 8] = b"dirtied!"
            data[pg * PS:pg * PS + 8] = b"dirtied!"
        m.flush()
    st = s3.statistics()
    s3_bucket.fs.invalidate_cache()
    assert s3_bucket.fs.info(path)["ETag"] != etag
    assert s3_bucket.fs.cat_file(path) == data
    # the dirty pages, and the shortest clean gaps (read for it) within twice them
    assert 64 * PS <= st["bytes_uploaded"] <= 2 * 64 * PS
    assert st["bytes_copied"] == size - st["bytes_uploaded"]
    assert st["bytes_fetched"] >= st["bytes_uploaded"]  # pages read before written, and the gaps


def test_objfs_rgw_failed_upload_kept_dirty_and_reported_once(vm: VM, s3: ObjMount,
                                                              s3_bucket: Bucket) -> None:
    path = s3_bucket.path("f")
    data = bytearray(random.Random(5).randbytes(64 * PS))
    s3_bucket.fs.pipe_file(path, bytes(data))
    undo = slow_and_failing(s3.fs, fail={"upload_part": 1})
    with vm.map(_url(s3_bucket, "f")) as m:
        m[3 * PS:3 * PS + 4] = b"kept"
        data[3 * PS:3 * PS + 4] = b"kept"
        with pytest.raises(OSError):
            m.flush()
        undo()
        m.flush()  # not told again; publishes
    s3_bucket.fs.invalidate_cache()
    assert s3_bucket.fs.cat_file(path) == data


def test_objfs_rgw_close_to_open_after_outside_replace(vm: VM, s3: ObjMount, s3_bucket: Bucket) -> None:
    path, url = s3_bucket.path("c"), _url(s3_bucket, "c")
    s3_bucket.fs.pipe_file(path, b"old!" * PS)
    assert vm.pread(url, 4, 0) == b"old!"
    s3_bucket.fs.pipe_file(path, b"new!" * PS)
    with vm.open(url) as f:
        assert f.read() == b"new!" * PS


def test_objfs_rgw_replaced_base_is_estale(vm: VM, s3: ObjMount, s3_bucket: Bucket) -> None:
    """Without versioning, a publish whose base was replaced cannot copy
    from it: ESTALE at flush, the write kept; reads of pages not cached
    fail the same way rather than mix two versions."""
    path, url = s3_bucket.path("e"), _url(s3_bucket, "e")
    s3_bucket.fs.pipe_file(path, b"a" * (64 * PS))
    m = vm.map(url)
    m[:4] = b"mine"
    s3_bucket.fs.pipe_file(path, b"b" * (64 * PS))  # someone else's version
    with pytest.raises(OSError) as ei:
        m.flush()
    assert ei.value.errno == errno.ESTALE
    with pytest.raises(OSError) as ei:
        m[40 * PS]
    assert ei.value.errno == errno.ESTALE
    assert m[:4] == b"mine"
    with pytest.raises(OSError) as ei:
        m.close()  # tried again, and stale again
    assert ei.value.errno == errno.ESTALE
    s3_bucket.fs.invalidate_cache()
    assert s3_bucket.fs.cat_file(path) == b"b" * (64 * PS)
    with vm.open(url, "r+b") as f:  # reopened: the current version, the stale writes dropped
        assert f.read(4) == b"bbbb"


def test_objfs_rgw_last_flush_wins(s3_versioned_bucket: Bucket) -> None:
    b = s3_versioned_bucket
    path, url = b.path("two"), _url(b, "two")
    base = random.Random(6).randbytes(64 * PS)
    b.fs.pipe_file(path, base)
    vms = [VM(physmem=64 * PS), VM(physmem=64 * PS)]
    try:
        for v in vms:
            v.mount_objects(_fs(b.user), policy=RGW_POLICY)
        first, second = (v.open(url, "r+b") for v in vms)
        first.write(b"1" * PS)
        second.seek(8 * PS)
        second.write(b"2" * PS)
        first.close()
        second.close()  # copies its clean ranges from the version it opened
    finally:
        for v in vms:
            v.close()
    b.fs.invalidate_cache()
    assert b.fs.cat_file(path) == base[:8 * PS] + b"2" * PS + base[9 * PS:]


def test_objfs_nginx_ranged_reads(vm: VM, http_dir: WebDir) -> None:
    data = random.Random(7).randbytes(64 * PS)
    (http_dir.dir / "obj.bin").write_bytes(data)
    import fsspec

    mp = vm.mount_objects(fsspec.filesystem("http", skip_instance_cache=True))
    with vm.map(f"{http_dir.url}/obj.bin", 0, prot=1) as m:
        assert m[10 * PS:10 * PS + 100] == data[10 * PS:10 * PS + 100]
        assert m[:] == data
    st = mp.statistics()
    assert st["bytes_fetched"] == len(data) and st["gets"] <= 16


def test_objfs_nginx_gets_go_direct(vm: VM, http_dir: WebDir) -> None:
    """fsspec's HTTP filesystem as it comes: GETs by http.client to the URL
    with a Range (fsspec's own GET is made to fail); one with request
    options of its own keeps fsspec's path."""
    data = random.Random(13).randbytes(32 * PS)
    (http_dir.dir / "d.bin").write_bytes(data)
    import fsspec

    fs = fsspec.filesystem("http", skip_instance_cache=True)

    def no(*args: Any, **kwargs: Any) -> bytes:
        raise OSError(errno.EIO, "fsspec's GET")

    fs.cat_file = no
    mp = vm.mount_objects(fs)
    with vm.map(f"{http_dir.url}/d.bin", 0, prot=1) as m:
        assert m[:] == data
    assert mp.statistics()["bytes_fetched"] == len(data)
    optioned = fsspec.filesystem("http", skip_instance_cache=True, headers={"X-Mine": "1"})
    optioned.cat_file = no
    vm.mount_objects(optioned)
    with pytest.raises(OSError) as ei:
        vm.pread(f"{http_dir.url}/d.bin", 10, 0)
    assert ei.value.errno == errno.EIO


@pytest.mark.timeout(600)  # a GiB up through s3fs, and down through the VM, on a shared machine
def test_objfs_rgw_1gib_through_16mib_vm(s3_bucket: Bucket) -> None:
    """The issue's budget: a 1 GiB object read whole through a VM of 16 MiB."""
    size, chunk = 1 << 30, 8 * MiB
    rnd, digest = random.Random(8), hashlib.sha256()
    with s3_bucket.fs.open(s3_bucket.path("big"), "wb", block_size=chunk) as w:
        for _ in range(size // chunk):
            piece = rnd.randbytes(chunk)
            digest.update(piece)
            w.write(piece)
    vm = VM(physmem=16 * MiB)
    try:
        mp = vm.mount_objects(_fs(s3_bucket.user), policy=RGW_POLICY)
        got, buf, peak = hashlib.sha256(), bytearray(MiB), 0
        with vm.open(_url(s3_bucket, "big")) as f:
            while n := f.readinto(buf):
                got.update(memoryview(buf)[:n])
                peak = max(peak, vm.stats().resident)
        assert got.digest() == digest.digest()
        assert peak <= vm.npages
        st = mp.statistics()
        assert st["bytes_fetched"] == size
        assert st["gets"] <= size // (64 * 1024)  # no GET per page
    finally:
        vm.close()


def test_objfs_rgw_random_pages_upload_what_is_dirty(s3_bucket: Bucket) -> None:
    """The issue's write target, smaller: random 4 KiB pages (1 MiB of them)
    written into a 64 MiB object, then flushed: the bytes uploaded are at
    most 2x the dirty bytes, the rest copied."""
    size = 64 * MiB
    path = s3_bucket.path("rand")
    with s3_bucket.fs.open(path, "wb", block_size=8 * MiB) as w:
        for i in range(size // (8 * MiB)):
            w.write(bytes([i]) * (8 * MiB))
    vm = VM(physmem=16 * MiB)
    try:
        mp = vm.mount_objects(_fs(s3_bucket.user), policy=RGW_POLICY)
        pages = random.Random(9).sample(range(size // PS), 256)
        with vm.open(f"s3://{path}", "r+b") as f:
            for pg in pages:  # whole pages: nothing to read first
                f.seek(pg * PS)
                f.write(b"RAND" * (PS // 4))
            fetched = mp.statistics()["bytes_fetched"]
        st = mp.statistics()
    finally:
        vm.close()
    dirty = len(pages) * PS
    assert dirty <= st["bytes_uploaded"] <= 2 * dirty and fetched == 0
    assert st["bytes_uploaded"] + st["bytes_copied"] == size
    s3_bucket.fs.invalidate_cache()
    for pg in pages[:20] + [p + 1 for p in pages[:20] if p + 1 not in pages]:
        want = b"RAND" if pg in pages else bytes([pg * PS // (8 * MiB)]) * 4
        assert s3_bucket.fs.cat_file(path, start=pg * PS, end=pg * PS + 4) == want
