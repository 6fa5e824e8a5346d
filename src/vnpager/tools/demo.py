"""``vnpager demo``: the main job, and the pager's story told on the way.

A file several times larger than a small VM, mapped with vnpager.mmap, read
and written at random, flushed and checked against plain file reads, with
each step of the pager's story (attach, fault, flush, persist, terminate)
shown with what it changed in vm.stats().  ``--mmu hardware`` runs it on
the hardware MMU: the VM is a private pager server and the map real memory
(the story's counters are the server's; its trace is the server's too,
workload and all).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console

from vnpager.tools.cli import size_arg
from vnpager.tools.show import human, progress, stats_table
from vnpager.uvm.uvm import VmStats
from vnpager.vm import MMUS

if TYPE_CHECKING:
    from vnpager.uvm.uvm import VM


class _Story:
    """Prints the steps of the demo, each with what changed in the counters."""

    def __init__(self, console: Console, vm: VM) -> None:
        self.console = console
        self.vm = vm
        self.before = _counters(vm)

    def changed(self, *keys: str) -> str:
        now = _counters(self.vm)
        parts = []
        for k in keys:  # counters show their growth; resident and persisting, their level
            d = now[k] - self.before[k]
            parts.append(f"{k} {'+' if d >= 0 else ''}{d}" if k not in ("resident", "persisting")
                         else f"{k} {now[k]}")
        self.before = now
        return ", ".join(parts)

    def step(self, name: str, text: str) -> None:
        self.console.print(f"[bold cyan]{name:>9}[/]  {text}")


def _counters(vm: VM) -> dict[str, int]:
    """vm.stats() as a dict (a hardware VM's is one already: its server's)."""
    stats = vm.stats()
    return stats if isinstance(stats, dict) else dataclasses.asdict(stats)


def _workload(rng: random.Random, size: int, ops: int) -> Iterator[tuple[str, int, int]]:
    """(kind, offset, length) of a mixed job: random reads, sequential runs, random writes."""
    cursor = 0
    for _ in range(ops):
        r = rng.random()
        if r < 0.4:
            n = rng.randint(1, 64 << 10)
            yield "read", rng.randrange(size - n), n
        elif r < 0.6:
            n = min(64 << 10, size - cursor)
            yield "read", cursor, n
            cursor = (cursor + n) % size
        else:
            n = rng.randint(1, 16 << 10)
            yield "write", rng.randrange(size - n), n


def run_demo(args: argparse.Namespace) -> int:
    from vnpager.kern import trace

    if args.trace and not trace.TRACE:
        # tracing is decided when vnpager is imported: start again with it on
        env = dict(os.environ, VNPAGER_TRACE="1")
        argv = [sys.executable, "-m", "vnpager", *args.argv]
        sys.stdout.flush()
        os.execve(sys.executable, argv, env)
    from vnpager import VM

    console = Console(highlight=False)
    physmem = args.physmem
    size = args.file_size or 8 * physmem
    if size < 1 << 20:
        raise SystemExit("vnpager demo: the file must be at least 1 MiB")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="vnpager-demo-") as tmp, \
            VM(physmem=physmem, mmu=args.mmu) as vm:
        path = os.path.join(tmp, "data")
        ps = vm.page_size
        model = bytearray(rng.randbytes(size))  # what the file must hold
        with open(path, "wb") as f:
            f.write(model)
        console.print(f"[bold]vnpager demo[/]: a VM of {human(vm.physmem)} ({vm.npages} pages of "
                      f"{ps} bytes) maps a file of {human(size)} ({size // ps} pages), "
                      f"{size / vm.physmem:.0f} times its memory.\n")
        story = _Story(console, vm)
        fd = os.open(path, os.O_RDWR)
        try:
            # traced runs show the steps of the story only, not the whole job
            with trace.tracing(False):
                status = _demo_steps(console, story, fd, path, model, rng, args)
        finally:
            os.close(fd)
        console.print()
        console.print(stats_table(VmStats(**{k: v for k, v in _counters(vm).items()
                                             if k in VmStats.__dataclass_fields__})))
    return status


def _demo_steps(console: Console, story: _Story, fd: int, path: str, model: bytearray,
                rng: random.Random, args: argparse.Namespace) -> int:
    from vnpager import mmap
    from vnpager.kern.trace import tracing

    vm = story.vm
    ps = vm.page_size
    size = len(model)

    with tracing(True):
        m = mmap(fd, 0, vm=vm)
    story.step("attach", f"mmap attaches the file's VM object (uvn_attach); nothing is read yet: "
                         f"{story.changed('read_ios', 'resident')}")

    with tracing(True):
        first = m[ps:ps + 16]
    assert first == model[ps:ps + 16]
    story.step("fault", f"the first touch of page 1 faults; uvn_get reads it through uvn_io: "
                        f"{story.changed('faults', 'pageins', 'read_ios')}")
    with tracing(True):
        m[ps:ps + 16]
    story.step("", f"touching it again costs no fault: {story.changed('faults', 'read_ios')}")

    # the job: many times the VM's memory goes through it, so pages are evicted and read again
    mismatches = 0
    deadline = time.monotonic() + args.seconds if args.seconds else None
    done = 0
    with progress() as bar:
        task = bar.add_task("workload", total=args.ops)
        for kind, off, n in _workload(rng, size, args.ops):
            if kind == "read":
                mismatches += m[off:off + n] != model[off:off + n]
            else:
                data = rng.randbytes(n)
                m[off:off + n] = data
                model[off:off + n] = data
            done += 1
            bar.advance(task)
            if deadline is not None and time.monotonic() > deadline:
                break
    story.step("workload", f"{done} mixed reads and writes, every read checked "
                           f"({mismatches} wrong): "
                           f"{story.changed('faults', 'pageins', 'pageouts', 'read_ios', 'write_ios')}")

    # first a few pages, traced, to show one cluster going out; then the rest
    data = rng.randbytes(3 * ps)
    m[4 * ps:7 * ps] = data
    model[4 * ps:7 * ps] = data
    vm.quiesce()  # the page daemon's own pageouts must not blur the count
    story.changed("pageouts")
    with tracing(True):
        m.flush(4 * ps, 3 * ps)
    story.step("flush", f"flushing 3 pages just written: uvn_flush gathers them into one cluster, "
                        f"uvn_put writes it: {story.changed('pageouts', 'write_ios')}")
    m.flush()
    story.step("", f"flushing the whole mapping writes the other dirty pages back in clusters: "
                   f"{story.changed('pageouts', 'write_ios')}")

    bad = _first_difference(path, model)
    story.step("check", f"plain file reads see all {human(size)} as written" if bad is None
               else f"[bold red]the file differs from what was written at offset {bad:#x}[/]")

    # persist: pages survive the mapping; close, map again, find them resident
    window = min(16, vm.npages // 4) * ps
    assert m[:window] == model[:window]  # make the first pages recently used
    # touching them may have taken free pages and woken the page daemon: let it finish now,
    # while they are mapped and referenced, not after the close, when nothing holds them
    vm.quiesce()
    story.changed("faults")
    with tracing(True):
        m.close()
    story.step("persist", f"close drops the last reference (uvn_detach): the object persists "
                          f"with its pages: {story.changed('persisting', 'resident')}")
    with tracing(True):
        m = mmap(fd, 0, vm=vm)
        again = m[:window]
    assert again == model[:window]
    story.step("", f"mapping the file again finds the first {window // ps} pages without I/O: "
                   f"{story.changed('faults', 'pageins', 'read_ios')}")
    m.close()

    story.changed("resident")
    if args.mmu == "software":
        with tracing(True):
            vm.vfs.dounmount(vm.hostfs)  # recycles the vnode, as the kernel does to reuse it
        story.step("terminate", f"unmounting recycles the vnode; uvm_vnp_terminate frees its pages: "
                                f"{story.changed('persisting', 'resident')}")
    else:
        story.step("terminate", "the server keeps the object for its clients; it terminates it when it "
                                "stops (at the VM's close), after writing every dirty page back")
    return 0 if bad is None and mismatches == 0 else 1


def _first_difference(path: str, model: bytes | bytearray) -> int | None:
    """The first offset where the file differs from *model* (None: equal), by plain reads."""
    off = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            want = model[off:off + len(chunk)]
            if chunk != want:
                return off + next((i for i, (a, b) in enumerate(zip(chunk, want, strict=False))
                                   if a != b), len(want))
            off += len(chunk)
    return None if off == len(model) else off


def add_subcommands(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="map a file larger than the VM, read and write it, check it",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--trace", action="store_true",
                   help="trace the pager's calls for the steps of the story (VNPAGER_TRACE=1)")
    p.add_argument("--physmem", type=size_arg, default="4M", metavar="SIZE",
                   help="memory of the VM (default 4M)")
    p.add_argument("--file-size", type=size_arg, default=0, metavar="SIZE",
                   help="size of the file (default 8 times --physmem)")
    p.add_argument("--ops", type=int, default=5000, metavar="N",
                   help="operations of the workload (default 5000)")
    p.add_argument("--seconds", type=float, default=0, metavar="S",
                   help="stop the workload after S seconds, if sooner")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--mmu", choices=MMUS, default="software",
                   help="the machine: the software MMU (default) or the host's, through a pager server")
    p.set_defaults(func=run_demo)


