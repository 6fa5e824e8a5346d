"""The kernel's userfaultfd and PAGEMAP_SCAN interfaces, transcribed.

Numbers and layouts come from ``include/uapi/linux/userfaultfd.h`` and
``include/uapi/linux/fs.h`` (Linux 6.7 and later for WP_ASYNC, POISON and
PAGEMAP_SCAN); the distribution's headers may be older than the running
kernel, so we carry them here rather than parse a header.  Each ``*_FMT``
is the ``struct`` format of the C structure of the same name (all fields
are ``__u64``/``__s64``, naturally aligned, so ``=`` with no padding).
"""

from __future__ import annotations

import struct

# asm-generic/ioctl.h: dir(2) | size(14) | type(8) | nr(8)
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, typ: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (typ << 8) | nr


def _io(typ: int, nr: int) -> int:
    return _ioc(_IOC_NONE, typ, nr, 0)


def _ior(typ: int, nr: int, fmt: str) -> int:
    return _ioc(_IOC_READ, typ, nr, struct.calcsize(fmt))


def _iowr(typ: int, nr: int, fmt: str) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, typ, nr, struct.calcsize(fmt))


# x86_64 syscall number; other machines would add theirs here.
NR_userfaultfd = 323

UFFD_USER_MODE_ONLY = 1
UFFD_API = 0xAA

# /dev/userfaultfd (Linux 6.1): a uffd without the sysctl's restriction,
# for whoever may open the device.
USERFAULTFD_IOC = 0xAA
USERFAULTFD_IOC_NEW = _io(USERFAULTFD_IOC, 0x00)

# struct uffdio_api { api, features, ioctls }
UFFDIO_API_FMT = "=QQQ"
# struct uffdio_range { start, len }
UFFDIO_RANGE_FMT = "=QQ"
# struct uffdio_register { range, mode, ioctls }
UFFDIO_REGISTER_FMT = "=QQQQ"
# struct uffdio_copy { dst, src, len, mode, copy(s64) }
UFFDIO_COPY_FMT = "=QQQQq"
# struct uffdio_writeprotect { range, mode }
UFFDIO_WRITEPROTECT_FMT = "=QQQ"
# struct uffdio_continue { range, mode, mapped(s64) }
UFFDIO_CONTINUE_FMT = "=QQQq"
# struct uffdio_poison { range, mode, updated(s64) }
UFFDIO_POISON_FMT = "=QQQq"

UFFDIO = 0xAA
UFFDIO_API = _iowr(UFFDIO, 0x3F, UFFDIO_API_FMT)
UFFDIO_REGISTER = _iowr(UFFDIO, 0x00, UFFDIO_REGISTER_FMT)
UFFDIO_UNREGISTER = _ior(UFFDIO, 0x01, UFFDIO_RANGE_FMT)
UFFDIO_WAKE = _ior(UFFDIO, 0x02, UFFDIO_RANGE_FMT)
UFFDIO_COPY = _iowr(UFFDIO, 0x03, UFFDIO_COPY_FMT)
UFFDIO_WRITEPROTECT = _iowr(UFFDIO, 0x06, UFFDIO_WRITEPROTECT_FMT)
UFFDIO_CONTINUE = _iowr(UFFDIO, 0x07, UFFDIO_CONTINUE_FMT)
UFFDIO_POISON = _iowr(UFFDIO, 0x08, UFFDIO_POISON_FMT)

UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_MINOR_HUGETLBFS = 1 << 9
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_EXACT_ADDRESS = 1 << 11
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_POISON = 1 << 14
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURE_MOVE = 1 << 16

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2

UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1
UFFDIO_CONTINUE_MODE_DONTWAKE = 1 << 0
UFFDIO_CONTINUE_MODE_WP = 1 << 1
UFFDIO_POISON_MODE_DONTWAKE = 1 << 0

# struct uffd_msg: __u8 event, reserved1; __u16 reserved2; __u32 reserved3;
# then a 24-byte union (pagefault: flags, address, ptid; fork: ufd;
# remap: from, to, len; remove/unmap: start, end).
UFFD_MSG_FMT = "=BBHIQQQ"
UFFD_MSG_SIZE = struct.calcsize(UFFD_MSG_FMT)

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2

# fs.h: PAGEMAP_SCAN on /proc/<pid>/pagemap (Linux 6.7).
# struct pm_scan_arg { size, flags, start, end, walk_end, vec, vec_len,
#   max_pages, category_inverted, category_mask, category_anyof_mask,
#   return_mask }
PM_SCAN_ARG_FMT = "=" + "Q" * 12
# struct page_region { start, end, categories }
PAGE_REGION_FMT = "=QQQ"
PAGEMAP_SCAN = _iowr(ord("f"), 16, PM_SCAN_ARG_FMT)

PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1

PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
