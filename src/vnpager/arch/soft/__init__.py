"""The software machine: an MMU emulated in Python, over frames of ordinary memory.

* :mod:`.pmap` -- the translations, reverse maps, ref/mod bits and the TLB
  of frame runs: the pmap interface of :mod:`vnpager.uvm.pmap`, as this
  machine implements it (every load and store is a call into it);
* :mod:`.frames` -- the page frames: one private anonymous arena.

It runs everywhere and is the default machine.  Nothing here imports
``uvm`` at run time: the MI types it names are imported under
TYPE_CHECKING only.
"""
