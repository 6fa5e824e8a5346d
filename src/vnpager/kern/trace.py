"""``VNPAGER_TRACE=1``: print each call of a seed function, nested.

:func:`traced` returns the function itself when tracing is off at import
time, so a VM that is not traced pays nothing.  Output goes to stderr, one
line per call and one per return, indented by the calling thread's depth::

    [MainThread] uvm_fault(<Vmspace>, vaddr=0x100001000, access_type=PROT_READ)
    [MainThread]   uvn_get(uvn<...>, offset=0x1000, ..., flags=0)
    [MainThread]     uvn_io(uvn<...>, pps=[pg@0x1000], npages=1, flags=PGO_SYNCIO|PGO_NOWAIT, rw=UIO_READ)
    [MainThread]     uvn_io -> VM_PAGER_OK

Flags, protections and pager return codes print by name: the names are the
constants of the traced function's own module (so this layer imports no
upper one).  :func:`tracing` turns the output off and on for a stretch of
a traced run, so that a long job can show a few operations only.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

TRACE = os.environ.get("VNPAGER_TRACE", "") not in ("", "0")
_depth = threading.local()
_muted = threading.Event()  # set: traced calls print nothing

# parameter name -> (prefix of the constants naming its values, values are flag bits)
_ARG_NAMES: dict[str, tuple[str, bool]] = {
    "flags": ("PGO_", True),
    "access_type": ("PROT_", True),
    "accessprot": ("PROT_", True),
    "prot": ("PROT_", True),
    "advice": ("MADV_", False),
    "rw": ("UIO_", False),
}
# parameters that are addresses or offsets: hexadecimal reads better
_HEX_ARGS = frozenset({"offset", "start", "stop", "vaddr", "va", "newsize"})
# functions returning a pager code (or a tuple that starts with one)
_PAGER_RESULTS = frozenset({"uvn_get", "uvn_put", "uvn_io", "uvm_pager_put"})
# functions returning offsets
_HEX_RESULTS = frozenset({"uvn_cluster"})


def _names(fn: Callable[..., Any], prefix: str) -> dict[int, str]:
    """The int constants of *fn*'s module whose names start with *prefix*."""
    return {v: k for k, v in fn.__globals__.items()
            if k.startswith(prefix) and isinstance(v, int) and not isinstance(v, bool)}


def _decode(v: int, names: dict[int, str], bits: bool) -> str:
    if v in names:
        return names[v]
    if not bits or v <= 0:
        return str(v)
    parts, rest = [], v
    for bit, name in sorted(names.items()):
        if bit > 0 and bit & (bit - 1) == 0 and rest & bit:
            parts.append(name)
            rest &= ~bit
    if rest:
        parts.append(hex(rest))
    return "|".join(parts)


def _fmt(v: object) -> str:
    name = getattr(v, "trace_name", None)
    if callable(name):
        return str(name())
    if isinstance(v, int) and not isinstance(v, bool) and v > 0xFFFF:
        return hex(v)
    if isinstance(v, (list, tuple)):
        if len(v) > 4:
            return f"[{len(v)} items]"
        inner = ", ".join(_fmt(x) for x in v)
        return f"[{inner}]" if isinstance(v, list) else f"({inner})"
    if type(v).__repr__ is object.__repr__:  # "<... object at 0x...>" says nothing
        return f"<{type(v).__name__}>"
    return repr(v)


class _Formatter:
    """How to print the arguments and result of one traced function.

    The name tables are built on first use: the module's constants may be
    defined after the function is decorated.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.params = list(inspect.signature(fn).parameters)
        self._tables: dict[str, dict[int, str]] | None = None

    def _table(self, prefix: str) -> dict[int, str]:
        if self._tables is None:
            prefixes = {p for p, _ in _ARG_NAMES.values()} | {"VM_PAGER_"}
            self._tables = {p: _names(self.fn, p) for p in prefixes}
        return self._tables[prefix]

    def arg(self, name: str, v: object) -> str:
        if isinstance(v, int) and not isinstance(v, bool):
            if name in _ARG_NAMES:
                prefix, bits = _ARG_NAMES[name]
                return _decode(v, self._table(prefix), bits)
            if name in _HEX_ARGS:
                return hex(v)
        return _fmt(v)

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        # the first argument is the subject (object, vnode, space): unnamed
        named = list(zip(self.params, args, strict=False)) + list(kwargs.items())
        shown = [_fmt(named[0][1])] if named else []
        shown += [f"{k}={self.arg(k, v)}" for k, v in named[1:]]
        return f"{self.fn.__name__}({', '.join(shown)})"

    def result(self, v: object) -> str:
        if self.fn.__name__ in _PAGER_RESULTS:
            codes = self._table("VM_PAGER_")
            if isinstance(v, int) and v in codes:
                return codes[v]
            if isinstance(v, tuple) and v and v[0] in codes:
                return f"({', '.join([codes[v[0]], *map(_fmt, v[1:])])})"
        if self.fn.__name__ in _HEX_RESULTS and isinstance(v, tuple):
            return f"({', '.join(hex(x) for x in v)})"
        return _fmt(v)


@contextmanager
def tracing(on: bool) -> Iterator[None]:
    """Print the trace inside the block, or not (for every thread)."""
    was = not _muted.is_set()
    _show(on)
    try:
        yield
    finally:
        _show(was)


def _show(on: bool) -> None:
    if on:
        _muted.clear()
    else:
        _muted.set()


def _emit(depth: int, text: str) -> None:
    if not _muted.is_set():
        tname = threading.current_thread().name
        print(f"[{tname}] {'  ' * depth}{text}", file=sys.stderr, flush=True)


def traced(fn: F) -> F:
    if not TRACE:
        return fn
    fmt = _Formatter(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        d = getattr(_depth, "n", 0)
        _emit(d, fmt.call(args, kwargs))
        _depth.n = d + 1
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:
            _emit(d, f"{fn.__name__} raised {e!r}")
            raise
        finally:
            _depth.n = d
        _emit(d, f"{fn.__name__} -> {fmt.result(result)}")
        return result

    return wrapper  # type: ignore[return-value]
