"""The pager server of the hardware MMU (issue 10): the VM of the uffd
machine, serving client processes.

* :mod:`.protocol` -- the requests and replies between a client and its
  server, as data (the client library imports only this module of the
  package);
* :mod:`.serve` -- the server: a socket's accept loop, a session thread
  per client, and the VM they share (``python -m vnpager serve``);
* :mod:`.space` -- one client's address space in the server (its maps,
  and the threads that serve its faults through uvm_fault and
  userfaultfd).
"""
