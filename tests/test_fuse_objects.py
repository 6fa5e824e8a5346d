"""vnpager mount s3://bucket/prefix: real programs (cp, tar, sqlite3) on a
mount of a bucket of the session's Ceph RADOS Gateway, whose pager has
less memory than the data; names as the store has them, and as others
change them once a listing expires (--dir-cache-time); close-to-open after
an outside replace; a publish that fails is fsync's and close's error.

Each server runs in a subprocess (``python -m vnpager mount URL MNT
--foreground``), credentials in its environment and the endpoint on its
command line, as a user gives them; the fixtures always unmount and reap it.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fuse_helpers import PHYSMEM, Server, fill_database, sqlite
from objservers_helpers import Bucket
from vnpager.tools.bench_s3 import OpsLog
from vnpager.tools.objservers import CephRGW

WAIT = 30.0  # seconds a test waits for a short --dir-cache-time to expire


def _mount(bucket: Bucket, mnt: Path, prefix: str = "", *extra: str) -> Server:
    mnt.mkdir(exist_ok=True)
    env = bucket.user.env()
    endpoint = env.pop("AWS_ENDPOINT_URL")
    os.environ.update(env)  # the server's credentials and region, as boto finds them
    url = f"{bucket.url}/{prefix}" if prefix else bucket.url
    return Server(url, mnt, "--endpoint-url", endpoint, *extra)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The AWS variables _mount sets, restored after the test."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server(s3_bucket: Bucket, tmp_path: Path, aws_env: None) -> Iterator[Server]:
    """A mount of the test's bucket (under the prefix ``top``)."""
    s = _mount(s3_bucket, tmp_path / "mnt", "top")
    try:
        yield s
    finally:
        s.stop()


def _keys(bucket: Bucket, prefix: str = "top/") -> set[str]:
    """The bucket's keys under *prefix* (without it), listed without a delimiter."""
    listing = bucket.fs.call_s3("list_objects_v2", Bucket=bucket.name, Prefix=prefix)
    return {c["Key"][len(prefix):] for c in listing.get("Contents", [])}


def _object(bucket: Bucket, key: str) -> bytes:
    bucket.fs.invalidate_cache()
    return bytes(bucket.fs.cat_file(bucket.path(key)))


def _put(bucket: Bucket, key: str, data: bytes) -> None:
    bucket.fs.call_s3("put_object", Bucket=bucket.name, Key=key, Body=data)


def _delete(bucket: Bucket, key: str) -> None:
    bucket.fs.call_s3("delete_object", Bucket=bucket.name, Key=key)


def test_cp_in_and_out_of_a_whole_bucket(s3_bucket: Bucket, tmp_path: Path, aws_env: None) -> None:
    _put(s3_bucket, "there/before", b"listed")
    server = _mount(s3_bucket, tmp_path / "mnt")
    try:
        data = random.Random(1).randbytes(3 * PHYSMEM + 12_345)  # through a VM smaller than the file
        (tmp_path / "in").write_bytes(data)
        subprocess.run(["cp", str(tmp_path / "in"), str(server.mnt / "f")], check=True, timeout=60)
        assert _object(s3_bucket, "f") == data  # published at cp's close
        subprocess.run(["cp", str(server.mnt / "f"), str(tmp_path / "out")], check=True, timeout=60)
        assert (tmp_path / "out").read_bytes() == data
        assert os.path.getsize(server.mnt / "f") == len(data)
        assert sorted(os.listdir(server.mnt)) == ["f", "there"]
        assert (server.mnt / "there" / "before").read_bytes() == b"listed"
    finally:
        assert server.stop() == 0, server.output
    assert "every dirty page written" in server.output


def _vnpager(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "vnpager", *args], capture_output=True, text=True,
                          timeout=60)
    assert not check or done.returncode == 0, done.stdout + done.stderr
    return done


def test_mount_options_and_clear_failures(s3_bucket: Bucket, tmp_path: Path, aws_env: None) -> None:
    """A bucket detached and unmounted by vnpager umount; what cannot be
    mounted is one line and status 1."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = s3_bucket.user.env()
    region = json.dumps({"region_name": env["AWS_DEFAULT_REGION"]})  # keys as storage options this time
    opts = ["--endpoint-url", env["AWS_ENDPOINT_URL"], "-o", f"key={env['AWS_ACCESS_KEY_ID']}",
            "-o", f"secret={env['AWS_SECRET_ACCESS_KEY']}", "-o", f"client_kwargs={region}",
            "--physmem", str(PHYSMEM)]
    _vnpager("mount", f"{s3_bucket.url}/p", str(mnt), *opts, "--dir-cache-time", "0", check=True)  # detached
    try:
        (mnt / "f").write_bytes(b"detached")
        assert os.listdir(mnt) == ["f"]
        _put(s3_bucket, "p/behind", b"seen at the next listing")  # the server got --dir-cache-time 0
        assert (mnt / "behind").read_bytes() == b"seen at the next listing"
    finally:
        assert _vnpager("umount", str(mnt)).returncode == 0
    assert _object(s3_bucket, "p/f") == b"detached"
    for args, says in (([f"s3://no-such-{s3_bucket.name}", str(mnt), *opts], "No such file or directory"),
                       ([str(tmp_path), str(mnt), "-o", "anon=true"], "for an object store"),
                       ([s3_bucket.url, str(mnt), "-o", "anon"], "not KEY=VALUE"),
                       (["gs://bucket", str(mnt), "--foreground"], "only s3://"),
                       ([str(tmp_path), str(mnt), "--dir-cache-time", "5"], "for an object store")):
        done = _vnpager("mount", *args)
        assert done.returncode == 1 and says in done.stderr, done.stderr
        assert not os.path.ismount(mnt)
    done = _vnpager("mount", s3_bucket.url, str(mnt), "--dir-cache-time", "-1")
    assert done.returncode == 2 and "not a number of seconds >= 0" in done.stderr, done.stderr


def _make_tree(root: Path) -> set[str]:
    """A small tree of directories and files; the keys it should become."""
    rng = random.Random(7)
    keys = set()
    for d in range(3):
        sub = root / f"dir{d}" / f"sub{d % 2}"
        sub.mkdir(parents=True)
        keys |= {f"dir{d}/", f"dir{d}/sub{d % 2}/"}
        for f in range(4):
            (sub / f"file{f}.bin").write_bytes(rng.randbytes(rng.choice([0, 1, 4096, 70_000, 300_001])))
            keys.add(f"dir{d}/sub{d % 2}/file{f}.bin")
    (root / "empty").mkdir()
    (root / "top.txt").write_text("at the top\n")
    return keys | {"empty/", "top.txt"}


def test_tar_extract_diff_and_remount(server: Server, s3_bucket: Bucket, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    keys = _make_tree(tree)
    archive = tmp_path / "tree.tar"
    subprocess.run(["tar", "cf", str(archive), "-C", str(tree), "."], check=True, timeout=60)
    dest = server.mnt / "x"
    dest.mkdir()
    subprocess.run(["tar", "xf", str(archive), "-C", str(dest)], check=True, timeout=120)
    subprocess.run(["diff", "-r", str(tree), str(dest)], check=True, timeout=60)
    assert _keys(s3_bucket, "top/x/") == keys | {""}  # every file an object, every directory a marker
    # the modes and times tar set are the mount's, for its life
    assert os.stat(dest / "top.txt").st_mtime_ns // 10**9 == os.stat(tree / "top.txt").st_mtime_ns // 10**9
    assert server.stop() == 0, server.output
    again = _mount(s3_bucket, tmp_path / "mnt2", "top")
    try:
        subprocess.run(["diff", "-r", str(tree), str(again.mnt / "x")], check=True, timeout=60)
    finally:
        again.stop()


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="sqlite3 CLI not installed (make sysdeps)")
def test_sqlite_then_a_new_mount_reads_it_back(server: Server, s3_bucket: Bucket, tmp_path: Path) -> None:
    db = server.mnt / "test.db"
    expected = fill_database(db, 8, 300)
    assert int(sqlite(db, "SELECT count(*) FROM t;")) == expected
    assert os.path.getsize(db) > PHYSMEM
    assert server.stop(signal.SIGTERM) == 0, server.output
    assert _keys(s3_bucket) == {"test.db"}  # the journal came and went
    again = _mount(s3_bucket, tmp_path / "mnt2", "top")
    try:
        db = again.mnt / "test.db"
        assert sqlite(db, "PRAGMA integrity_check;") == "ok"
        assert int(sqlite(db, "SELECT count(*) FROM t;")) == expected
    finally:
        again.stop()


def test_names_mkdir_rmdir_rename_unlink(server: Server, s3_bucket: Bucket) -> None:
    m = server.mnt
    (m / "d").mkdir()
    assert _keys(s3_bucket) == {"d/"}
    (m / "d" / "f").write_bytes(b"first")
    with pytest.raises(OSError) as e:
        os.rmdir(m / "d")
    assert e.value.errno == errno.ENOTEMPTY
    os.rename(m / "d" / "f", m / "d" / "g")  # a copy and a delete
    assert _keys(s3_bucket) == {"d/", "d/g"} and (m / "d" / "g").read_bytes() == b"first"
    (m / "h").write_bytes(b"second, longer")
    os.rename(m / "h", m / "d" / "g")  # over a file
    assert _object(s3_bucket, "top/d/g") == (m / "d" / "g").read_bytes() == b"second, longer"
    with pytest.raises(OSError) as e:
        os.rename(m / "d", m / "e")
    assert e.value.errno == errno.EXDEV  # a non-empty directory: mv copies it instead
    subprocess.run(["mv", str(m / "d"), str(m / "e")], check=True, timeout=60)
    assert _keys(s3_bucket) == {"e/", "e/g"} and sorted(os.listdir(m)) == ["e"]
    (m / "empty").mkdir()
    os.rename(m / "empty", m / "moved")  # an empty directory: its marker moves
    assert _keys(s3_bucket) == {"e/", "e/g", "moved/"}
    os.unlink(m / "e" / "g")
    assert os.listdir(m / "e") == [] and _keys(s3_bucket) == {"e/", "moved/"}
    os.rmdir(m / "e")
    os.rmdir(m / "moved")
    assert _keys(s3_bucket) == set() and os.listdir(m) == []
    assert os.statvfs(m).f_bavail > 0  # df: a store without a size
    for call in (lambda: os.link(m / "x", m / "y"), lambda: os.symlink("x", m / "y"),
                 lambda: os.mkfifo(m / "y")):
        (m / "x").write_bytes(b"x")
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        os.setxattr(m / "x", "user.a", b"1")
    assert e.value.errno == errno.EOPNOTSUPP


def test_truncate_chmod_utime_and_exclusive_create(server: Server, s3_bucket: Bucket) -> None:
    path = server.mnt / "f"
    path.write_bytes(b"0123456789" * 1000)
    os.truncate(path, 25)  # nobody has it open: published at once
    assert _object(s3_bucket, "top/f") == b"0123456789" * 2 + b"01234"
    with open(path, "r+b") as f:
        f.truncate(5000)  # extended with zeros, published at the close
        assert os.fstat(f.fileno()).st_size == 5000
    assert _object(s3_bucket, "top/f") == b"0123456789" * 2 + b"01234" + bytes(4975)
    os.chmod(path, 0o600)
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    st = os.stat(path)
    assert (stat.S_IMODE(st.st_mode), st.st_atime_ns, st.st_mtime_ns) == (0o600, 1_000_000_000, 2_000_000_000)
    _put(s3_bucket, "top/outside", b"made behind the mount")  # a name not listed: not seen, but there
    with pytest.raises(FileExistsError):
        os.open(server.mnt / "outside", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    fd = os.open(server.mnt / "x", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    os.close(fd)  # an empty object
    assert _object(s3_bucket, "top/x") == b"" and stat.S_IMODE(os.stat(server.mnt / "x").st_mode) == 0o640


def test_a_file_renamed_while_open_follows_its_name(server: Server, s3_bucket: Bucket) -> None:
    """Written, renamed while open, written again: the second write is
    published under the new name; a new file not yet published moves too."""
    m = server.mnt
    with open(m / "a", "w+b") as f:
        f.write(b"1" * 9000)
        f.flush()
        os.fsync(f.fileno())
        os.rename(m / "a", m / "b")
        assert _keys(s3_bucket) == {"b"}
        f.seek(4000)
        f.write(b"2" * 10)
    assert _object(s3_bucket, "top/b") == b"1" * 4000 + b"2" * 10 + b"1" * 4990
    with open(m / "new", "wb") as f:
        f.write(b"unpublished")
        os.rename(m / "new", m / "moved")
    assert _keys(s3_bucket) == {"b", "moved"} and _object(s3_bucket, "top/moved") == b"unpublished"
    assert (m / "moved").read_bytes() == b"unpublished" and sorted(os.listdir(m)) == ["b", "moved"]


def test_a_directory_that_was_only_a_prefix_stays_when_emptied(server: Server, s3_bucket: Bucket) -> None:
    _put(s3_bucket, "top/implicit/only", b"1")  # no marker: a common prefix
    assert os.listdir(server.mnt) == ["implicit"]
    os.unlink(server.mnt / "implicit" / "only")
    assert os.path.isdir(server.mnt / "implicit")
    assert _keys(s3_bucket) == {"implicit/"}  # made a marker, as rmdir has not been asked


def test_a_file_unlinked_while_open_is_not_published_again(server: Server, s3_bucket: Bucket) -> None:
    path = server.mnt / "tmp"
    with open(path, "w+b") as f:
        f.write(b"a" * 10_000)
        f.flush()
        os.fsync(f.fileno())
        assert _object(s3_bucket, "top/tmp") == b"a" * 10_000
        os.unlink(path)
        assert _keys(s3_bucket) == set()
        f.write(b"b" * 10_000)  # still a file, to its holder
        f.flush()
        os.fsync(f.fileno())
        assert os.pread(f.fileno(), 6, 9_997) == b"aaabbb"
    assert _keys(s3_bucket) == set() and not path.exists()
    path.write_bytes(b"new")  # the name again: a new object, not the old one's pages
    assert path.read_bytes() == b"new" and _object(s3_bucket, "top/tmp") == b"new"


def test_an_outside_replace_is_seen_at_the_next_open(server: Server, s3_bucket: Bucket) -> None:
    path = server.mnt / "f"
    path.write_bytes(b"old " * 5000)
    assert path.read_bytes() == b"old " * 5000  # its pages now persist in the VM
    os.stat(path)
    new = random.Random(3).randbytes(30_001)
    _put(s3_bucket, "top/f", new)  # by somebody else
    assert path.read_bytes() == new  # close-to-open: the new version, of its own size
    assert os.path.getsize(path) == len(new)


def test_a_publish_over_a_replaced_object_fails_with_estale(server: Server, s3_bucket: Bucket) -> None:
    """On a bucket without versioning the publish copies the clean bytes of
    the version it opened, pinned by its ETag: replaced behind the mount, it
    is gone, and fsync and close say so; the other writer's object stays."""
    original = random.Random(4).randbytes(64 * 1024)
    _put(s3_bucket, "top/f", original)
    fd = os.open(server.mnt / "f", os.O_RDWR)
    try:
        assert os.pread(fd, 10, 0) == original[:10]
        os.pwrite(fd, b"ours", 20_000)
        theirs = b"replaced behind the mount"
        _put(s3_bucket, "top/f", theirs)
        with pytest.raises(OSError) as e:
            os.fsync(fd)
        assert e.value.errno == errno.ESTALE
    finally:
        with pytest.raises(OSError) as e:
            os.close(fd)  # the last writer's close publishes again, and fails again
    assert e.value.errno == errno.ESTALE
    assert _object(s3_bucket, "top/f") == theirs
    assert server.stop() == 1  # tried once more at unmount: still stale, and said so
    assert "s3://" in server.output and "top/f: not published" in server.output, server.output


def _listings(ops: OpsLog, mark: int, bucket: Bucket) -> int:
    """The mount's listings of *bucket* (ListObjectsV2 with a delimiter) RGW served since *mark*."""
    return sum(1 for op in ops.since(mark) if op.get("bucket") == bucket.name
               and op["operation"] == "list_bucket" and "delimiter=%2F" in op["uri"])


def test_names_made_and_deleted_behind_the_mount_are_seen(s3_bucket: Bucket, tmp_path: Path,
                                                          aws_env: None) -> None:
    """--dir-cache-time 0: every lookup and readdir lists the directory
    again, so objects put by others appear, deleted ones go, a file that
    became a directory is one, and a replaced object's size is taken up."""
    _put(s3_bucket, "top/old", b"there before")
    server = _mount(s3_bucket, tmp_path / "mnt", "top", "--dir-cache-time", "0")
    m = server.mnt
    try:
        assert os.listdir(m) == ["old"]
        _put(s3_bucket, "top/new", b"put behind the mount")
        _put(s3_bucket, "top/sub/deep", b"in a directory new too")
        assert sorted(os.listdir(m)) == ["new", "old", "sub"]
        assert (m / "new").read_bytes() == b"put behind the mount"
        assert (m / "sub" / "deep").read_bytes() == b"in a directory new too"
        _delete(s3_bucket, "top/old")
        with pytest.raises(FileNotFoundError):
            os.stat(m / "old")
        with pytest.raises(FileNotFoundError):
            os.open(m / "old", os.O_RDONLY)
        assert sorted(os.listdir(m)) == ["new", "sub"]
        _delete(s3_bucket, "top/new")
        _put(s3_bucket, "top/new/inner", b"now a directory")  # nobody holds the file: it changes type
        assert os.path.isdir(m / "new") and os.listdir(m / "new") == ["inner"]
        longer = random.Random(5).randbytes(50_000)
        _put(s3_bucket, "top/sub/deep", longer)
        assert os.listdir(m / "sub") == ["deep"] and os.stat(m / "sub" / "deep").st_size == len(longer)
        _delete(s3_bucket, "top/sub/deep")  # the whole directory: its prefix is gone
        assert sorted(os.listdir(m)) == ["new"]
    finally:
        assert server.stop() == 0, server.output


def test_what_the_mount_holds_survives_a_listing_without_it(s3_bucket: Bucket, tmp_path: Path,
                                                             aws_env: None) -> None:
    """A file being written and not yet published, a file open when the
    store dropped it, and the directory above a held file outlive listings
    that do not have them; once let go, the next listing decides."""
    server = _mount(s3_bucket, tmp_path / "mnt", "top", "--dir-cache-time", "0")
    m = server.mnt
    try:
        with open(m / "new", "wb") as f:
            f.write(b"unpublished")
            f.flush()  # to the mount, not published
            assert _keys(s3_bucket) == set()
            _put(s3_bucket, "top/other", b"x" * 5000)
            assert sorted(os.listdir(m)) == ["new", "other"]  # listed again: ours kept, theirs added
            assert os.stat(m / "new").st_size == len(b"unpublished")
        assert _keys(s3_bucket) == {"new", "other"}
        with open(m / "other", "rb") as f:
            assert f.read() == b"x" * 5000
            _delete(s3_bucket, "top/other")
            assert sorted(os.listdir(m)) == ["new", "other"]  # open: kept for its holder
            assert os.fstat(f.fileno()).st_size == 5000
            f.seek(0)
            assert f.read() == b"x" * 5000
        assert os.listdir(m) == ["new"]  # closed: gone at the next listing
        _put(s3_bucket, "top/d/x", b"a directory only a prefix makes")
        assert os.listdir(m / "d") == ["x"]
        with open(m / "d" / "y", "wb") as f:
            f.write(b"in d")
            _delete(s3_bucket, "top/d/x")  # the prefix is gone, but d holds a new file
            assert sorted(os.listdir(m)) == ["d", "new"] and os.listdir(m / "d") == ["y"]
        assert _keys(s3_bucket) == {"new", "d/y"} and (m / "d" / "y").read_bytes() == b"in d"
    finally:
        assert server.stop() == 0, server.output


def test_by_default_a_listing_is_trusted_for_its_time(rgw: CephRGW, server: Server,
                                                      s3_bucket: Bucket) -> None:
    """The default (300 s): within the time, no lookup or readdir lists
    again (RGW's ops log counts the listings), so what others put is not
    seen yet."""
    m = server.mnt
    assert os.listdir(m) == []
    ops = OpsLog(rgw.ops_log)
    mark = ops.mark()
    _put(s3_bucket, "top/behind", b"not seen yet")
    assert os.listdir(m) == []
    with pytest.raises(FileNotFoundError):
        os.stat(m / "behind")
    assert _listings(ops, mark, s3_bucket) == 0


def _until(done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not done():
        assert time.monotonic() < deadline, f"not within {WAIT:.0f} s"
        time.sleep(0.1)


def test_a_short_dir_cache_time_expires_names_and_absences(s3_bucket: Bucket, tmp_path: Path,
                                                           aws_env: None) -> None:
    """--dir-cache-time 1: the kernel trusts an absence, and a name, no
    longer than the listing, so both are asked again once it expires."""
    _put(s3_bucket, "top/there", b"1")
    server = _mount(s3_bucket, tmp_path / "mnt", "top", "--dir-cache-time", "1")
    m = server.mnt
    try:
        assert os.listdir(m) == ["there"] and not (m / "later").exists()  # an absence the kernel keeps
        _put(s3_bucket, "top/later", b"put behind the mount")
        _delete(s3_bucket, "top/there")
        _until(lambda: (m / "later").exists())
        _until(lambda: not (m / "there").exists())
        assert (m / "later").read_bytes() == b"put behind the mount"
    finally:
        assert server.stop() == 0, server.output
