"""Sizes and protections (uvm_param.h, sys/mman.h).

PAGE_SIZE is a property of each VM (``vm.page_size``); the helpers here take
it as an argument so that several machines with different page sizes can
live in one process.
"""

from __future__ import annotations

PAGE_SIZE = 4096  # the default
MAXBSIZE = 64 * 1024  # the largest transfer the pager clusters into

PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4

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
