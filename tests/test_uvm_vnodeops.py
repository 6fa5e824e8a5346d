"""The module keeps every function of the seed, and its pager ops table."""

from __future__ import annotations

import re
from pathlib import Path

from vnpager.uvm import uvm_vnode
from vnpager.uvm.uvm_pager import uvm_mk_pcluster

SEED = Path(__file__).resolve().parents[1] / ".." / "shared" / "seed" / "uvm_vnode.c"
THIRTEEN = ("uvn_init", "uvn_attach", "uvn_reference", "uvn_detach", "uvm_vnp_terminate",
            "uvn_flush", "uvn_cluster", "uvn_put", "uvn_get", "uvn_io", "uvm_vnp_uncache",
            "uvm_vnp_setsize", "uvm_vnp_sync")


def test_uvm_vnodeops_every_seed_function_is_here() -> None:
    for name in THIRTEEN:
        assert callable(getattr(uvm_vnode, name)), name


def test_uvm_vnodeops_matches_the_seed_table() -> None:
    ops = uvm_vnode.uvm_vnodeops
    assert (ops.pgo_init, ops.pgo_reference, ops.pgo_detach, ops.pgo_flush, ops.pgo_get,
            ops.pgo_put, ops.pgo_cluster, ops.pgo_mk_pcluster) == (
        uvm_vnode.uvn_init, uvm_vnode.uvn_reference, uvm_vnode.uvn_detach, uvm_vnode.uvn_flush,
        uvm_vnode.uvn_get, uvm_vnode.uvn_put, uvm_vnode.uvn_cluster, uvm_mk_pcluster)


def test_uvm_vnodeops_the_seed_defines_no_function_we_lack() -> None:
    # CI always has the seed beside the checkout: without it this check would pass unchecked
    assert SEED.exists(), f"the seed is not beside this checkout ({SEED}): clone ../shared"
    defined = set(re.findall(r"^(uv\w+)\(", SEED.read_text(), re.MULTILINE))
    assert defined == set(THIRTEEN)
