"""Why the hardware MMU cannot run here, and what would let it."""

from __future__ import annotations

import errno
import os

SYSCTL = "vm.unprivileged_userfaultfd"
DEVICE = "/dev/userfaultfd"


class UffdUnavailable(OSError):
    """userfaultfd cannot be used by this process on this machine.

    An OSError (errno EPERM, EACCES or ENOSYS, as the kernel said) whose
    message names the fix, because the user who meets it is choosing a
    machine (``mmu="hardware"``) and can act on it: run as root, set the
    sysctl, open the device to a group, or take the software MMU.
    """


def not_permitted(err_syscall: int, err_device: int | None) -> UffdUnavailable:
    """The error for a userfaultfd(2) that failed with *err_syscall* and a
    /dev/userfaultfd that failed with *err_device* (None: no such device).
    """
    if err_syscall == errno.ENOSYS and err_device is None:
        return UffdUnavailable(
            errno.ENOSYS,
            f"this kernel ({os.uname().release}) has no userfaultfd (CONFIG_USERFAULTFD is off); "
            "the hardware MMU needs Linux 6.7 or later built with it; use mmu='software'",
        )
    uid = os.geteuid()
    said = f"userfaultfd(2): {os.strerror(err_syscall)}"
    if err_device is None:
        device = f"or use Linux 6.1 or later, whose {DEVICE} can be opened to a group"
    else:
        said += f"; {DEVICE}: {os.strerror(err_device)}"
        device = (f"or let uid {uid} open {DEVICE} (e.g. `chgrp uffd {DEVICE} && chmod 0660 {DEVICE}`, "
                  "the user in group uffd, and a udev rule to keep it)")
    return UffdUnavailable(
        err_syscall if err_device is None else err_device,
        f"userfaultfd is not permitted for uid {uid} ({said}): run as root, "
        f"or allow it to every user with `sysctl -w {SYSCTL}=1` (in /etc/sysctl.d to keep it), "
        f"{device}, or use mmu='software'",
    )


def missing_features(missing: list[str]) -> UffdUnavailable:
    """The error for a kernel whose userfaultfd lacks features we need."""
    return UffdUnavailable(
        errno.ENOTSUP,
        f"this kernel's userfaultfd ({os.uname().release}) lacks {', '.join(missing)}: "
        "the hardware MMU needs Linux 6.7 or later (shmem minor faults, asynchronous write-protect); "
        "use mmu='software'",
    )
