"""The one way this package owns a file descriptor."""

from __future__ import annotations

import os
from typing import Self


class FdObject:
    """Owns ``fd``: :meth:`close` closes it once (then ``fd`` is -1), and
    so does the end of a with-block.  Not thread-safe against a concurrent
    close, like a file object."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
