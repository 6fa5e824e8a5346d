"""Set-up shared by the reliability tests (issue 4): host files on a
fault-injecting mount, mapped at the map layer with an errseq cursor."""

from __future__ import annotations

from pathlib import Path

from vnpager import VM
from vnpager.torture import Mapping
from vnpager.vfs.faultfs import FaultFS, FaultPlan
from vnpager.vfs.hostfs import HostFS, hostfs_vget_path
from vnpager.vfs.mount import Mount

PS = 4096


def faulty_mount(vm: VM, plan: FaultPlan) -> Mount:
    """A hostfs mount whose I/O *plan* can make fail."""
    return vm.vfs.mount(FaultFS(HostFS(), plan), f"faulty{id(plan)}")


def map_host(vm: VM, mp: Mount, path: Path, *, private: bool = False) -> Mapping:
    """A mapping of the whole host file *path* through *mp*."""
    vp = hostfs_vget_path(vm.vfs, mp, str(path))
    try:
        return Mapping(vm, vp, path.stat().st_size, private=private)
    finally:
        vm.vfs.vrele(vp)  # the object holds its own reference
