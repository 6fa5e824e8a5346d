"""The pager server: the VM of the uffd machine, serving client processes.

:mod:`.space` is one client's address space in the server (its maps, and
the threads that serve its faults through uvm_fault and userfaultfd).
"""
