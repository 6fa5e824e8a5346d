"""What a trap would send, as exceptions.

Where the kernel would kill a process with SIGBUS or SIGSEGV, vnpager
raises; both are OSErrors, so callers that handle I/O errors handle these.
"""

from __future__ import annotations

import errno


class BusError(OSError):
    """SIGBUS: the page exists in the mapping but not in the file (it lies
    past the file's end), or the backing store cannot supply it."""

    def __init__(self, msg: str, err: int = errno.EFAULT) -> None:
        super().__init__(err, msg)


class SegvError(OSError):
    """SIGSEGV: no mapping at the address, or one that forbids the access."""

    def __init__(self, msg: str, err: int = errno.EFAULT) -> None:
        super().__init__(err, msg)
