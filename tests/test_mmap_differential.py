"""vnpager.mmap against the stdlib's mmap, operation by operation.

Twin files get the same random mix of operations through the two maps; a
VM of 40 pages (the files are bigger) makes pages be evicted and faulted
back all the time.  Every result, and every exception's type and message,
must be the same; after every flush the two files must be equal.
"""

from __future__ import annotations

import mmap as std
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import vnpager
from vnpager import VM

PS = 4096
FILE_SIZE = 60 * PS + 123  # more than the VM holds, and not a whole number of pages
OPS_PER_RUN = 3000
HW_TIMEOUT = 300  # seconds for a hardware run: a private server, then OPS_PER_RUN operations

Op = Callable[[Any], Any]


def _outcome(op: Op, m: Any) -> tuple[str, Any]:
    try:
        return "ok", op(m)
    except Exception as e:  # the comparison is the point: any exception must match
        return type(e).__name__, str(e)


def _random_op(rng: random.Random, size: int, private: bool) -> tuple[str, Op]:
    """One operation, described, and applicable to either map.

    MADV_DONTNEED is left out of *private* maps: Linux throws their private
    changes away, OpenBSD (and vnpager) keeps them.
    """

    def pos() -> int:  # mostly inside, sometimes just outside or negative
        return rng.choice([rng.randrange(size), rng.randrange(-size, 2 * size), size, 0, -1])

    def span() -> int:
        return rng.choice([1, 7, PS - 1, PS, PS + 1, 3 * PS, rng.randrange(8 * PS)])

    def data(n: int) -> bytes:
        return rng.randbytes(n) if rng.random() < 0.5 else bytes([rng.randrange(256)]) * n

    kind = rng.choice(["read", "seek", "read_byte", "readline", "getitem", "getslice", "find",
                       "rfind", "tell", "madvise", "write", "write_byte", "setitem", "setslice",
                       "move", "flush"])
    if kind == "read":
        n = rng.choice([None, -1, span()])
        return f"read({n})", lambda m: m.read(n)
    if kind == "seek":
        p, whence = pos(), rng.choice([0, 1, 2])
        return f"seek({p}, {whence})", lambda m: m.seek(p, whence)
    if kind == "read_byte":
        return kind, lambda m: m.read_byte()
    if kind == "readline":
        return kind, lambda m: m.readline()
    if kind == "tell":
        return kind, lambda m: m.tell()
    if kind == "getitem":
        i = pos()
        return f"m[{i}]", lambda m: m[i]
    if kind == "getslice":
        a, b, step = pos(), pos(), rng.choice([None, 1, 2, -1, -3, 4099])
        return f"m[{a}:{b}:{step}]", lambda m: m[a:b:step]
    if kind in ("find", "rfind"):
        at = rng.randrange(size)
        needle = rng.choice([b"", b"\n", bytes([rng.randrange(256)]) * rng.randrange(1, 3)])
        needle = rng.choice([needle, bytes(rng.randbytes(2))])
        args = rng.choice([(), (at,), (at, at + span()), (-span(),)])
        return f"{kind}({needle!r}, *{args})", lambda m: getattr(m, kind)(needle, *args)
    if kind == "madvise":
        advice = rng.choice([vnpager.MADV_NORMAL, vnpager.MADV_RANDOM, vnpager.MADV_SEQUENTIAL,
                             vnpager.MADV_WILLNEED] + [vnpager.MADV_DONTNEED] * (not private))
        start = rng.randrange(size // PS) * PS
        return f"madvise({advice}, {start})", lambda m: m.madvise(advice, start, span())
    if kind == "write":
        payload = data(span())
        return f"write({len(payload)} bytes)", lambda m: m.write(payload)
    if kind == "write_byte":
        v = rng.randrange(256)
        return f"write_byte({v})", lambda m: m.write_byte(v)
    if kind == "setitem":
        i, v = pos(), rng.randrange(256)
        return f"m[{i}] = {v}", lambda m: m.__setitem__(i, v)
    if kind == "setslice":
        a, b, step = pos(), pos(), rng.choice([None, 1, 3, -1, -2])
        n = len(range(size)[a:b:step])
        payload = data(n if rng.random() < 0.95 else n + 1)
        return (f"m[{a}:{b}:{step}] = {len(payload)} bytes",
                lambda m: m.__setitem__(slice(a, b, step), payload))
    if kind == "move":
        d, s, n = pos(), pos(), span()
        return f"move({d}, {s}, {n})", lambda m: m.move(d, s, n)
    assert kind == "flush"
    return kind, lambda m: m.flush()


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("access", [vnpager.ACCESS_DEFAULT, vnpager.ACCESS_COPY, "anonymous"])
def test_differential(tmp_path: Path, seed: int, access: int | str) -> None:
    with VM(physmem=40 * PS) as vm:
        differential(vm, tmp_path, seed, access)
        assert vm.uvmexp.pdfreed > 0, "the VM never ran short: the test exercised no eviction"
        vm.check_invariants()


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("access", [vnpager.ACCESS_DEFAULT, vnpager.ACCESS_COPY])
def test_differential_on_the_hardware_mmu(tmp_path: Path, seed: int, access: int) -> None:
    """The same, on hardware maps: in a child process, since a fault that
    nobody served would hold this one's GIL (SIGBUS ends the child, and the
    test with it)."""
    proc = subprocess.run([sys.executable, __file__, str(tmp_path), str(seed), str(access)],
                          capture_output=True, text=True, timeout=HW_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pdfreed = int(proc.stdout.split()[-1])
    assert pdfreed > 0, "the server's VM never ran short: the test exercised no eviction"


def differential(vm: Any, tmp_path: Path, seed: int, access: int | str) -> None:
    """OPS_PER_RUN random operations on twin files (or anonymous maps),
    through the stdlib's mmap and vnpager's in *vm*; every outcome equal."""
    rng = random.Random(seed)
    content = rng.randbytes(FILE_SIZE // 2) + bytes(FILE_SIZE - FILE_SIZE // 2)
    paths = [tmp_path / "std", tmp_path / "vn"]
    for p in paths:
        p.write_bytes(content)
    with open(paths[0], "r+b") as f0, open(paths[1], "r+b") as f1:
        if access == "anonymous":
            ref: Any = std.mmap(-1, FILE_SIZE)
            ours: Any = vnpager.mmap(-1, FILE_SIZE, vm=vm)
        else:
            ref = std.mmap(f0.fileno(), 0, access=access)
            ours = vnpager.mmap(f1.fileno(), 0, access=access, vm=vm)
        with ref, ours:
            for step in range(OPS_PER_RUN):
                what, op = _random_op(rng, FILE_SIZE, private=access == vnpager.ACCESS_COPY)
                expected, got = _outcome(op, ref), _outcome(op, ours)
                assert got == expected, f"op {step}: {what}"
                if what == "flush" and access != "anonymous":
                    assert paths[1].read_bytes() == paths[0].read_bytes(), f"op {step}: files differ"
            assert ours[:] == ref[:]
        assert paths[1].read_bytes() == paths[0].read_bytes()


if __name__ == "__main__":  # the hardware run's child: DIR SEED ACCESS; prints the server's pdfreed
    with VM(physmem=40 * PS, mmu="hardware") as hw:
        differential(hw, Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
        print("pdfreed", hw.stats()["pdfreed"])
