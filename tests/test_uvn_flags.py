"""The life of a vnode object as data: UVN_STATES, UVN_TRANSITIONS and the
VNPAGER_DEBUG check (uvn_set_flags) that every change of u_flags passes."""

from __future__ import annotations

import pytest

from helpers import getpages, machine, mkfile, pattern, start, wait_sleeping
from vnpager import VM
from vnpager.kern.debug import Panic
from vnpager.uvm.uvm_page import PG_BUSY, uvm_page_unbusy
from vnpager.uvm.uvm_vnode import (
    UVM_VNODE_ALOCK,
    UVM_VNODE_CANPERSIST,
    UVM_VNODE_DYING,
    UVM_VNODE_IOSYNC,
    UVM_VNODE_IOSYNCWANTED,
    UVM_VNODE_RELKILL,
    UVM_VNODE_VALID,
    UVM_VNODE_VNISLOCKED,
    UVN_STATES,
    UVN_TRANSITIONS,
    uvm_vnp_uncache,
    uvn_detach,
    uvn_set_flags,
    uvn_state,
)
from vnpager.vfs.memfs import MemFS
from vnpager.vfs.mount import MNT_FORCE

VALID = UVM_VNODE_VALID | UVM_VNODE_CANPERSIST
TERMINATING = UVM_VNODE_VALID | UVM_VNODE_DYING | UVM_VNODE_VNISLOCKED


def test_uvn_states_name_each_flag_combination_once() -> None:
    for flags in range(0x400):
        assert sum(state.holds(flags) for state in UVN_STATES) <= 1, hex(flags)
    assert set(UVN_TRANSITIONS) == {state.name for state in UVN_STATES}
    assert all(set(moves) <= set(UVN_TRANSITIONS) for moves in UVN_TRANSITIONS.values())


@pytest.mark.parametrize("flags", [
    UVM_VNODE_VALID | UVM_VNODE_VNISLOCKED,  # VNISLOCKED only while terminate runs
    UVM_VNODE_VALID | UVM_VNODE_RELKILL,  # RELKILL only while dying
    TERMINATING | UVM_VNODE_RELKILL,  # detach's RELKILL over terminate's takeover
    UVM_VNODE_RELKILL,  # ... or after terminate is done
    UVM_VNODE_ALOCK | UVM_VNODE_VALID,
    UVM_VNODE_CANPERSIST,
])
def test_uvn_set_flags_illegal_state_panics(vm: VM, flags: int) -> None:
    _, uvn = mkfile(vm, b"x")
    with uvn.vmobjlock, pytest.raises(Panic, match="not a state"):
        uvn_set_flags(uvn, flags)
    assert uvn.u_flags == VALID | uvn.u_flags & ~VALID  # unchanged
    with pytest.raises(Panic, match="not a state"):
        uvn_state(flags)


def test_uvn_set_flags_illegal_move_panics(vm: VM) -> None:
    _, uvn = mkfile(vm, b"x")
    with uvn.vmobjlock, pytest.raises(Panic, match="no move from valid to attaching"):
        uvn_set_flags(uvn, UVM_VNODE_ALOCK)


def test_uvn_set_flags_iosync_left_set_by_terminate_panics(vm: VM) -> None:
    # the seed's bug: a terminated object that lives on keeps IOSYNC, and its
    # next I/O waits forever
    _, uvn = mkfile(vm, b"x")
    with uvn.vmobjlock:
        uvn.u_flags, uvn.u_nio = TERMINATING | UVM_VNODE_IOSYNC, 1
        try:
            with pytest.raises(Panic, match="terminating -> valid keeps 0x80"):
                uvn_set_flags(uvn, UVM_VNODE_VALID | UVM_VNODE_IOSYNC)
        finally:
            uvn.u_flags, uvn.u_nio = VALID, 0


def test_uvn_set_flags_iosync_without_io_or_iosyncwanted_alone_panics(vm: VM) -> None:
    _, uvn = mkfile(vm, b"x")
    with uvn.vmobjlock:
        with pytest.raises(Panic, match="no I/O in flight"):
            uvn_set_flags(uvn, VALID | UVM_VNODE_IOSYNC)
        with pytest.raises(Panic, match="IOSYNCWANTED without IOSYNC"):
            uvn_set_flags(uvn, VALID | UVM_VNODE_IOSYNCWANTED)
    assert uvn.u_flags & VALID == VALID and not uvn.u_flags & UVM_VNODE_IOSYNC


def test_uvn_set_flags_without_the_object_lock_panics(vm: VM) -> None:
    _, uvn = mkfile(vm, b"x")
    with pytest.raises(Panic, match="without the object lock"):
        uvn_set_flags(uvn, uvn.u_flags & ~UVM_VNODE_CANPERSIST)


def test_uvn_detach_leaves_a_dying_object_to_terminate_that_took_it_over() -> None:
    # the last detach sleeps in its flush (a page busy in another's pageout);
    # a forced unmount terminates the object meanwhile.  The seed then sets
    # RELKILL over terminate's VNISLOCKED (or on the dead object), and may
    # declare it kept or dead while terminate still works on it.  (Not the
    # vm fixture: a panic there leaves the object locked, and close() hangs.)
    vm = machine()
    mp = vm.vfs.mount(MemFS(), "forced")
    vp, uvn = mkfile(vm, pattern(2), mp=mp)
    pg = getpages(uvn, 0, 2)[0]
    uvm_vnp_uncache(vp)
    with uvn.vmobjlock:
        pg.pg_flags |= PG_BUSY
    try:
        dying = start(lambda: uvn_detach(uvn), "detach")
        wait_sleeping("uvn_flsh")
        unmount = start(lambda: vm.vfs.dounmount(mp, MNT_FORCE), "umount -f")
        wait_sleeping("uvn_flsh", 2)  # terminate waits for the page too
        assert uvn.u_flags & TERMINATING == TERMINATING
    finally:
        with uvn.vmobjlock:
            uvm_page_unbusy([pg])
    dying.join_ok()
    assert unmount.join_ok() == 0
    assert uvn.u_flags == 0 and uvn.uo_npages == 0 and uvn.uo_refs == 0
    vm.check_invariants()
    vm.close()
