"""Set-up shared by the reliability tests (issue 4): host files on a
fault-injecting mount, mapped at the map layer with an errseq cursor."""

from __future__ import annotations

from pathlib import Path

from vnpager import VM
from vnpager.uvm.uvm_fault import uvm_copyin, uvm_copyout
from vnpager.uvm.uvm_map import MAP_PRIVATE, MAP_SHARED
from vnpager.uvm.uvm_param import PROT_READ, PROT_WRITE
from vnpager.vfs.faultfs import FaultFS, FaultPlan
from vnpager.vfs.hostfs import HostFS, hostfs_vget_path
from vnpager.vfs.mount import Mount
from vnpager.vfs.vnode import Vnode
from vnpager.vnmap import FileObject

PS = 4096
RW = PROT_READ | PROT_WRITE


class Mapping:
    """A mapping of a vnode made by the mapping core (vnpager.vnmap), used
    at the map layer: reads and writes go straight to its addresses (a
    store to a read-only mapping is the fault's SegvError, not the checks of
    vnpager.mmap), and sync and close return the errno that vnpager.mmap
    raises (0 if none)."""

    def __init__(self, vm: VM, vp: Vnode, size: int, *, prot: int = RW, private: bool = False) -> None:
        self.space, self.size, self.shared = vm.vmspace, size, not private
        self.file = FileObject.attach(vp, prot if not private else PROT_READ)
        self.uobj = self.file.uvn
        try:
            self.va = self.file.map(self.space, size, 0, prot, RW if private else prot,
                                    MAP_PRIVATE if private else MAP_SHARED)
        except BaseException:
            self.file.close()
            raise

    def read(self, off: int, n: int) -> bytes:
        buf = bytearray(n)
        uvm_copyin(self.space, self.va + off, memoryview(buf))
        return bytes(buf)

    def write(self, off: int, data: bytes) -> None:
        uvm_copyout(self.space, memoryview(data), self.va + off)

    def sync(self, off: int = 0, n: int | None = None) -> int:
        try:
            self.file.sync(off, self.size if n is None else off + n)
        except OSError as e:
            return e.errno or 0
        return 0

    def close(self) -> int:
        err = self.sync() if self.shared else 0
        self.file.close()
        return err


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
