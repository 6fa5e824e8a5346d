"""The ``vnpager`` command (``python -m vnpager``).

Each module named in :data:`SUBCOMMAND_MODULES` has
``add_subcommands(subparsers)``, which adds parsers that
``set_defaults(func=run)`` with ``run(args) -> int`` (the exit status).  A
module that cannot be imported (say, FUSE is not installed) adds nothing.
Help texts come from docstrings: their reST markup is taken out for --help.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from vnpager.uvm.uvm_param import parse_size

SUBCOMMAND_MODULES = ("vnpager.tools.demo", "vnpager.tools.bench", "vnpager.tools.mount",
                      "vnpager.tools.torture", "vnpager.tools.serve")

# :func:`~vnpager.mmap`, :mod:`x`: the name (the last part of it after a ~)
_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def plain(text: str) -> str:
    """*text* without reST markup: roles become their name, literals their text."""
    text = _ROLE.sub(lambda m: m[2].rsplit(".", 1)[-1] if m[1] else m[2], text)
    return _LITERAL.sub(r"\1", text)


class _PlainFormatter(argparse.HelpFormatter):
    """Help without reST: the descriptions and help strings are docstrings."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain(text))

    def _expand_help(self, action: argparse.Action) -> str:
        return plain(super()._expand_help(action))


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help is plain text, for its subcommands too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _PlainFormatter)
        super().__init__(*args, **kwargs)


def size_arg(text: str) -> int:
    """An argparse type: a size such as 4M (see parse_size)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _version() -> str:
    try:
        return importlib.metadata.version("vnpager")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vnpager", description="The OpenBSD UVM vnode pager, in Python.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        add: Callable[[Any], None] = module.add_subcommands
        add(subparsers)
    return parser


@contextmanager
def _timed_progress(what: str, seconds: float) -> Iterator[None]:
    """A bar that fills over *seconds* (torture runs for a fixed time), on
    stderr when it is a terminal."""
    from vnpager.tools.show import progress

    done = threading.Event()
    with progress() as bar:
        task = bar.add_task(what, total=seconds)

        def tick() -> None:
            while not done.wait(0.1):
                bar.update(task, completed=min(seconds, bar.tasks[0].elapsed or 0.0))

        ticker = threading.Thread(target=tick, name="progress", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join(timeout=5)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.command == "torture" and sys.stderr.isatty():
        with _timed_progress(f"torture, seed {args.seed}", args.seconds):
            status: int = args.func(args)
    else:
        status = args.func(args)
    return status
