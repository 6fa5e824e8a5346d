"""A pager server over FaultSpaces (tests/hw_fakes.py), for the tests of
the client library that need a server they can kill: ``python
hw_fake_server.py ADDRESS`` serves at ADDRESS until SIGTERM, and prints "ready"
once it accepts."""

from __future__ import annotations

import sys

from hw_fakes import Calls, FaultSpace
from vnpager.server.serve import Server, listen
from vnpager.uvm import uvm


def main() -> None:
    calls, files = Calls(), {}
    server = Server(uvm.VM("256K"), listen(sys.argv[1]),
                    lambda vm, uffd, pid: FaultSpace(uffd, pid, calls, files))
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
