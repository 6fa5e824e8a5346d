"""vnpager mount s3://bucket/prefix: real programs (cp, tar, sqlite3) on a
mount of a bucket of the session's Ceph RADOS Gateway, whose pager has
less memory than the data; names as the store has them; close-to-open
after an outside replace; a publish that fails is fsync's and close's error.

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
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuse_helpers import PHYSMEM, Server, fill_database, sqlite
from objservers_helpers import Bucket


def _mount(bucket: Bucket, mnt: Path, prefix: str = "") -> Server:
    mnt.mkdir(exist_ok=True)
    env = bucket.user.env()
    endpoint = env.pop("AWS_ENDPOINT_URL")
    os.environ.update(env)  # the server's credentials and region, as boto finds them
    url = f"{bucket.url}/{prefix}" if prefix else bucket.url
    return Server(url, mnt, "--endpoint-url", endpoint)


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
    _vnpager("mount", f"{s3_bucket.url}/p", str(mnt), *opts, check=True)  # detached
    try:
        (mnt / "f").write_bytes(b"detached")
    finally:
        assert _vnpager("umount", str(mnt)).returncode == 0
    assert _object(s3_bucket, "p/f") == b"detached"
    for args, says in (([f"s3://no-such-{s3_bucket.name}", str(mnt), *opts], "No such file or directory"),
                       ([str(tmp_path), str(mnt), "-o", "anon=true"], "for an object store"),
                       ([s3_bucket.url, str(mnt), "-o", "anon"], "not KEY=VALUE"),
                       (["gs://bucket", str(mnt), "--foreground"], "only s3://")):
        done = _vnpager("mount", *args)
        assert done.returncode == 1 and says in done.stderr, done.stderr
        assert not os.path.ismount(mnt)


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
