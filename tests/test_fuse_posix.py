"""vnpager mount against POSIX, the way pjdfstest checks it: each case is a
small function run twice in the same test, in a directory of its own on the
mount and on a native directory of the same host filesystem, and the two
results (values and errno names, step by step) must be equal.

The cases cover unlink and rename of open files, modes and groups of new
files (umask, set-id bits, set-gid directories), deep trees past PATH_MAX,
special files (mknod, FIFOs, sockets), extended attributes, open flags,
link, symlink, chmod/chown, truncate, mkdir/rmdir, rename and permissions.
The tests run as root, which bypasses permission checks: the cases about
permissions run their steps in a forked child that has dropped to another
uid and gid (:func:`as_user`), on both sides alike.

What FUSE or pyfuse3 cannot do is in ``KNOWN``: the mount's result is
asserted to be the documented one (see the README's Limits) instead.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import select
import shutil
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fuse_helpers import Server

if os.geteuid() != 0:
    pytest.skip("the conformance cases create devices and switch uids: run as root", allow_module_level=True)

Case = Callable[[str], list[Any]]
USER, OTHER, GROUP = 61000, 61001, 62000  # uids and a gid no test file has
CHILD_WAIT = 30.0
CASES: list[Case] = []
LIBC = ctypes.CDLL(None, use_errno=True)  # fallocate and renameat2, which os lacks
AT_FDCWD = -100


def case(fn: Case) -> Case:
    CASES.append(fn)
    return fn


def t(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """One step: its result, or the name of its errno."""
    try:
        return fn(*args, **kwargs)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e))


def st(path: str | int, *, follow: bool = False) -> tuple[str, int, int, int, int] | str:
    """What the cases compare of a stat: mode, links, owner, group, size (or the errno)."""
    try:
        s = os.stat(path) if isinstance(path, int) else os.stat(path, follow_symlinks=follow)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e))
    size = s.st_size if not stat.S_ISDIR(s.st_mode) else 0  # ext4 directories grow in blocks
    return (stat.filemode(s.st_mode) + f"{stat.S_IMODE(s.st_mode):o}", s.st_nlink, s.st_uid, s.st_gid, size)


def as_user(fn: Callable[..., Any], *args: Any, uid: int = USER, gid: int = USER,
            groups: tuple[int, ...] = (), **kwargs: Any) -> Any:
    """Run *fn* in a forked child with the credentials given (root bypasses
    permission checks); its result, or the errno name of its OSError."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        code = 0
        try:
            os.close(r)
            os.setgroups(list(groups))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            out = pickle.dumps(t(fn, *args, **kwargs))
            os.write(w, out)
        except BaseException:
            code = 1
        os._exit(code)
    os.close(w)
    data = b""
    try:
        deadline = time.monotonic() + CHILD_WAIT
        while chunk := _read_until(r, deadline):
            data += chunk
    finally:
        os.close(r)
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    assert status == 0 and data, f"the child running {fn.__name__} failed (status {status:#x})"
    return pickle.loads(data)


def _read_until(fd: int, deadline: float) -> bytes:
    """What *fd* has to read, or b"" at its end or at *deadline*."""
    ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    return os.read(fd, 65536) if ready else b""


def write_file(path: str, data: bytes = b"", mode: int = 0o644) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# 1. open files that lost their name
@case
def unlink_open_file(d: str) -> list[Any]:
    p = os.path.join(d, "f")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"hello world")
        out = [t(os.unlink, p), st(fd), t(os.pread, fd, 100, 0), t(os.pwrite, fd, b"XY", 20),
               t(os.pread, fd, 100, 0), t(os.ftruncate, fd, 4), st(fd), t(os.pread, fd, 100, 0),
               t(os.fchmod, fd, 0o600), st(fd), t(os.fsync, fd), os.path.exists(p)]
    finally:
        os.close(fd)
    return out


@case
def rename_over_open_file(d: str) -> list[Any]:
    a, b = os.path.join(d, "a"), os.path.join(d, "b")
    write_file(a, b"new")
    write_file(b, b"old contents")
    fd = os.open(b, os.O_RDWR)
    try:
        out = [t(os.rename, a, b), st(fd), t(os.pread, fd, 100, 0), t(os.pwrite, fd, b"!", 12),
               t(os.pread, fd, 100, 0), t(os.ftruncate, fd, 2), st(fd), read_file(b)]
    finally:
        os.close(fd)
    return [*out, st(b)]


@case
def temporary_file(d: str) -> list[Any]:
    with tempfile.TemporaryFile(dir=d) as f:
        f.write(b"x" * 10000)
        f.seek(0)
        data = f.read()
        f.truncate(10)
        return [len(data), os.fstat(f.fileno()).st_size, os.listdir(d)]


# 2. modes and groups of new files
@case
def create_under_umask_0(d: str) -> list[Any]:
    old = os.umask(0)
    try:
        write_file(os.path.join(d, "f"), mode=0o666)
        os.mkdir(os.path.join(d, "dir"), 0o777)
        made = t(os.mknod, os.path.join(d, "node"), stat.S_IFREG | 0o666)
    finally:
        os.umask(old)
    os.umask(0o027)
    try:
        write_file(os.path.join(d, "g"), mode=0o777)
    finally:
        os.umask(old)
    return [made, *(st(os.path.join(d, n)) for n in ("f", "dir", "node", "g"))]


@case
def create_set_id_modes(d: str) -> list[Any]:
    out = []
    for mode in (0o4755, 0o2755, 0o6777, 0o1777):
        p = os.path.join(d, f"f{mode:o}")
        write_file(p, mode=mode)
        out.append(st(p))
    os.mkdir(os.path.join(d, "dir"), 0o1777)
    return [*out, st(os.path.join(d, "dir"))]


def _in_setgid_dir(d: str) -> list[Any]:
    write_file(os.path.join(d, "f"), mode=0o2775)
    os.mkdir(os.path.join(d, "sub"), 0o755)
    made = t(os.mkfifo, os.path.join(d, "fifo"), 0o644)
    os.symlink("f", os.path.join(d, "link"))
    return [made, *(st(os.path.join(d, n)) for n in ("f", "sub", "fifo", "link"))]


@case
def create_in_setgid_dir(d: str) -> list[Any]:
    g = os.path.join(d, "g")
    os.mkdir(g)
    os.chown(g, -1, GROUP)
    os.chmod(g, 0o2777)
    u = os.path.join(d, "u")
    os.mkdir(u)
    os.chown(u, -1, GROUP)
    os.chmod(u, 0o2777)
    return [_in_setgid_dir(g), as_user(_in_setgid_dir, u), as_user(_in_setgid_dir, d)]


# 3. deep trees: every call short, the whole path past PATH_MAX
@case
def deep_tree(d: str) -> list[Any]:
    name = "d" * 200
    fds = [os.open(d, os.O_RDONLY | os.O_DIRECTORY)]
    out: list[Any] = []
    try:
        for _ in range(30):  # 6000 bytes below d
            os.mkdir(name, 0o755, dir_fd=fds[-1])
            fds.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        bottom = fds[-1]
        fd = os.open("f", os.O_CREAT | os.O_RDWR, 0o640, dir_fd=bottom)
        os.write(fd, b"deep")
        os.close(fd)
        os.symlink("f", "s", dir_fd=bottom)
        os.link("f", "h", src_dir_fd=bottom, dst_dir_fd=bottom)
        os.rename("h", "h2", src_dir_fd=bottom, dst_dir_fd=bottom)
        os.mkfifo("p", dir_fd=bottom)
        os.chmod("f", 0o600, dir_fd=bottom)
        out += [sorted(os.listdir(bottom)), os.stat("f", dir_fd=bottom).st_size,
                os.readlink("s", dir_fd=bottom), os.stat("h2", dir_fd=bottom).st_nlink,
                stat.S_IMODE(os.stat("f", dir_fd=bottom).st_mode)]
        fd = os.open("s", os.O_RDONLY, dir_fd=bottom)
        out.append(os.read(fd, 10))
        os.close(fd)
        for n in ("f", "s", "h2", "p"):
            os.unlink(n, dir_fd=bottom)
        while len(fds) > 1:
            os.close(fds.pop())
            os.rmdir(name, dir_fd=fds[-1])
        out.append(os.listdir(d))
    finally:
        for fd in fds:
            os.close(fd)
    return out


# 4. special files, extended attributes, fallocate, O_TMPFILE
@case
def mknod_regular_and_devices(d: str) -> list[Any]:
    out = []
    for n, mode, dev in (("r", stat.S_IFREG | 0o640, 0), ("c", stat.S_IFCHR | 0o600, os.makedev(1, 3)),
                         ("b", stat.S_IFBLK | 0o600, os.makedev(7, 0))):
        p = os.path.join(d, n)
        out.append(t(os.mknod, p, mode, dev))
        out.append(st(p))
        out.append(os.lstat(p).st_rdev)
    write = t(write_file, os.path.join(d, "r"), b"data")
    return [*out, t(os.mknod, os.path.join(d, "r"), stat.S_IFREG), write, read_file(os.path.join(d, "r"))]


@case
def fifo(d: str) -> list[Any]:
    p = os.path.join(d, "fifo")
    out = [t(os.mkfifo, p, 0o620), st(p), t(os.mkfifo, p)]
    r = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
    os.write(w, b"through the pipe")
    out.append(os.read(r, 100))
    os.close(w)
    os.close(r)
    return [*out, t(os.unlink, p), os.listdir(d)]


@case
def unix_socket(d: str) -> list[Any]:
    p = os.path.join(d, "sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(p)
        srv.listen(1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(p)
            conn, _ = srv.accept()
            with conn:
                c.sendall(b"ping")
                got = conn.recv(10)
    return [got, stat.S_ISSOCK(os.lstat(p).st_mode), st(p), t(os.unlink, p)]


@case
def extended_attributes(d: str) -> list[Any]:
    p = os.path.join(d, "f")
    write_file(p)
    os.mkdir(os.path.join(d, "dir"))
    return [t(os.setxattr, p, "user.a", b"1"), t(os.getxattr, p, "user.a"),
            t(os.setxattr, p, "user.b", b"x" * 3000), sorted(os.listxattr(p)),
            t(os.setxattr, p, "user.a", b"2", os.XATTR_CREATE),
            t(os.setxattr, p, "user.c", b"2", os.XATTR_REPLACE),
            t(os.setxattr, p, "user.a", b"22", os.XATTR_REPLACE), t(os.getxattr, p, "user.a"),
            t(os.removexattr, p, "user.a"), t(os.getxattr, p, "user.a"), t(os.removexattr, p, "user.a"),
            sorted(os.listxattr(p)), t(os.setxattr, os.path.join(d, "dir"), "user.d", b"dir"),
            t(os.getxattr, os.path.join(d, "dir"), "user.d"), t(os.setxattr, p, "bogus.a", b"1"),
            as_user(os.setxattr, p, "user.e", b"1")]


@case
def xattrs_absent_then_set(d: str) -> list[Any]:
    """The mount remembers which names a file lacks: each set or remove
    through it must show at once, on every name of the file."""
    p, q = os.path.join(d, "f"), os.path.join(d, "g")
    write_file(p, b"data")  # a write: the kernel asks for security.capability
    out = [t(os.getxattr, p, "user.a"), t(os.getxattr, p, "security.x"), sorted(os.listxattr(p))]
    os.link(p, q)
    out += [t(os.setxattr, q, "user.a", b"1"), t(os.getxattr, p, "user.a"),
            t(os.setxattr, p, "trusted.b", b"2"), t(os.getxattr, q, "trusted.b"),
            t(os.removexattr, q, "user.a"), t(os.getxattr, p, "user.a"), sorted(os.listxattr(p)),
            t(os.getxattr, p, "system.posix_acl_access")]
    write_file(p, b"more")
    return [*out, t(os.getxattr, q, "trusted.b")]


@case
def names_appear_after_absence(d: str) -> list[Any]:
    """The kernel remembers that a name is absent: every way of making a
    name through the mount must make it appear at once."""
    def p(n: str) -> str:
        return os.path.join(d, n)

    names = ["f", "dir", "sym", "hard", "fifo", "moved", "x"]
    out: list[Any] = [st(p(n)) for n in names]
    write_file(p("f"))
    os.mkdir(p("dir"))
    os.symlink("f", p("sym"))
    os.link(p("f"), p("hard"))
    os.mkfifo(p("fifo"))
    write_file(p("tmp"), b"moved")
    os.rename(p("tmp"), p("moved"))
    out += [st(p(n)) for n in names] + [read_file(p("moved")), st(p("tmp"))]
    os.unlink(p("f"))
    os.rename(p("dir"), p("x"))
    return [*out, st(p("f")), st(p("dir")), st(p("x")), st(p("hard"))]


@case
def posix_fallocate(d: str) -> list[Any]:
    p = os.path.join(d, "f")
    write_file(p, b"keep")
    fd = os.open(p, os.O_RDWR)
    try:
        out = [t(os.posix_fallocate, fd, 0, 100_000), st(fd), t(os.posix_fallocate, fd, 10, 10), st(fd)]
    finally:
        os.close(fd)
    return [*out, read_file(p)[:6]]


@case
def o_tmpfile(d: str) -> list[Any]:
    try:
        fd = os.open(d, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError as e:
        return [errno.errorcode[e.errno or 0]]
    try:
        os.write(fd, b"tmp")
        return [os.pread(fd, 10, 0), os.fstat(fd).st_nlink, os.listdir(d)]
    finally:
        os.close(fd)


# 5. the rest of what a POSIX suite checks
@case
def open_flags(d: str) -> list[Any]:
    f, dd, link = os.path.join(d, "f"), os.path.join(d, "dir"), os.path.join(d, "link")
    write_file(f, b"abcdef")
    os.mkdir(dd)
    os.symlink("f", link)

    def opened(path: str, flags: int, mode: int = 0o644) -> Any:
        fd = os.open(path, flags, mode)
        os.close(fd)
        return "ok"

    out = [t(opened, f, os.O_CREAT | os.O_EXCL | os.O_WRONLY), t(opened, f, os.O_RDONLY | os.O_DIRECTORY),
           t(opened, link, os.O_RDONLY | os.O_NOFOLLOW), t(opened, os.path.join(d, "none"), os.O_RDONLY),
           t(opened, dd, os.O_WRONLY), t(opened, dd, os.O_CREAT | os.O_RDWR), t(opened, dd, os.O_RDONLY),
           t(opened, os.path.join(d, "x" * 256), os.O_CREAT | os.O_WRONLY),
           t(opened, os.path.join(d, "x" * 255), os.O_CREAT | os.O_WRONLY),
           t(opened, os.path.join(f, "below"), os.O_CREAT | os.O_WRONLY),
           t(opened, os.path.join(d, "dangling"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600),
           st(os.path.join(d, "dangling"))]
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"gh")
    os.close(fd)
    out.append(read_file(f))
    fd = os.open(f, os.O_RDWR | os.O_TRUNC)
    out += [st(fd), t(os.write, fd, b"12"), t(os.read, fd, 1)]
    os.close(fd)
    fd = os.open(f, os.O_RDONLY)
    out += [t(os.write, fd, b"no"), t(os.ftruncate, fd, 0)]
    os.close(fd)
    fd = os.open(f, os.O_WRONLY)
    out += [t(os.read, fd, 1)]
    os.close(fd)
    os.symlink("nowhere", os.path.join(d, "dangle"))
    out.append(t(opened, os.path.join(d, "dangle"), os.O_CREAT | os.O_WRONLY))
    return [*out, sorted(os.listdir(d))]


@case
def links(d: str) -> list[Any]:
    f, g, dd = os.path.join(d, "f"), os.path.join(d, "g"), os.path.join(d, "dir")
    write_file(f, b"linked")
    os.mkdir(dd)
    os.symlink("f", os.path.join(d, "sym"))
    out = [t(os.link, f, g), st(f), st(g), t(os.link, f, g), t(os.link, dd, os.path.join(d, "dlink")),
           t(os.link, os.path.join(d, "none"), os.path.join(d, "n2")),
           t(os.link, os.path.join(d, "sym"), os.path.join(d, "symlink2"), follow_symlinks=False),
           st(os.path.join(d, "symlink2")), st(os.path.join(d, "sym"))]
    write_file(g, b"through g")
    out += [read_file(f), t(os.unlink, f), st(g), t(os.rename, g, os.path.join(dd, "moved")),
            st(os.path.join(dd, "moved")), t(os.link, os.path.join(dd, "moved"), f), st(f)]
    return out


@case
def symlinks(d: str) -> list[Any]:
    s = os.path.join(d, "s")
    long_target = "/".join(["t" * 200] * 20)  # 4019 bytes
    return [t(os.symlink, "target", s), t(os.readlink, s), st(s), st(s, follow=True),
            t(os.symlink, "other", s), t(os.symlink, long_target, os.path.join(d, "long")),
            t(os.readlink, os.path.join(d, "long")) == long_target,
            t(os.symlink, "loop", os.path.join(d, "loop")), st(os.path.join(d, "loop"), follow=True),
            t(os.chown, s, 1, 2, follow_symlinks=False), st(s),
            t(os.utime, s, ns=(10**9, 2 * 10**9), follow_symlinks=False),
            os.lstat(s).st_mtime_ns, t(os.readlink, d), t(os.unlink, s), st(s)]


@case
def chmod_chown_and_set_id(d: str) -> list[Any]:
    f, dd = os.path.join(d, "f"), os.path.join(d, "dir")
    write_file(f, b"#!")
    os.mkdir(dd)
    out = [t(os.chmod, f, 0o7777), st(f), t(os.chown, f, USER, GROUP), st(f), t(os.chmod, f, 0o6755),
           t(os.chown, f, -1, -1), st(f), t(os.chmod, dd, 0o7777), t(os.chown, dd, USER, GROUP), st(dd),
           t(os.chmod, f, 0o2755), t(os.chown, f, USER, USER), st(f)]
    os.chmod(dd, 0o777)
    # as the owner: may chmod and give the file to a group of its own, nothing else
    out += [as_user(os.chmod, f, 0o4755), st(f), as_user(os.chown, f, -1, GROUP, groups=(GROUP,)), st(f),
            as_user(os.chmod, f, 0o2755), st(f), as_user(os.chown, f, -1, 0), as_user(os.chown, f, OTHER, -1),
            as_user(os.chmod, f, 0o644, uid=OTHER, gid=OTHER), st(f)]
    os.chown(f, USER, GROUP)
    os.chmod(f, 0o6777)
    out += [as_user(write_file, f, b"x", uid=OTHER, gid=OTHER), st(f)]  # a write by another kills set-id
    return out


@case
def truncation(d: str) -> list[Any]:
    f = os.path.join(d, "f")
    write_file(f, b"0123456789", mode=0o644)
    os.mkdir(os.path.join(d, "dir"))
    out = [t(os.truncate, f, 100_000), st(f), read_file(f)[:12], t(os.truncate, f, 3), read_file(f),
           t(os.truncate, f, -1), t(os.truncate, os.path.join(d, "dir"), 0),
           t(os.truncate, os.path.join(d, "no"), 0),
           as_user(os.truncate, f, 0), st(f)]
    os.chmod(f, 0o666)
    return [*out, as_user(os.truncate, f, 1), st(f), read_file(f)]


@case
def directories(d: str) -> list[Any]:
    a = os.path.join(d, "a")
    out = [t(os.mkdir, a, 0o755), t(os.mkdir, a), st(d), t(os.mkdir, os.path.join(a, "b")), st(a),
           t(os.rmdir, a), t(os.rmdir, os.path.join(a, "b")), st(a), t(os.mkdir, os.path.join(d, "n" * 256)),
           t(os.mkdir, os.path.join(d, "no", "x")), t(os.rmdir, os.path.join(a, ".")),
           t(os.rmdir, os.path.join(d, "none"))]
    write_file(os.path.join(d, "f"))
    out += [t(os.rmdir, os.path.join(d, "f")), t(os.unlink, a), t(os.mkdir, os.path.join(d, "f")),
            t(os.mkdir, os.path.join(d, "s"), 0o3777), st(os.path.join(d, "s")), t(os.rmdir, a), st(a),
            sorted(os.listdir(d))]
    for i in range(300):  # a directory of many entries, read in several replies
        write_file(os.path.join(d, f"entry{i:04}"))
    return [*out, len(os.listdir(d)), sorted(os.listdir(d))[-1]]


@case
def rewinddir_lists_anew(d: str) -> list[Any]:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        before = os.listdir(fd)
        write_file(os.path.join(d, "new"))
        os.mkdir(os.path.join(d, "sub"))
        during = sorted(os.listdir(fd))  # listdir(fd) rewinds the descriptor first
        os.rmdir(os.path.join(d, "sub"))
        return [before, during, os.listdir(fd)]
    finally:
        os.close(fd)


@case
def renames(d: str) -> list[Any]:
    def p(*n: str) -> str:
        return os.path.join(d, *n)

    write_file(p("f"), b"f")
    write_file(p("g"), b"g")
    for n in ("d1", "d2", "d3", "d3/x"):
        os.mkdir(p(n))
    out = [t(os.rename, p("f"), p("d1")), t(os.rename, p("d1"), p("f")), t(os.rename, p("d1"), p("d3")),
           t(os.rename, p("d1"), p("d1", "in")), t(os.rename, p("d1"), p("d2")), st(p("d2")), st(p("d1")),
           t(os.rename, p("f"), p("f")), t(os.rename, p("none"), p("x")), t(os.rename, p("f"), p("g")),
           read_file(p("g")), t(os.rename, p("g"), p("d3", "x", "g")), read_file(p("d3", "x", "g")),
           t(os.rename, p("d3"), p("d2", "d3")), st(p("d2", "d3", "x", "g")),
           t(os.rename, p("d2", "d3", "x", "g"), p("n" * 256)), sorted(os.listdir(d))]
    # a directory renamed while a file below it is open: the file goes on
    fd = os.open(p("d2", "d3", "x", "g"), os.O_RDWR)
    try:
        out += [t(os.rename, p("d2"), p("moved")), t(os.pwrite, fd, b"G", 0), st(fd),
                read_file(p("moved", "d3", "x", "g"))]
    finally:
        os.close(fd)
    return out


@case
def permissions(d: str) -> list[Any]:
    f, dd = os.path.join(d, "f"), os.path.join(d, "dir")
    write_file(f, b"secret", mode=0o600)
    os.mkdir(dd, 0o755)
    write_file(os.path.join(dd, "in"), mode=0o644)
    sticky = os.path.join(d, "sticky")
    os.mkdir(sticky)
    os.chmod(sticky, 0o1777)
    write_file(os.path.join(sticky, "roots"), mode=0o666)
    inside, mine = os.path.join(dd, "in"), os.path.join(sticky, "mine")
    out = [as_user(read_file, f), as_user(write_file, os.path.join(dd, "new")), as_user(os.unlink, inside),
           as_user(os.rename, inside, os.path.join(d, "out")), as_user(write_file, mine),
           as_user(os.unlink, os.path.join(sticky, "roots")), as_user(os.unlink, mine, uid=OTHER),
           as_user(os.unlink, mine), as_user(os.mkdir, os.path.join(d, "m"))]
    os.chmod(dd, 0o700)
    out += [as_user(st, os.path.join(dd, "in")), as_user(os.listdir, dd)]
    os.chmod(dd, 0o711)
    out += [as_user(st, os.path.join(dd, "in")), as_user(os.listdir, dd)]
    os.chmod(f, 0o604)
    out += [as_user(read_file, f), as_user(read_file, f, gid=GROUP)]
    os.chown(f, -1, GROUP)
    os.chmod(f, 0o640)
    out += [as_user(read_file, f), as_user(read_file, f, groups=(GROUP,)), as_user(os.access, f, os.R_OK),
            as_user(os.utime, f), as_user(os.utime, f, ns=(1, 1))]
    return out


TICK = 0.05  # longer than the kernel's coarse clock step, so that a change of time shows


def _changed(path: str, step: Callable[[], Any], *, follow: bool = False) -> tuple[Any, bool, bool]:
    """What *step* returns, and whether it changed *path*'s ctime and mtime."""
    before = os.stat(path, follow_symlinks=follow)
    time.sleep(TICK)
    result = t(step)
    after = os.stat(path, follow_symlinks=follow)
    return result, after.st_ctime_ns > before.st_ctime_ns, after.st_mtime_ns > before.st_mtime_ns


@case
def times(d: str) -> list[Any]:
    """Which calls change which times (pjdfstest checks each), and utime's own."""
    def p(*n: str) -> str:
        return os.path.join(d, *n)

    f, g, sub, sym = p("f"), p("g"), p("sub"), p("sym")
    write_file(f, b"t")
    os.mkdir(sub)
    os.utime(f, ns=(1_000_000_001, 2_000_000_002))
    s = os.stat(f)
    out: list[Any] = [s.st_atime_ns, s.st_mtime_ns]
    out += [_changed(f, lambda: write_file(f, b"later")), _changed(f, lambda: os.chmod(f, 0o600)),
            _changed(f, lambda: os.chown(f, USER, -1)), _changed(f, lambda: os.truncate(f, 100)),
            _changed(f, lambda: os.truncate(f, 100)), _changed(f, lambda: os.link(f, g)),
            _changed(f, lambda: os.rename(g, p("sub", "g"))),
            _changed(f, lambda: os.setxattr(f, "user.t", b"1")),
            _changed(d, lambda: write_file(p("new"))), _changed(d, lambda: os.unlink(p("new"))),
            _changed(d, lambda: os.rename(f, p("f2"))), _changed(sub, lambda: os.unlink(p("sub", "g"))),
            _changed(d, lambda: os.mkdir(p("sub2"))), _changed(d, lambda: os.rmdir(p("sub2"))),
            _changed(d, lambda: os.symlink("x", sym)),
            _changed(sym, lambda: os.utime(sym, ns=(5, 6), follow_symlinks=False)),
            os.lstat(sym).st_mtime_ns, _changed(d, lambda: os.mkfifo(p("fifo"))),
            _changed(p("f2"), lambda: os.utime(p("f2")))]  # UTIME_NOW
    fd = os.open(os.path.join(d, "f2"), os.O_RDWR)
    try:
        out += [_changed(os.path.join(d, "f2"), lambda: os.pwrite(fd, b"x", 0)),
                _changed(os.path.join(d, "f2"), lambda: os.pread(fd, 1, 0)),
                _changed(os.path.join(d, "f2"), lambda: os.ftruncate(fd, 1))]
    finally:
        os.close(fd)
    return out


def _fallocate(path: str, mode: int, offset: int, length: int) -> Any:
    fd = os.open(path, os.O_RDWR)
    try:
        if LIBC.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)):
            raise OSError(ctypes.get_errno(), "fallocate")
        return st(fd)
    finally:
        os.close(fd)


@case
def fallocate(d: str) -> list[Any]:
    p = os.path.join(d, "f")
    write_file(p, b"keep")
    keep_size = 1  # FALLOC_FL_KEEP_SIZE
    return [t(_fallocate, p, 0, 0, 100_000), t(_fallocate, p, keep_size, 0, 200_000), read_file(p)[:6]]


def _renameat2(a: str, b: str, flags: int) -> None:
    if LIBC.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), flags):
        raise OSError(ctypes.get_errno(), "renameat2")


@case
def rename_exchange_and_noreplace(d: str) -> list[Any]:
    noreplace, exchange = 1, 2  # RENAME_NOREPLACE, RENAME_EXCHANGE
    a, b, c, sub = (os.path.join(d, n) for n in ("a", "b", "c", "sub"))
    write_file(a, b"a")
    write_file(b, b"bb")
    os.mkdir(sub)
    fd = os.open(a, os.O_RDONLY)
    try:
        out = [t(_renameat2, a, b, noreplace), t(_renameat2, a, c, noreplace), t(_renameat2, c, b, exchange),
               read_file(b), read_file(c), t(_renameat2, b, sub, exchange), st(b), st(sub),
               os.pread(fd, 10, 0),
               t(_renameat2, b, os.path.join(d, "none"), exchange), t(_renameat2, a, b, 3)]
    finally:
        os.close(fd)
    return [*out, sorted(os.listdir(d))]


# the differences that FUSE, libfuse 3.14 or pyfuse3 3.5 impose: see the README's Limits
KNOWN: dict[str, list[Any]] = {
    "o_tmpfile": [errno.errorcode[errno.EOPNOTSUPP]],  # libfuse 3.14 has no tmpfile operation
    "fallocate": [errno.errorcode[errno.EOPNOTSUPP]] * 2 + [b"keep"],  # pyfuse3 has no fallocate handler
}


@pytest.fixture(scope="module")
def roots() -> Iterator[tuple[Server, str]]:
    """A mount and a native directory side by side on the host's filesystem,
    in a directory every uid may search (pytest's tmp_path is root's only)."""
    base = tempfile.mkdtemp(prefix="vnpager-posix-")
    try:
        os.chmod(base, 0o755)
        src, mnt, native = (Path(base) / n for n in ("src", "mnt", "native"))
        for p in (src, mnt, native):
            p.mkdir()
        server = Server(src, mnt)
        try:
            yield server, str(native)
        finally:
            server.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(fn: Case, root: str) -> list[Any]:
    d = os.path.join(root, fn.__name__)
    os.mkdir(d)
    os.chmod(d, 0o755)
    return fn(d)


@pytest.mark.parametrize("fn", CASES, ids=[c.__name__ for c in CASES])
def test_like_native(roots: tuple[Server, str], fn: Case) -> None:
    server, native = roots
    expected = run(fn, native)
    got = run(fn, str(server.mnt))
    if fn.__name__ in KNOWN:
        assert got == KNOWN[fn.__name__]
        assert expected != got, "fixed: drop the case from KNOWN and the README's Limits"
    else:
        assert got == expected
