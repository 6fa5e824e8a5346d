"""The client library of the hardware MMU (issue 10).

* :mod:`.vm` -- :class:`HardwareVM`: a connection to a pager server (a
  private child or a shared one), the process's userfaultfd, fork;
* :mod:`.hwmmap` -- :class:`HwMmap`: an ``mmap.mmap`` over a file's memfd,
  faulted through the server;
* :mod:`.watchdog` -- the process that turns a dead server into SIGBUS.

It imports :mod:`vnpager.arch.uffd` and :mod:`vnpager.server.protocol`,
nothing of the VM but what tells a URL from a path (objfs's ``is_url``):
a client process holds no kernel state.  URLs of objects are the
server's to look up (``mount_objects``, :class:`.vm.ObjectMount`).
"""

from vnpager.client.hwmmap import HwMmap
from vnpager.client.vm import HardwareVM
from vnpager.server.protocol import ServerGone, ServerTimeout

__all__ = ["HardwareVM", "HwMmap", "ServerGone", "ServerTimeout"]
