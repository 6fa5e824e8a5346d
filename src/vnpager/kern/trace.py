"""``VNPAGER_TRACE=1``: print each call of a seed function, nested.

:func:`traced` returns the function itself when tracing is off at import
time, so a VM that is not traced pays nothing.  Output goes to stderr, one
line per call and one per return, indented by the calling thread's depth.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

TRACE = os.environ.get("VNPAGER_TRACE", "") not in ("", "0")
_depth = threading.local()


def _fmt(v: object) -> str:
    name = getattr(v, "trace_name", None)
    if callable(name):
        return str(name())
    if isinstance(v, int) and not isinstance(v, bool) and v > 0xFFFF:
        return hex(v)
    if isinstance(v, (list, tuple)) and len(v) > 4:
        return f"[{len(v)} items]"
    return repr(v)


def traced(fn: F) -> F:
    if not TRACE:
        return fn

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        d = getattr(_depth, "n", 0)
        pad = "  " * d
        argv = ", ".join([_fmt(a) for a in args] + [f"{k}={_fmt(v)}" for k, v in kwargs.items()])
        tname = threading.current_thread().name
        print(f"[{tname}] {pad}{fn.__name__}({argv})", file=sys.stderr, flush=True)
        _depth.n = d + 1
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:
            print(f"[{tname}] {pad}{fn.__name__} raised {e!r}", file=sys.stderr, flush=True)
            raise
        finally:
            _depth.n = d
        print(f"[{tname}] {pad}{fn.__name__} -> {_fmt(result)}", file=sys.stderr, flush=True)
        return result

    return wrapper  # type: ignore[return-value]
