"""Machine-dependent code: what lies behind the pmap interface.

As in BSD's ``sys/arch/<machine>/``, the MI layers (uvm_fault, uvm_vnode,
the page daemon, read-ahead) call ``pmap_enter``, ``pmap_remove``,
``pmap_protect``, ``pmap_is_modified`` and the rest without knowing which
MMU does the work; each subpackage here is one machine.

* ``uffd``: the host's own MMU, driven through Linux userfaultfd.  A
  file's page frames live in a memfd of their own, clients map the memfd
  ``MAP_SHARED``, and a pager server in another process resolves their
  faults (issue 10).  This is its lowest layer: the kernel interfaces.

The software MMU (``vnpager.uvm.pmap`` today) is the other machine; it
moves here when the MI code is split from it.  Nothing in ``arch``
imports ``uvm`` or anything above it.
"""
