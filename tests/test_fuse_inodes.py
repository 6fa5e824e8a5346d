"""The FUSE inode table on its own (no mount): lookups of files it holds
open no descriptor, a name that now names another file gets that file's
inode, and the remembered xattr names follow the mount's changes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pyfuse3", reason="pyfuse3 is not installed (pip install -e '.[fuse]')")
import pyfuse3

from vnpager.fuse.inodes import InodeTable

ROOT = pyfuse3.ROOT_INODE


@pytest.fixture
def table(tmp_path: Path) -> Iterator[InodeTable]:
    """A table of the tree *tmp_path*, its descriptors closed at the end."""
    t = InodeTable(str(tmp_path))
    try:
        yield t
    finally:
        t.close()


def test_lookup_of_a_held_file_opens_no_descriptor(table: InodeTable, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "f").write_bytes(b"1")
    opens: list[object] = []
    real_open = os.open

    def counting_open(*args: Any, **kwargs: Any) -> int:
        opens.append(args[0])
        return real_open(*args, **kwargs)

    ino, st = table.lookup(ROOT, b"f")
    monkeypatch.setattr(os, "open", counting_open)
    again, st2 = table.lookup(ROOT, b"f")
    monkeypatch.undo()
    assert again == ino and st2.st_ino == st.st_ino and opens == []
    table.forget(ino, 1)  # two lookups: one forget keeps it
    assert table.key(ino) == (st.st_dev, st.st_ino)
    table.forget(ino, 1)
    with pytest.raises(pyfuse3.FUSEError):
        table.fd(ino)


def test_lookup_of_a_name_that_names_another_file(table: InodeTable, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"old")
    old, _ = table.lookup(ROOT, b"f")
    (tmp_path / "g").write_bytes(b"new")
    os.rename(tmp_path / "g", tmp_path / "f")
    new, st = table.lookup(ROOT, b"f")
    assert new != old and (st.st_dev, st.st_ino) == table.key(new)
    with open(table.proc(old), "rb") as f, open(table.proc(new), "rb") as g:
        assert (f.read(), g.read()) == (b"old", b"new")
    with pytest.raises(FileNotFoundError):
        table.lookup(ROOT, b"gone")


def test_xattr_names_are_listed_once_until_changed(table: InodeTable, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    ino, _ = table.lookup(ROOT, b"f")
    assert table.xattr_names(ino) == frozenset()
    os.setxattr(tmp_path / "f", "user.a", b"1")  # behind the table's back: not seen
    assert table.xattr_names(ino) == frozenset()
    table.xattrs_changed(ino)
    assert table.xattr_names(ino) == {b"user.a"}
