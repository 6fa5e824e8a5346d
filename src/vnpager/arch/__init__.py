"""Machine-dependent code: what lies behind the pmap interface.

As in BSD's ``sys/arch/<machine>/``, the MI layers (uvm_fault, uvm_vnode,
the page daemon, read-ahead) call ``pmap_enter``, ``pmap_remove``,
``pmap_protect``, ``pmap_is_modified`` and the rest without knowing which
MMU does the work; each subpackage here is one machine.  The interface
itself, and which machine it is bound to, is :mod:`vnpager.uvm.pmap`.

* ``soft``: the software MMU, the default: translations, reverse maps and
  ref/mod bits kept in Python, a TLB of frame runs, and frames that are
  one private anonymous arena.  Every load and store is a call into it.
* ``uffd``: the host's own MMU, driven through Linux userfaultfd.  A
  file's page frames live in a memfd of their own, clients map the memfd
  ``MAP_SHARED``, and a pager server in another process resolves their
  faults (issue 10).  This is its lowest layer: the kernel interfaces.

Nothing in ``arch`` imports ``uvm`` or anything above it at run time:
``soft`` names the MI types (VM, VmPage) under TYPE_CHECKING only, and
``uffd`` imports nothing of vnpager.
"""
