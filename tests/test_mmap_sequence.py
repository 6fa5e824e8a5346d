"""vnpager.mmap as a sequence, side by side with CPython's mmap of the same
file: bytes(m), bytearray(m), numpy.asarray(m), ``in``, find/rfind and
readline (whose windows start small and grow: the searches must find what
lies across every window boundary)."""

from __future__ import annotations

import mmap as std
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vnpager
from vnpager import VM
from vnpager.mmap import _FIRST_WINDOW, CHUNK

PS = 4096

def _pair(path: Path, vm: VM) -> tuple[Any, Any, int]:
    fd = os.open(path, os.O_RDWR)
    return vnpager.mmap(fd, 0, vm=vm), std.mmap(fd, 0), fd


@pytest.fixture
def maps(vm: VM, tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """Our map and CPython's of one 6-page file: text lines, a few bytes that
    occur nowhere else, and no newline at the end."""
    data = bytearray(b"".join(b"line %d, " % i + b"x" * (i % 97) + b"\n" for i in range(400)))[:6 * PS]
    data[-1:] = b"!"
    for at in (PS - 1, 5 * PS):
        data[at:at + 2] = b"\xf0\xe3"
    path = tmp_path / "data"
    path.write_bytes(bytes(data))
    ours, theirs, fd = _pair(path, vm)
    yield ours, theirs
    ours.close()
    theirs.close()
    os.close(fd)


def test_bytes_copies_the_map(maps: tuple[Any, Any]) -> None:
    ours, theirs = maps
    copy = bytes(ours)
    assert type(copy) is bytes and copy == bytes(theirs)
    ours[0] = ord("L")  # a copy, not a view
    assert copy[0] == ord("l") and bytes(ours)[0] == ord("L")


def test_bytearray_says_what_to_use(maps: tuple[Any, Any]) -> None:
    ours, theirs = maps
    with pytest.raises(TypeError, match=r"bytearray\(m\[:\]\)"):
        bytearray(ours)
    assert bytearray(ours[:]) == bytearray(theirs)
    # iteration still gives what CPython's does: bytes of length 1
    assert list(ours)[:3] == list(theirs)[:3] == [b"l", b"i", b"n"]
    assert all(isinstance(b, bytes) and len(b) == 1 for b in list(reversed(ours))[:3])


def test_numpy_asarray_is_a_uint8_copy(maps: tuple[Any, Any]) -> None:
    ours, theirs = maps
    array = np.asarray(ours)
    assert array.dtype == np.uint8 and array.shape == (len(theirs),)
    assert np.array_equal(array, np.asarray(theirs))
    array[0] = 0  # writable, and a copy
    assert ours[0] == ord("l")
    assert np.asarray(ours, dtype=np.int16).dtype == np.int16
    with pytest.raises(ValueError, match="without a copy"):
        np.asarray(ours, copy=False)


class _Anything:
    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = None  # type: ignore[assignment]


class _Never:
    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = None  # type: ignore[assignment]


NEEDLES = [b"l", b"!", b"\n", b"\xf0", b"\xe3", b"\x00", b"\xff", b"li", b"", bytearray(b"x"),
           bytearray(b"xy"), memoryview(b"e"), memoryview(b"\x01"), "l", ord("l"), 0, None, 1.5,
           _Anything(), _Never()]


@pytest.mark.parametrize("needle", NEEDLES, ids=repr)
def test_in_gives_the_stdlib_answer(maps: tuple[Any, Any], needle: object) -> None:
    ours, theirs = maps
    assert (needle in ours) is (needle in theirs)


def test_in_does_not_iterate(maps: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    ours, _ = maps

    def no_iteration(self: Any) -> Iterator[bytes]:
        raise AssertionError("in iterated the map")

    monkeypatch.setattr(vnpager.mmap, "__iter__", no_iteration)
    assert b"!" in ours and b"\x00" not in ours and 33 not in ours


def test_in_on_a_closed_map(maps: tuple[Any, Any]) -> None:
    ours, theirs = maps
    for m in (ours, theirs):
        m.close()
        with pytest.raises(ValueError, match="closed or invalid"):
            b"l" in m  # noqa: B015


def test_find_across_every_window_boundary(vm: VM) -> None:
    """A needle at every offset of the first windows (so across each of
    their boundaries, forward and backward), against bytes.find."""
    size = 6 * PS
    model = bytearray(b"a" * size)
    with vnpager.mmap(-1, size, vm=vm) as m:
        m[:] = model
        for n in (1, 2, 7):
            needle = b"b" * (n - 1) + b"c"
            for p in range(0, 22 * _FIRST_WINDOW - n):
                m[p:p + n] = model[p:p + n] = needle
                for start, end in ((0, size), (3, 21 * _FIRST_WINDOW + 1)):
                    assert m.find(needle, start, end) == model.find(needle, start, end), (n, p, start)
                    assert m.rfind(needle, start, end) == model.rfind(needle, start, end), (n, p, end)
                m[p:p + n] = model[p:p + n] = b"a" * n


def test_readline_loop_as_the_stdlib(maps: tuple[Any, Any]) -> None:
    ours, theirs = maps
    ours.seek(7)
    theirs.seek(7)
    while True:
        line = ours.readline()
        assert line == theirs.readline() and ours.tell() == theirs.tell()
        if not line:
            break
    assert ours.tell() == len(ours)


def test_readline_of_a_line_longer_than_many_windows(vm: VM, tmp_path: Path) -> None:
    path = tmp_path / "long"
    path.write_bytes(b"a" * (CHUNK + 3 * PS + 5) + b"\nshort\n" + b"tail")
    ours, theirs, fd = _pair(path, vm)
    try:
        for _ in range(4):
            assert ours.readline() == theirs.readline() and ours.tell() == theirs.tell()
    finally:
        ours.close()
        theirs.close()
        os.close(fd)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=3 * PS).map(lambda b: b.replace(b"\x00", b"\n")),
       needle=st.binary(min_size=0, max_size=600),
       start=st.integers(-4 * PS, 4 * PS), end=st.integers(-4 * PS, 4 * PS))
def test_find_and_rfind_as_the_stdlib(tmp_path_factory: pytest.TempPathFactory, data: bytes,
                                      needle: bytes, start: int, end: int) -> None:
    # a needle cut out of the data itself, so that it is found as often as not
    if needle and len(needle) < len(data):
        needle = data[len(needle) // 2:len(needle) // 2 + len(needle)]
    path = tmp_path_factory.mktemp("find") / "data"
    path.write_bytes(data)
    with VM(physmem=64 * PS) as vm:
        ours, theirs, fd = _pair(path, vm)
        try:
            for args in ((needle,), (needle, start), (needle, start, end)):
                assert ours.find(*args) == theirs.find(*args), args
                assert ours.rfind(*args) == theirs.rfind(*args), args
            assert ours.readline() == theirs.readline()
        finally:
            ours.close()
            theirs.close()
            os.close(fd)
