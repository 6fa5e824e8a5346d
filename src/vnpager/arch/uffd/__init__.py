"""The hardware machine's lowest layer: Linux userfaultfd and its friends.

* :mod:`.uapi` -- the kernel's numbers and structure layouts;
* :mod:`.userfaultfd` -- open a uffd (syscall, else /dev/userfaultfd),
  the handshake, REGISTER, CONTINUE, COPY, WRITEPROTECT, POISON, WAKE,
  and the fault events;
* :mod:`.shm` -- a file's frames as a memfd, mapped ``MAP_SHARED`` at a
  known address, punched out to evict;
* :mod:`.pagemap` -- PAGEMAP_SCAN: the written pages of a range, and
  write-protecting them again (dirty bits for pmap_is_modified);
* :mod:`.remote` -- a client's pidfd and process_madvise(MADV_PAGEOUT):
  clearing referenced bits, so that a re-reference is a MINOR fault;
* :mod:`.fdpass` -- fds over a Unix socket (SCM_RIGHTS);
* :mod:`.frames`, :mod:`.pmap` -- the uffd machine of ``uvm.VM(machine=
  "uffd")``: page frames as a memfd per object, and the pmap interface
  over a client's page tables (these two take uvm's types under
  TYPE_CHECKING only, as arch/soft does);
* :mod:`.errors` -- UffdUnavailable, naming the fix;
* :mod:`.libc`, :mod:`.fdobject` -- ctypes calls with their errno, and
  the owner of an fd.

Linux only, x86_64 (the syscall number), Linux 6.7 or later for the
features the server needs.  Nothing here imports the rest of vnpager.
"""

from .errors import UffdUnavailable
from .pagemap import Pagemap
from .remote import Process
from .shm import PAGE_SIZE, MemFile, SharedMapping
from .userfaultfd import MACHINE_FEATURES, OPTIONAL_FEATURES, SERVER_FEATURES, Uffd, UffdMsg

__all__ = [
    "MACHINE_FEATURES",
    "OPTIONAL_FEATURES",
    "PAGE_SIZE",
    "SERVER_FEATURES",
    "MemFile",
    "Pagemap",
    "Process",
    "SharedMapping",
    "Uffd",
    "UffdMsg",
    "UffdUnavailable",
]
