"""objfs: objects of S3 (moto's server here) and HTTP as vnodes of the pager.

Reads of a cluster or window are one ranged GET; readers of one object have
their GETs in flight at once; write-back stages pages and a sync publishes a
new version whose clean ranges are server-side copies; a failed publish is
kept and reported once to each open; close-to-open by ETag.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from collections.abc import Iterator

import fsspec
import pytest

from helpers import child_status
from objfs_helpers import (
    MOTO_MIN_PART,
    checked_vm,
    moto_server,
    new_bucket,
    new_s3fs,
    s3_client,
    slow_and_failing,
)
from vnpager import VM
from vnpager.tools.objservers import LatencyProxy
from vnpager.uvm.uvm_param import MADV_RANDOM, MADV_WILLNEED
from vnpager.uvm.uvm_readahead import RA_WINSIZE_MAX
from vnpager.vfs.objfs import ObjMount
from vnpager.vfs.objstore import PartPolicy
from vnpager.vnmap import vnode_of

PS = 4096
POLICY = PartPolicy(min_part=MOTO_MIN_PART)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    yield from moto_server()


@pytest.fixture(scope="module")
def slow_endpoint(moto_endpoint: str) -> Iterator[str]:
    """moto behind a proxy that adds 0.2 s to every request (the GETs of
    both paths: fsspec's and the direct one)."""
    proxy = LatencyProxy(int(moto_endpoint.rsplit(":", 1)[1]), 0.2)
    yield f"http://127.0.0.1:{proxy.port}"
    proxy.stop()


@pytest.fixture
def bucket(moto_endpoint: str) -> str:
    return new_bucket(moto_endpoint)


@pytest.fixture
def vm() -> Iterator[VM]:
    yield from checked_vm(256 * PS)


@pytest.fixture
def s3(vm: VM, moto_endpoint: str) -> ObjMount:
    return vm.mount_objects(new_s3fs(moto_endpoint), policy=POLICY)


def put(endpoint: str, bucket: str, key: str, data: bytes) -> str:
    """Write an object from outside the VM; its ETag."""
    return str(s3_client(endpoint).put_object(Bucket=bucket, Key=key, Body=data)["ETag"])


def get(endpoint: str, bucket: str, key: str) -> bytes:
    return bytes(s3_client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read())


def test_objfs_read_cluster_is_one_get(vm: VM, s3: ObjMount, moto_endpoint: str, bucket: str) -> None:
    data = random.Random(1).randbytes(64 * PS)
    put(moto_endpoint, bucket, "k", data)
    url = f"s3://{bucket}/k"
    before = s3.statistics()
    assert vm.pread(url, 16 * PS, 16 * PS) == data[16 * PS:32 * PS]  # one cluster: one GET
    after = s3.statistics()
    assert after["gets"] - before["gets"] == 1
    assert after["bytes_fetched"] - before["bytes_fetched"] == 16 * PS
    with vm.map(url, 0, prot=1) as m:  # PROT_READ
        ios0, gets0 = vm.stats().read_ios, s3.statistics()["gets"]
        assert all(m[i:i + 8] == data[i:i + 8] for i in range(0, len(data), PS))
        reads, gets = vm.stats().read_ios - ios0, s3.statistics()["gets"] - gets0
    assert gets == reads  # one GET per uvn_io read, whatever its pages
    assert 0 < gets <= 48 // 4  # windows of several pages: no GET per page
    assert s3.statistics()["bytes_fetched"] <= len(data) + 16 * PS  # nothing read twice


def test_objfs_random_reads_fetch_what_they_use(vm: VM, s3: ObjMount, moto_endpoint: str,
                                                bucket: str) -> None:
    data = random.Random(2).randbytes(128 * PS)
    put(moto_endpoint, bucket, "r", data)
    rnd = random.Random(3)
    with vm.map(f"s3://{bucket}/r", 0, prot=1) as m:
        m.madvise(MADV_RANDOM)
        offs = {rnd.randrange(128) * PS for _ in range(40)}
        for off in offs:
            assert m[off:off + 16] == data[off:off + 16]
    st = s3.statistics()
    assert st["gets"] == len(offs) and st["bytes_fetched"] == len(offs) * PS


def test_objfs_getattr_size_and_version(vm: VM, s3: ObjMount, moto_endpoint: str, bucket: str) -> None:
    from vnpager.vfs.vnode import VOP_GETATTR, Vattr

    put(moto_endpoint, bucket, "a", b"x" * 1000)
    url = f"s3://{bucket}/a"
    vp = vnode_of(vm, url)
    va1 = Vattr()
    assert VOP_GETATTR(vp, va1) == 0 and va1.va_size == 1000
    vm.vfs.vrele(vp)
    put(moto_endpoint, bucket, "a", b"y" * 1000)  # same size, same second: a new ETag
    vp = vnode_of(vm, url)
    va2 = Vattr()
    assert VOP_GETATTR(vp, va2) == 0 and va2.va_size == 1000
    assert va2.va_mtime_ns != va1.va_mtime_ns
    vm.vfs.vrele(vp)


def test_objfs_readers_of_one_object_overlap(vm: VM, slow_endpoint: str, moto_endpoint: str,
                                             bucket: str) -> None:
    """8 readers of one object on a slow server: their GETs are in flight at
    once (reads of objfs do not hold the vnode lock)."""
    data = random.Random(4).randbytes(128 * PS)
    put(moto_endpoint, bucket, "s", data)
    url = f"s3://{bucket}/s"
    s3 = vm.mount_objects(new_s3fs(slow_endpoint), policy=POLICY)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def reader(i: int) -> None:
        try:
            with vm.open(url) as f:  # the lookup's HEAD before the start
                start.wait(timeout=30)
                f.seek(i * 16 * PS)
                assert f.read(16 * PS) == data[i * 16 * PS:(i + 1) * 16 * PS]
        except BaseException as e:
            errors.append(e)

    with vm.open(url):  # held open: the readers share one vnode and object
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors
    assert s3.statistics()["max_gets_in_flight"] >= 5


def test_objfs_write_back_copies_clean_ranges(vm: VM, s3: ObjMount, moto_endpoint: str,
                                              bucket: str) -> None:
    size = 64 * MOTO_MIN_PART
    data = bytearray(random.Random(5).randbytes(size))
    etag = put(moto_endpoint, bucket, "w", bytes(data))
    url = f"s3://{bucket}/w"
    rnd = random.Random(6)
    dirty = sorted(rnd.sample(range(size // PS), 8))
    with vm.map(url) as m:
        for pg in dirty:
            m[pg * PS + 10:pg * PS + 14] = b"DIRT"
            data[pg * PS + 10:pg * PS + 14] = b"DIRT"
        m.flush()
    st = s3.statistics()
    assert get(moto_endpoint, bucket, "w") == data
    assert s3_client(moto_endpoint).head_object(Bucket=bucket, Key="w")["ETag"] != etag
    assert st["publishes"] == 1
    assert st["bytes_uploaded"] <= len(dirty) * 2 * MOTO_MIN_PART  # each page grown to a part, at most
    assert st["bytes_copied"] >= size - st["bytes_uploaded"]
    assert st["bytes_uploaded"] + st["bytes_copied"] == size


def test_objfs_failed_publish_kept_and_reported_once(vm: VM, s3: ObjMount, moto_endpoint: str,
                                                     bucket: str) -> None:
    size = 16 * MOTO_MIN_PART
    data = bytearray(random.Random(7).randbytes(size))
    put(moto_endpoint, bucket, "f", bytes(data))
    url = f"s3://{bucket}/f"
    undo = slow_and_failing(s3.fs, fail={"upload_part": 1, "put_object": 1})
    other = vm.open(url, "r+b")  # open while the publish fails: told once too
    with vm.map(url) as m:
        m[PS:PS + 5] = b"hello"
        data[PS:PS + 5] = b"hello"
        with pytest.raises(OSError) as ei:
            m.flush()
        assert ei.value.errno == errno.EIO
        assert get(moto_endpoint, bucket, "f") != data  # not published
        assert vm.pread(url, 5, PS) == b"hello"  # the VM still has it
        undo()
        m.flush()  # told once; the publish is tried again, and succeeds
    assert get(moto_endpoint, bucket, "f") == data
    with pytest.raises(OSError):
        other.sync()
    other.sync()
    other.close()


def test_objfs_close_to_open_after_outside_replace(vm: VM, s3: ObjMount, moto_endpoint: str,
                                                   bucket: str) -> None:
    old, new = b"a" * (8 * PS), b"b" * (8 * PS)
    put(moto_endpoint, bucket, "c", old)
    url = f"s3://{bucket}/c"
    assert vm.pread(url, 8 * PS, 0) == old  # persists with its pages
    gets = s3.statistics()["gets"]
    assert vm.pread(url, 8 * PS, 0) == old and s3.statistics()["gets"] == gets  # cached
    put(moto_endpoint, bucket, "c", new)
    with vm.open(url) as f:
        assert f.read() == new  # the old version's pages were dropped
    assert s3.statistics()["gets"] > gets


def test_objfs_held_open_shows_its_version(vm: VM, s3: ObjMount, moto_endpoint: str,
                                           bucket: str) -> None:
    put(moto_endpoint, bucket, "h", b"1" * (4 * PS))
    url = f"s3://{bucket}/h"
    with vm.open(url) as f:
        assert f.read(PS) == b"1" * PS
        put(moto_endpoint, bucket, "h", b"2" * (8 * PS))
        assert vm.pread(url, PS, 0) == b"1" * PS  # held: the version opened
    assert vm.pread(url, PS, 0) == b"2" * PS  # next open: the new one


def test_objfs_new_object_and_modes(vm: VM, s3: ObjMount, moto_endpoint: str, bucket: str) -> None:
    url = f"s3://{bucket}/dir/new"
    with vm.open(url, "wb") as f:
        f.write(b"fresh object")
    assert get(moto_endpoint, bucket, "dir/new") == b"fresh object"
    with pytest.raises(FileExistsError):
        vm.open(url, "xb")
    with vm.open(url, "ab") as f:
        f.write(b"!")
    assert get(moto_endpoint, bucket, "dir/new") == b"fresh object!"
    with vm.open(url, "r+b") as f:
        f.truncate(5)
    assert get(moto_endpoint, bucket, "dir/new") == b"fresh"
    with pytest.raises(FileNotFoundError):
        vm.open(f"s3://{bucket}/missing")


def test_objfs_vm_close_publishes(moto_endpoint: str, bucket: str) -> None:
    put(moto_endpoint, bucket, "v", b"\0" * (4 * PS))
    vm = VM(physmem=64 * PS)
    vm.mount_objects(new_s3fs(moto_endpoint), policy=POLICY)
    vm.pwrite(f"s3://{bucket}/v", b"late", PS)  # dirty; nobody syncs
    vm.close()
    assert get(moto_endpoint, bucket, "v")[PS:PS + 4] == b"late"


def test_objfs_http_read_only(vm: VM, moto_endpoint: str, bucket: str) -> None:
    """Plain HTTP with Range (moto serves a bucket's objects to GETs)."""
    data = random.Random(8).randbytes(32 * PS)
    s3_client(moto_endpoint).put_object(Bucket=bucket, Key="pub", Body=data, ACL="public-read")
    http = vm.mount_objects(fsspec.filesystem("http", skip_instance_cache=True))
    url = f"{moto_endpoint}/{bucket}/pub"
    with vm.map(url, 0, prot=1) as m:
        assert m[5 * PS:6 * PS] == data[5 * PS:6 * PS]
        assert m[:] == data
    assert 0 < http.statistics()["gets"] < 32
    with pytest.raises(PermissionError):
        vm.open(url, "r+b")


def test_objfs_last_flush_wins(moto_endpoint: str) -> None:
    """Two VMs write one object: the later publish is the object, whole
    (its clean ranges copied from the version it opened: a versioned bucket)."""
    bucket = new_bucket(moto_endpoint, versioned=True)
    size = 8 * MOTO_MIN_PART
    base = random.Random(9).randbytes(size)
    put(moto_endpoint, bucket, "two", base)
    url = f"s3://{bucket}/two"
    vms = [VM(physmem=64 * PS), VM(physmem=64 * PS)]
    try:
        for v in vms:
            v.mount_objects(new_s3fs(moto_endpoint), policy=POLICY)
        a, b = (v.open(url, "r+b") for v in vms)
        a.write(b"A" * PS)
        b.seek(MOTO_MIN_PART)
        b.write(b"B" * PS)
        a.close()
        b.close()
    finally:
        for v in vms:
            v.close()
    want = base[:MOTO_MIN_PART] + b"B" * PS + base[MOTO_MIN_PART + PS:]
    assert get(moto_endpoint, bucket, "two") == want


def test_objfs_truncate_then_extend_reads_zeros(vm: VM, s3: ObjMount, moto_endpoint: str,
                                                bucket: str) -> None:
    data = random.Random(10).randbytes(8 * PS)
    put(moto_endpoint, bucket, "t", data)
    url = f"s3://{bucket}/t"
    with vm.open(url, "r+b") as f:
        f.truncate(2 * PS + 7)
        f.seek(6 * PS)
        f.write(b"end")
        f.seek(0)
        seen = f.read()
    want = data[:2 * PS + 7] + bytes(4 * PS - 7) + b"end"
    assert seen == want
    assert get(moto_endpoint, bucket, "t") == want


def test_objfs_willneed_windows_in_flight_at_once(slow_endpoint: str, moto_endpoint: str,
                                                  bucket: str) -> None:
    """MADV_WILLNEED of a range of several windows: the read-ahead daemon's
    threads have several window GETs in flight at once."""
    size = 2 << 20
    data = random.Random(11).randbytes(size)
    put(moto_endpoint, bucket, "ra", data)
    vm = VM(physmem=4 * size)
    try:
        mp = vm.mount_objects(new_s3fs(slow_endpoint), policy=POLICY)
        with vm.map(f"s3://{bucket}/ra", 0, prot=1) as m:
            m.madvise(MADV_WILLNEED)
            assert vm.readahead.drain()
            gets = mp.statistics()["gets"]
            assert m[:] == data
            assert mp.statistics()["gets"] == gets  # all read ahead
        st = mp.statistics()
        assert st["bytes_fetched"] == size and st["gets"] == size // RA_WINSIZE_MAX
        assert st["max_gets_in_flight"] >= 3
    finally:
        vm.close()


def test_objfs_direct_get_off_goes_through_s3fs(vm: VM, s3: ObjMount, moto_endpoint: str,
                                                bucket: str) -> None:
    """``store.direct_get = False``: GETs are s3fs's get_object (a failure
    injected there is the read's), no URL presigned."""
    data = random.Random(13).randbytes(8 * PS)
    put(moto_endpoint, bucket, "off", data)
    s3.store.direct_get = False
    undo = slow_and_failing(s3.fs, fail={"get_object": 1})
    with pytest.raises(OSError) as ei:
        vm.pread(f"s3://{bucket}/off", 8, 0)
    assert ei.value.errno == errno.EIO
    undo()
    assert vm.pread(f"s3://{bucket}/off", 8, PS) == data[PS:PS + 8]
    assert s3.statistics()["signs"] == 0


def test_objfs_proxied_client_keeps_fsspec_path(vm: VM, slow_endpoint: str, moto_endpoint: str,
                                                bucket: str) -> None:
    """An s3fs client with a proxy (here the latency proxy, which passes the
    proxied requests on to moto as they are): the direct path would not
    use it, so its GETs stay s3fs's, through the proxy."""
    data = random.Random(14).randbytes(8 * PS)
    put(moto_endpoint, bucket, "px", data)
    fs = fsspec.filesystem("s3", key="testing", secret="testing", skip_instance_cache=True,
                           client_kwargs={"endpoint_url": moto_endpoint, "region_name": "us-east-1"},
                           config_kwargs={"proxies": {"http": slow_endpoint}})
    mp = vm.mount_objects(fs, policy=POLICY)
    assert vm.pread(f"s3://{bucket}/px", 8, PS) == data[PS:PS + 8]
    st = mp.statistics()
    assert st["gets"] == 1 and st["signs"] == 0


def test_objfs_any_fsspec_filesystem(vm: VM) -> None:
    """fsspec's memory filesystem: no server-side copy, so a publish writes
    the object whole; reads are ranged as on S3."""
    mem = fsspec.filesystem("memory", skip_instance_cache=True)
    data = random.Random(12).randbytes(32 * PS)
    mem.pipe_file("/objfs-test/m", data)
    mp = vm.mount_objects(mem)
    with vm.open("memory://objfs-test/m", "r+b") as f:
        assert f.read(PS) == data[:PS]
        f.seek(10 * PS)
        f.write(b"mem")
    want = data[:10 * PS] + b"mem" + data[10 * PS + 3:]
    assert mem.cat_file("/objfs-test/m") == want
    st = mp.statistics()
    assert st["puts"] == 1 and st["bytes_uploaded"] == len(data)
    mem.pipe_file("/objfs-test/m", b"replaced")  # outside: close-to-open
    assert vm.pread("memory://objfs-test/m", 100, 0) == b"replaced"


@pytest.mark.filterwarnings("ignore:This process .*multi-threaded:DeprecationWarning")
def test_objfs_fork_publishes_first(vm: VM, s3: ObjMount, moto_endpoint: str, bucket: str) -> None:
    """A fork publishes what was staged, so parent and child start from one
    version (the child must not publish the parent's writes under it)."""
    put(moto_endpoint, bucket, "fk", b"p" * (8 * PS))
    url = f"s3://{bucket}/fk"
    f = vm.open(url, "r+b")
    f.write(b"PARENT")  # dirty, never synced
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        import faulthandler
        faulthandler.dump_traceback_later(50, exit=True)  # a hang shows where
        ok = vm.pread(url, 6, 0) == b"PARENT"
        os._exit(0 if ok else 1)
    assert child_status(pid, 60) == 0
    assert get(moto_endpoint, bucket, "fk")[:6] == b"PARENT"  # published at the fork
    f.write(b"!")
    f.close()
    assert get(moto_endpoint, bucket, "fk")[:7] == b"PARENT!"
