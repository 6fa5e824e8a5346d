"""Sizes and protections (uvm_param.h, sys/mman.h).

PAGE_SIZE is a property of each VM (``vm.page_size``); the helpers here take
it as an argument so that several machines with different page sizes can
live in one process.
"""

from __future__ import annotations

import mmap
import re

PAGE_SIZE = 4096  # the default
MAXBSIZE = 64 * 1024  # the largest transfer the pager clusters into

# the host's sys/mman.h values, which the software machine's pmap takes too
PROT_NONE = 0x0
PROT_READ = mmap.PROT_READ
PROT_WRITE = mmap.PROT_WRITE
PROT_EXEC = mmap.PROT_EXEC

# madvise(2) advice; NORMAL, RANDOM and SEQUENTIAL stay on the map entry
MADV_NORMAL = 0
MADV_RANDOM = 1
MADV_SEQUENTIAL = 2
MADV_WILLNEED = 3
MADV_DONTNEED = 4


def round_page(x: int, page_size: int) -> int:
    return (x + page_size - 1) & ~(page_size - 1)


def trunc_page(x: int, page_size: int) -> int:
    return x & ~(page_size - 1)


_SIZE = re.compile(r"(\d+)\s*(?:([KMGT])(?:i?B)?|B)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """The bytes of a size as people write it: a number with an optional
    K, M, G or T (powers of 1024; "4096", "256K", "64MiB", "1g").  The
    CLI's ``--physmem``, ``VNPAGER_PHYSMEM`` and ``VM(physmem="4M")`` all
    read sizes with it.  Raises ValueError.
    """
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a size: {text!r} (try 4M, 256K, 1G)")
    return int(m[1]) << (10 * " KMGT".index((m[2] or " ").upper()))
