"""Where a mount's requests spend their time: serve SRC at MNT, run a
command on the mount, and print the profile of every FUSE request the
server handled meanwhile (:mod:`vnpager.fuse.profile`).  A measuring tool,
like the bench, not a test.

    python -m vnpager.tools.mount_profile SRC MNT [--physmem SIZE] [--cprofile] -- COMMAND...

The server runs in a thread of this process (:func:`vnpager.fuse.mount.mounted`),
the command in a process of its own.  The command's wall time, less the
requests' time in the server, is their time in the kernel, the FUSE device,
pyfuse3's dispatch and trio's scheduling, and the command's own.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from vnpager.fuse.mount import mounted
from vnpager.fuse.profile import RequestProfile
from vnpager.uvm.uvm import VM


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vnpager.tools.mount_profile",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("src")
    p.add_argument("mnt")
    p.add_argument("--physmem", default="64M", help="the VM's size (default 64M)")
    p.add_argument("--cprofile", action="store_true", help="run the worker threads' calls under cProfile")
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        p.error("no command to run: give it after --")
    cut = argv.index("--")
    args, command = p.parse_args(argv[:cut]), argv[cut + 1:]
    with mounted(VM(physmem=args.physmem), args.src, args.mnt, profile=RequestProfile(args.cprofile)):
        start = time.perf_counter()
        code = subprocess.run(command, check=False).returncode
        print(f"the command took {time.perf_counter() - start:.2f} s", flush=True)
    return code  # the profile is printed at the unmount


if __name__ == "__main__":
    sys.exit(main())
