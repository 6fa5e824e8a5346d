"""The pager server of the hardware MMU (issue 10).

* :mod:`.protocol` -- the requests and replies between a client and its
  server, as data (the client library imports only this module of the
  package);
* :mod:`.serve` -- the server: a socket's accept loop, a session thread
  per client, and the VM they share (``python -m vnpager serve``);
* :mod:`.space` -- a client's address space in the server (ClientSpace)
  and its fault thread.
"""
