"""Passing file descriptors between processes over a Unix socket.

The client sends its userfaultfd (and the server sends a file's memfd)
with SCM_RIGHTS; the receiver gets its own descriptors for the same open
files.  A message and its fds travel together in one sendmsg, so a
header can say what the fds are.  End of file on the socket is how the
server learns a client died: the uffd itself tells nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence


def send(sock: socket.socket, payload: bytes, fds: Sequence[int] = ()) -> None:
    """Send *payload* (non-empty: an empty datagram would read as EOF) with
    *fds*, in one message."""
    if not payload:
        raise ValueError("fdpass.send: an empty payload would read as end of file")
    sent = socket.send_fds(sock, [payload], fds)
    if sent != len(payload):
        raise OSError(f"fdpass.send: short send ({sent} of {len(payload)} bytes)")


def recv(sock: socket.socket, maxlen: int, maxfds: int) -> tuple[bytes, list[int]]:
    """One message and the fds that came with it (close-on-exec, owned by
    the caller); (b"", []) at end of file.  A message whose fds did not
    all fit (MSG_CTRUNC) is an error: the fds that came are closed."""
    payload, fds, flags, _ = socket.recv_fds(sock, maxlen, maxfds, socket.MSG_CMSG_CLOEXEC)
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for fd in fds:
            os.close(fd)
        raise OSError(f"fdpass.recv: message truncated (flags {flags:#x}; more than {maxfds} fds "
                      f"or {maxlen} bytes)")
    return payload, list(fds)
