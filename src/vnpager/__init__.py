"""vnpager: the OpenBSD UVM vnode pager, rebuilt in Python."""

from vnpager.uvm.uvm import VM

__all__ = ["VM"]
