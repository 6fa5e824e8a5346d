"""The current thread as the kernel sees it (``curproc``).

Pager functions return VM_PAGER_* codes as the seed's do; the errno behind
a VM_PAGER_ERROR is left in ``curproc().p_errno`` so that the front ends can
raise an OSError with the backend's own errno.
"""

from __future__ import annotations

import threading


class Proc(threading.local):
    p_errno: int = 0


_curproc = Proc()


def curproc() -> Proc:
    return _curproc
