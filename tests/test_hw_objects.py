"""Objects of object stores through the hardware MMU: URLs in a HardwareVM's
``map``, ``open``, ``pread`` and ``pwrite``, served by its pager server's
objfs mounts, against Ceph's RADOS Gateway (and nginx for HTTP).

RGW here takes parts of 4 KiB (RGW_POLICY), so a publish uploads the dirty
pages alone and copies the rest server-side (see test_objfs_rgw.py).
Every process that touches a hardware map is a subprocess (hw_user.py or
a snippet), every wait bounded, as in test_hw_mmap.py.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import mmap
import os
import signal
import subprocess
import sys
from typing import Any

import pytest
import s3fs

from hw_procs import DEADLINE, Client, ServerProc
from objservers_helpers import Bucket, WebDir
from test_hw_mmap import pattern, sha
from vnpager import VM
from vnpager.vfs.objstore import PartPolicy

PS = mmap.PAGESIZE
RGW_POLICY = PartPolicy(min_part=PS, max_parts=1_000_000)


def mounted(clients: list[Client], bucket: Bucket, **connect: Any) -> Client:
    """A client process with a hardware VM and the bucket's store mounted."""
    c = Client()
    clients.append(c)
    c.do(op="connect", **connect)
    c.do(op="mount", protocol="s3", options=bucket.user.storage_options(),
         policy=dataclasses.asdict(RGW_POLICY))
    return c


def put(bucket: Bucket, key: str, data: bytes) -> str:
    bucket.fs.pipe_file(bucket.path(key), data)
    return f"s3://{bucket.path(key)}"


def fetch(bucket: Bucket, key: str) -> bytes:
    bucket.fs.invalidate_cache()
    data: bytes = bucket.fs.cat_file(bucket.path(key))
    return data


NUMPY = """
import json, mmap, sys
import numpy as np
import vnpager
from vnpager.vfs.objstore import PartPolicy
url, options = sys.argv[1], json.loads(sys.argv[2])
vm = vnpager.VM(physmem="4M", mmu="hardware")
s3 = vm.mount_objects("s3", policy=PartPolicy(min_part=4096, max_parts=1_000_000), **options)
m = vm.map(url)                               # the object, mapped: real memory
a = np.frombuffer(m, dtype=np.uint8)          # zero copy: the map's own memory
out = {"isinstance": isinstance(m, mmap.mmap), "len": len(m), "sum": int(a.sum(dtype=np.uint64))}
w = np.ndarray((len(m),), np.uint8, buffer=m)
w[3 * 4096 + 7] = 0xEE                        # a store through numpy, into the map itself
out["writes_through"] = bool(m[3 * 4096 + 7] == 0xEE and a[3 * 4096 + 7] == 0xEE)
out["shares"] = bool(np.shares_memory(a, w))
before = s3.statistics()
del a, w
m.flush()                                     # publishes a new version
out["before"], out["after"] = before, s3.statistics()
m.close()
vm.close()
print(json.dumps(out))
"""


def run(code: str, *args: str) -> Any:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=DEADLINE * 2)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hw_objects_numpy_over_an_s3_object_is_zero_copy_and_flush_publishes_the_dirty_page(
        s3_versioned_bucket: Bucket) -> None:
    b = s3_versioned_bucket
    data = pattern(64 * PS + 123, seed=7)
    url = put(b, "arr.bin", data)
    out = run(NUMPY, url, json.dumps(b.user.storage_options()))
    assert out["isinstance"] and out["len"] == len(data) and out["sum"] == sum(data)
    assert out["writes_through"] and out["shares"]
    expect = bytearray(data)
    expect[3 * PS + 7] = 0xEE
    assert fetch(b, "arr.bin") == expect
    versions = b.fs.call_s3("list_object_versions", Bucket=b.name, Prefix="arr.bin")["Versions"]
    assert len(versions) == 2  # a new version, the old one kept
    before, after = out["before"], out["after"]
    assert before["bytes_fetched"] == len(data)  # the sum read every byte once, in ranged GETs
    assert before["gets"] <= len(data) // (16 * PS) + 2  # clusters and windows, none per page
    # the publish uploaded the dirty page alone; the rest was copied server-side
    assert after["bytes_uploaded"] - before["bytes_uploaded"] == PS
    assert after["parts_copied"] - before["parts_copied"] >= 1


def test_hw_objects_two_processes_on_one_server_share_an_objects_pages(
        s3_bucket: Bucket, clients: list[Client]) -> None:
    data = pattern(32 * PS, seed=8)
    url = put(s3_bucket, "shared", data)
    server = ServerProc("4M")
    try:
        two_clients_share(server, s3_bucket, clients, url, data)
    finally:
        server.stop()


def two_clients_share(server: ServerProc, s3_bucket: Bucket, clients: list[Client], url: str,
                      data: bytes) -> None:
    a = mounted(clients, s3_bucket, path=server.path)
    a.do(op="map", url=url)
    assert a.do(op="read", off=0, n=PS) == sha(data[:PS])
    b = mounted(clients, s3_bucket, path=server.path)  # the same arguments: the same mount, a's vnode
    b.do(op="map", url=url)
    a.do(op="write", off=PS + 5, data=b"from a".hex())
    # no flush: the same page, at once (one vnode, one memfd)
    assert b.do(op="read", off=PS, n=PS) == sha(data[PS:PS + 5] + b"from a" + data[PS + 11:2 * PS])
    b.do(op="write", off=20 * PS, data=b"from b".hex())
    assert a.do(op="read", off=20 * PS, n=PS) == sha(b"from b" + data[20 * PS + 6:21 * PS])
    assert fetch(s3_bucket, "shared") == data  # nobody flushed yet
    reads = a.do(op="objstats")["gets"]
    b.do(op="flush")  # publishes the object: a's store too
    expect = bytearray(data)
    expect[PS + 5:PS + 11], expect[20 * PS:20 * PS + 6] = b"from a", b"from b"
    assert fetch(s3_bucket, "shared") == expect
    stats = b.do(op="objstats")
    assert stats == a.do(op="objstats") and stats["gets"] == reads  # one mount; the pages were there
    assert stats["bytes_uploaded"] == 2 * PS


def test_hw_objects_an_object_8_times_physmem_read_through_a_map_stays_within_it(
        s3_bucket: Bucket, clients: list[Client]) -> None:
    physmem = 1 << 20
    data = pattern(8 * physmem, seed=9)
    url = put(s3_bucket, "big", data)
    srv = ServerProc(str(physmem))
    try:
        c = mounted(clients, s3_bucket, path=srv.path)
        c.do(op="map", url=url)
        c.send(op="numpy_sum", off=0, n=len(data))  # every page touched, in order
        assert json.loads(c.lines.readline(timeout=300)) == {"ok": sum(data)}
        vmstats = c.do(op="vmstats")
        assert vmstats["npages"] == physmem // PS and vmstats["frames_resident"] <= vmstats["npages"]
        assert vmstats["pageins"] >= len(data) // PS
        stats = c.do(op="objstats")
        assert len(data) <= stats["bytes_fetched"] <= 2 * len(data)
    finally:
        srv.stop()


def test_hw_objects_a_read_error_is_sigbus_in_the_faulting_process(s3_bucket: Bucket,
                                                                    clients: list[Client]) -> None:
    """The object replaced on a bucket without versioning: a page not yet
    read cannot be had at the version mapped (ESTALE in the server), and the
    access that needs it is SIGBUS, as a read error of a file's map."""
    data = pattern(256 * PS, seed=10)
    url = put(s3_bucket, "replaced", data)
    c = mounted(clients, s3_bucket, physmem="1M")  # a private server
    c.do(op="map", url=url)
    assert c.do(op="read", off=0, n=PS) == sha(data[:PS])
    put(s3_bucket, "replaced", pattern(256 * PS, seed=11))
    c.send(op="read", off=200 * PS, n=PS)
    assert c.proc.wait(DEADLINE) == -signal.SIGBUS


def test_hw_objects_http_maps_read_only(http_dir: WebDir, clients: list[Client]) -> None:
    data = pattern(40 * PS + 5, seed=12)
    (http_dir.dir / "page.bin").write_bytes(data)
    url = f"{http_dir.url}/page.bin"
    c = Client()
    clients.append(c)
    c.do(op="connect", physmem="1M")
    assert c.do(op="map", url=url, access=mmap.ACCESS_READ) == 0
    assert c.do(op="read", off=0, n=len(data)) == sha(data)
    assert c.do(op="numpy_sum", off=0, n=len(data)) == sum(data)
    kind, err, _ = c.error(op="map", url=url)  # read-write: the store is read-only
    assert (kind, err) == ("PermissionError", errno.EACCES)


def test_hw_objects_open_pread_pwrite_are_the_software_vms(s3_bucket: Bucket) -> None:
    """vm.open, vm.pread and vm.pwrite of URLs on both machines: the same
    results, and the same objects in the store after."""
    base = pattern(20 * PS + 77, seed=13)
    results: dict[str, list[object]] = {}
    for mmu in ("software", "hardware"):
        url = put(s3_bucket, f"{mmu}.bin", base)
        new = f"s3://{s3_bucket.path(mmu + '.new')}"
        with VM("1M", mmu=mmu) as vm:
            # a filesystem: the hardware VM's server makes it again from its storage_options
            vm.mount_objects(s3fs.S3FileSystem(**s3_bucket.user.storage_options(), skip_instance_cache=True),
                             policy=RGW_POLICY)
            out: list[object] = [vm.pread(url, 3 * PS, PS - 10), vm.pwrite(url, b"pw", 7)]
            with vm.open(url, "r+b") as f:
                out += [f.seek(0, os.SEEK_END), f.seek(5 * PS), f.read(6), f.write(b"XY"), f.tell()]
                out.append(vm.pread(url, 8, 5 * PS + 4))  # the open file's write, through the pages
            with vm.open(new, "w+b") as f:  # a new object, made at the close
                out += [f.write(pattern(70_000, seed=14)), f.seek(0), f.read(), f.truncate(65_537)]
            with pytest.raises(FileExistsError):
                vm.open(new, "xb")
            with pytest.raises(FileNotFoundError):
                vm.pread(url + ".missing", 1, 0)
        results[mmu] = [*out, fetch(s3_bucket, f"{mmu}.bin"), fetch(s3_bucket, f"{mmu}.new")]
    assert results["hardware"] == results["software"]
    assert results["hardware"][-2] == base[:7] + b"pw" + base[9:5 * PS + 6] + b"XY" + base[5 * PS + 8:]
    assert results["hardware"][-1] == pattern(70_000, seed=14)[:65_537]


def test_hw_objects_bad_mounts_and_urls_are_refused(tmp_path: Any) -> None:
    host = tmp_path / "secret"
    host.write_bytes(b"x" * PS)
    with VM("1M", mmu="hardware") as vm:
        with pytest.raises(TypeError, match="JSON"):
            vm.mount_objects("s3", key=object())
        with pytest.raises(PermissionError):  # the server opens no host file for a client by name
            vm.map(f"file://{host}")
        with pytest.raises(PermissionError):
            vm.mount_objects("file")
        assert vm.pread(str(host), 2, 0) == b"xx"  # a path is the client's to open: a descriptor


def test_hw_objects_unmounted_protocol_from_the_environment_and_a_failed_publish_reaches_flush(
        s3_bucket: Bucket, clients: list[Client]) -> None:
    """No mount: the private server (the client's child, its environment)
    mounts s3 with fsspec's defaults, as the software VM does.  A publish
    whose base was replaced (a bucket without versioning) fails: flush
    raises its ESTALE, and the write stays, seen through the map."""
    data = pattern(24 * PS, seed=15)
    url = put(s3_bucket, "env", data)
    c = Client(env={**os.environ, **s3_bucket.user.env()})
    clients.append(c)
    c.do(op="connect", physmem="1M")
    c.do(op="map", url=url)
    assert c.do(op="read", off=8 * PS, n=PS) == sha(data[8 * PS:9 * PS])
    c.do(op="write", off=2 * PS, data=b"unpublished".hex())
    put(s3_bucket, "env", pattern(24 * PS, seed=16))
    kind, err, _ = c.error(op="flush")
    assert (kind, err) == ("OSError", errno.ESTALE)
    assert c.do(op="read", off=2 * PS, n=PS) == sha(b"unpublished" + data[2 * PS + 11:3 * PS])


def test_hw_objects_the_readme_example_runs(s3_bucket: Bucket) -> None:
    """The README's 30-second example (Object stores, hardware MMU), on RGW."""
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:]]
    code = next(b for b in blocks if 'mmu="hardware"' in b and "s3://bucket/big.bin" in b)
    data = pattern(16 << 20, seed=17)
    url = put(s3_bucket, "big.bin", data)
    user = s3_bucket.user
    for old, new in (("http://127.0.0.1:7480", user.url), ('"ACCESS"', repr(user.access_key)),
                     ('"SECRET"', repr(user.secret_key)), ("s3://bucket/big.bin", url)):
        assert old in code
        code = code.replace(old, new)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE * 2)
    assert out.returncode == 0, out.stderr
    total, stats = out.stdout.strip().splitlines()
    assert int(total) == sum(data)
    assert "'bytes_uploaded'" in stats
    expect = bytearray(data)
    expect[4096:4103] = b"patched"
    assert fetch(s3_bucket, "big.bin") == expect


def test_hw_objects_a_forked_child_shares_the_map_and_its_flush_publishes(
        s3_bucket: Bucket, clients: list[Client]) -> None:
    data = pattern(64 * PS, seed=18)
    url = put(s3_bucket, "forked", data)
    c = mounted(clients, s3_bucket, physmem="1M")
    c.do(op="map", url=url)
    assert c.do(op="read", off=0, n=PS) == sha(data[:PS])
    c.send(op="fork", off=40 * PS, n=PS, woff=50 * PS, data=b"child".hex())
    assert c.answer() == {"child": sha(data[40 * PS:41 * PS])}
    assert c.answer() == {"ok": 0}  # the child's exit status
    # the child's store is in the parent's map at once, and its flush published it
    assert c.do(op="read", off=50 * PS, n=5) == sha(b"child")
    assert fetch(s3_bucket, "forked")[50 * PS:50 * PS + 5] == b"child"


def _outcome(call: Any) -> tuple[str, int | None]:
    try:
        call().close()
    except (OSError, ValueError, TypeError, OverflowError) as e:
        return type(e).__name__, getattr(e, "errno", None)
    return "ok", None


def test_hw_objects_bad_map_arguments_fail_as_on_the_software_mmu(s3_bucket: Bucket) -> None:
    url = put(s3_bucket, "small", pattern(3 * PS + 5, seed=19))
    cases: list[dict[str, Any]] = [
        {"length": 4 * PS}, {"length": -1}, {"offset": 100}, {"offset": 4 * mmap.ALLOCATIONGRANULARITY},
        {"offset": -mmap.ALLOCATIONGRANULARITY}, {"access": 7}, {"access": mmap.ACCESS_READ, "prot": 1},
        {"length": PS, "offset": PS}, {"length": 0, "access": mmap.ACCESS_COPY}]
    outcomes: dict[str, list[object]] = {}
    for mmu in ("software", "hardware"):
        with VM("1M", mmu=mmu) as vm:
            vm.mount_objects("s3", policy=RGW_POLICY, **s3_bucket.user.storage_options())
            outcomes[mmu] = [_outcome(lambda kw=kw: vm.map(url, **kw)) for kw in cases]
            outcomes[mmu].append(_outcome(lambda: vm.map(url + ".missing")))
    assert outcomes["hardware"] == outcomes["software"]
    assert outcomes["software"][-3:] == [("ok", None), ("ok", None), ("FileNotFoundError", errno.ENOENT)]
