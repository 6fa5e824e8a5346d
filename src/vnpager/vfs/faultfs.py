"""faultfs: a filesystem that wraps another and makes its operations fail.

A :class:`FaultFS` delegates every vnode operation to the *lower*
filesystem's ops, with the same vnode (so the lower fs finds its private
data in ``vp.v_data`` as usual), unless its :class:`FaultPlan` says to
inject a fault first::

    plan = FaultPlan(seed=1)
    mp = vm.vfs.mount(FaultFS(HostFS(), plan), "faulty")
    vp = hostfs_vget_path(vm.vfs, mp, path)   # or hostfs_vget_fd, memfs_create(vm.vfs, mp, ...)

    plan.fail("write", errno.ENOSPC, skip=2, times=1)      # the 3rd write fails
    plan.fail("read", errno.EIO, offsets=range(a, b))      # until cleared
    plan.short("read", nbytes=100)                         # stop early, as at EOF
    plan.short("write", nbytes=100, error=errno.ENOSPC)    # 100 bytes, then the error
    plan.delay(("read", "write"), 0.001)                   # a slow backend
    plan.delay(OPS, 0.001)                                 # every call delays 1 ms
    plan.fail("write", errno.EIO, probability=0.01)        # at random, from the seed
    plan.injected[("write", "ENOSPC")]                     # faults injected so far
    plan.clear()

A vnode made through a faultfs mount is a vnode of that mount: the same
host file looked up through the plain hostfs mount is another vnode, with
its own pages.
"""

from __future__ import annotations

import errno
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from vnpager.kern.lock import kernel_lock
from vnpager.vfs.vnode import Uio, Vattr, Vnode, VnodeOps

Op = Literal["getattr", "read", "write", "fsync", "setsize"]
OPS: frozenset[Op] = frozenset(get_args(Op))
_TRANSFERS = frozenset({"read", "write"})

Kind = Literal["fail", "short", "delay"]


@dataclass(eq=False)
class Rule:
    """One fault of a plan, as :meth:`FaultPlan.fail`/``short``/``delay`` make it.

    It applies to a call of one of *ops* (on *vnode*, if given; for a
    read or write, if the transfer overlaps *offsets*): the first *skip*
    such calls pass, then each fires with *probability*, *times* times in
    all (None: until cleared).  ``seen`` and ``fired`` count the calls that
    matched and the faults injected.
    """

    ops: frozenset[str]
    kind: Kind
    error: int = 0  # fail: the errno; short: the errno after the bytes moved (0: none)
    nbytes: int = 0  # short: bytes to move
    seconds: float = 0.0  # delay
    skip: int = 0
    times: int | None = None
    offsets: range | None = None
    vnode: Vnode | None = None
    probability: float = 1.0
    seen: int = 0
    fired: int = 0

    def __post_init__(self) -> None:
        if not self.ops or not self.ops <= OPS:
            raise ValueError(f"ops must be among {sorted(OPS)}, not {sorted(self.ops)}")
        transfer_only = self.kind == "short" or self.offsets is not None
        if transfer_only and not self.ops <= _TRANSFERS:
            raise ValueError("short transfers and offsets apply to read and write only")
        if self.kind == "fail" and self.error <= 0:
            raise ValueError("a failure needs an errno")
        if self.offsets is not None and self.offsets.step != 1:
            raise ValueError("offsets must be a range with step 1")
        if (self.nbytes < 0 or self.seconds < 0 or self.skip < 0
                or (self.times is not None and self.times < 1) or not 0 <= self.probability <= 1):
            raise ValueError(f"bad fault parameters: {self!r}")

    @property
    def label(self) -> str:
        """What it injects, as counted in :attr:`FaultPlan.injected`."""
        if not self.error:
            return self.kind
        name = errno.errorcode.get(self.error, str(self.error))
        return name if self.kind == "fail" else f"{self.kind}+{name}"

    def matches(self, op: str, vp: Vnode, span: tuple[int, int] | None) -> bool:
        if op not in self.ops or (self.vnode is not None and vp is not self.vnode):
            return False
        if span is None:
            return True
        offset, length = span
        if self.kind == "short" and length <= self.nbytes:
            return False  # already that short: nothing to inject
        return self.offsets is None or (offset < self.offsets.stop
                                        and self.offsets.start < offset + max(length, 1))


class FaultPlan:
    """The faults to inject, shared by any number of FaultFS mounts.

    Rules are consulted in the order they were added.  On each call every
    delay that fires adds up; of the failures and short transfers, the
    first that fires decides the call (the later ones still count the call
    as seen).  Thread-safe; random choices come from *seed*.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._injected: Counter[tuple[str, str]] = Counter()

    def fail(self, ops: Op | Iterable[Op], error: int, *, skip: int = 0, times: int | None = None,
             offsets: range | None = None, vnode: Vnode | None = None,
             probability: float = 1.0) -> Rule:
        """Make calls of *ops* fail with *error*, moving nothing."""
        return self._add(Rule(_opset(ops), "fail", error=error, skip=skip, times=times,
                              offsets=offsets, vnode=vnode, probability=probability))

    def short(self, ops: Op | Iterable[Op], nbytes: int, *, error: int = 0, skip: int = 0,
              times: int | None = None, offsets: range | None = None, vnode: Vnode | None = None,
              probability: float = 1.0) -> Rule:
        """Make reads or writes of more than *nbytes* move only *nbytes* at first.

        Then *error* is returned if given.  Otherwise a read stops there,
        as at the end of file, and a write does the rest in a second call
        to the lower fs, as a caller retrying a short pwritev would.
        """
        return self._add(Rule(_opset(ops), "short", error=error, nbytes=nbytes, skip=skip,
                              times=times, offsets=offsets, vnode=vnode, probability=probability))

    def delay(self, ops: Op | Iterable[Op], seconds: float, *, skip: int = 0,
              times: int | None = None, offsets: range | None = None, vnode: Vnode | None = None,
              probability: float = 1.0) -> Rule:
        """Make calls of *ops* sleep *seconds* first (without the kernel lock)."""
        return self._add(Rule(_opset(ops), "delay", seconds=seconds, skip=skip, times=times,
                              offsets=offsets, vnode=vnode, probability=probability))

    def clear(self, *rules: Rule) -> None:
        """Remove *rules*, or every rule; the counts of injected faults stay."""
        with self._lock:
            self._rules = [r for r in self._rules if r not in rules] if rules else []

    @property
    def rules(self) -> list[Rule]:
        """The rules in force (spent ones are gone)."""
        with self._lock:
            return list(self._rules)

    @property
    def injected(self) -> Counter[tuple[str, str]]:
        """A copy of the faults injected so far, by (op, label): ("write", "ENOSPC"),
        ("read", "short"), ("write", "short+ENOSPC"), ("read", "delay")."""
        with self._lock:
            return Counter(self._injected)

    def _add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def decide(self, op: str, vp: Vnode, span: tuple[int, int] | None) -> tuple[float, Rule | None]:
        """For a call of *op* on *vp* (moving span = (offset, length) for a
        transfer), the seconds to sleep and the failure or short transfer
        to inject, if any; counts what fired."""
        delay, outcome = 0.0, None
        with self._lock:
            for rule in list(self._rules):
                if not rule.matches(op, vp, span):
                    continue
                rule.seen += 1
                if rule.seen <= rule.skip or (outcome is not None and rule.kind != "delay"):
                    continue
                if rule.probability < 1 and self._rng.random() >= rule.probability:
                    continue
                rule.fired += 1
                self._injected[op, rule.label] += 1
                if rule.fired == rule.times:
                    self._rules.remove(rule)
                if rule.kind == "delay":
                    delay += rule.seconds
                else:
                    outcome = rule
        return delay, outcome


def _opset(ops: Op | Iterable[Op]) -> frozenset[str]:
    return frozenset([ops] if isinstance(ops, str) else ops)


class FaultFS(VnodeOps):
    """The ops of *lower*, with the faults of *plan* injected in front."""

    def __init__(self, lower: VnodeOps, plan: FaultPlan | None = None) -> None:
        self.lower = lower
        self.plan = plan if plan is not None else FaultPlan()
        self.name = f"faultfs({lower.name})"

    def _begin(self, op: Op, vp: Vnode, uio: Uio | None = None) -> Rule | None:
        """Sleep for the delays that fire; return the fault to inject, if any."""
        delay, rule = self.plan.decide(op, vp, None if uio is None else (uio.offset, uio.resid))
        if delay:
            # a slow device sleeps, and a sleeping thread lets go of the big lock
            with kernel_lock.dropped():
                time.sleep(delay)
        return rule

    def getattr(self, vp: Vnode, vap: Vattr) -> int:
        rule = self._begin("getattr", vp)
        return rule.error if rule else self.lower.getattr(vp, vap)

    def setsize(self, vp: Vnode, size: int) -> int:
        rule = self._begin("setsize", vp)
        return rule.error if rule else self.lower.setsize(vp, size)

    def fsync(self, vp: Vnode) -> int:
        rule = self._begin("fsync", vp)
        return rule.error if rule else self.lower.fsync(vp)

    def read(self, vp: Vnode, uio: Uio, ioflag: int) -> int:
        return self._transfer("read", self.lower.read, vp, uio, ioflag)

    def write(self, vp: Vnode, uio: Uio, ioflag: int) -> int:
        return self._transfer("write", self.lower.write, vp, uio, ioflag)

    def _transfer(self, op: Op, lower: Callable[[Vnode, Uio, int], int],
                  vp: Vnode, uio: Uio, ioflag: int) -> int:
        rule = self._begin(op, vp, uio)
        if rule is None:
            return lower(vp, uio, ioflag)
        if rule.kind == "fail":
            return rule.error
        # a short transfer: let the lower fs see only the first nbytes
        rest = uio.resid - rule.nbytes
        uio.resid = rule.nbytes
        error = lower(vp, uio, ioflag)
        uio.resid += rest
        if error or rule.error:
            return error or rule.error
        return lower(vp, uio, ioflag) if op == "write" else 0

    def ioctl(self, vp: Vnode, cmd: int, data: dict[str, Any]) -> int:
        return self.lower.ioctl(vp, cmd, data)

    def reclaim(self, vp: Vnode) -> None:
        self.lower.reclaim(vp)
