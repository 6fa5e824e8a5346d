"""The child of test_crash.py: writes generations of data into a file
through vnpager.mmap, flushes each, and reports each acknowledged flush
through a pipe, until it is killed.

    python crash_child.py PATH SEED FD
"""

from __future__ import annotations

import os
import random
import struct
import sys

SLOT = 300  # bytes per write; the writes of one generation never overlap
ACK = struct.Struct("<Q")


def generation(seed: int, g: int, size: int) -> list[tuple[int, bytes]]:
    """The writes of generation *g*: (offset, data), on distinct slots."""
    rng = random.Random(seed * 1_000_003 + g)
    slots = rng.sample(range(size // SLOT), rng.randint(1, 40))
    return [(s * SLOT, rng.randbytes(SLOT)) for s in slots]


def main(path: str, seed: int, fd: int) -> None:
    import vnpager

    # a small VM: the page daemon writes pages back between the flushes too
    vm = vnpager.VM(physmem=16 * vnpager.PAGESIZE)
    with open(path, "r+b") as f:
        m = vnpager.mmap(f.fileno(), 0, vm=vm)
    size = len(m)
    g = 0
    while True:
        g += 1
        for off, data in generation(seed, g, size):
            m[off:off + SLOT] = data
        m.flush()  # msync(MS_SYNC): returned, so generation g is on disk
        os.write(fd, ACK.pack(g))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
