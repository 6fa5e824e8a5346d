"""pmap_enter(replace=False): fault-ahead leaves a concurrent fault's mapping."""

from __future__ import annotations

from helpers import PS, RW, getpages, machine, mkfile, pattern
from vnpager.uvm.pmap import Pmap, pmap_enter, pmap_extract
from vnpager.uvm.uvm_param import PROT_READ


def test_pmap_enter_without_replace_keeps_the_existing_translation() -> None:
    vm = machine()
    _, uvn = mkfile(vm, pattern(2))
    mine, theirs = getpages(uvn, 0, 2)
    pm = Pmap(vm)
    pmap_enter(pm, 0x1000_0000, theirs, RW, RW)  # a copy-on-write page, say
    assert pmap_enter(pm, 0x1000_0000, mine, PROT_READ, replace=False) is False
    assert pmap_extract(pm, 0x1000_0000) == (theirs, RW) and not mine.pv
    assert pmap_enter(pm, 0x1000_0000 + PS, mine, PROT_READ, replace=False) is True
    assert pmap_extract(pm, 0x1000_0000 + PS) == (mine, PROT_READ)
