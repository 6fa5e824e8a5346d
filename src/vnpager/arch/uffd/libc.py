"""The C library, for the calls the os module lacks (userfaultfd,
process_madvise, fallocate with its mode): called through ctypes, a
failure raised as OSError with the errno, as the os module does."""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
libc.fallocate.restype = ctypes.c_int


def checked(ret: int, what: str) -> int:
    """*ret* of a C call, or OSError(errno, "what: strerror") if it is -1."""
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def syscall(nr: int, *args: object, what: str) -> int:
    """syscall(2) *nr* with *args*.  A Python int travels as a C int: pass
    an address or a 64-bit value as a ctypes object (c_void_p, c_uint64)."""
    return checked(int(libc.syscall(nr, *args)), what)
