"""Objects of object stores in the pager server: the hardware VM's
``mount_objects`` and the URLs of its ``map``, ``open``, ``pread`` and
``pwrite`` (issue 12).

A URL brings no descriptor: the server looks it up on its VM's objfs
mounts (:mod:`vnpager.vfs.objfs`), as the software VM does on its own, so
that every client of a server reaches an object through one vnode, one
set of pages and one budget.  A mount is the VM's, as on the software
MMU: the last one made for a protocol is the one its URLs use, for every
client; a protocol never mounted gets fsspec's defaults at its first URL
(credentials and endpoint from the *server's* environment and AWS config).
A mount asked again with the same arguments is the one made first (made
the protocol's current mount again), so that clients that each mount the
same store share its objects' pages rather than each getting vnodes of
their own.

The server opens no host file by name for a client (a client hands it
descriptors of its own): URLs and mounts of fsspec's local filesystem
are refused.
"""

from __future__ import annotations

import errno
import json
import threading
from typing import Any

from vnpager.uvm.uvm import VM
from vnpager.vfs.objfs import ObjMount, is_url, objfs_mounts
from vnpager.vfs.objstore import PartPolicy, protocols

#: fsspec's protocols of host files: a client names its host files by descriptor.
HOST_PROTOCOLS = frozenset({"file", "local"})


def check_url(url: object) -> str:
    """*url* if a client may name an object by it: ValueError if it is no
    URL, PermissionError (EACCES) if it names host files."""
    if not isinstance(url, str) or not is_url(url):
        raise ValueError(f"not the URL of an object: {url!r}")
    if url.split("://", 1)[0].lower() in HOST_PROTOCOLS:
        raise PermissionError(errno.EACCES, "the pager server opens no host file by name "
                                            "(map or open a descriptor of it)", url)
    return url


class ObjectMounts:
    """The objfs mounts that clients made on a server's *vm*, by id.

    ``lock`` guards ``by_id``, ``by_args`` and ``next_id``."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.lock = threading.Lock()
        self.by_id: dict[int, ObjMount] = {}
        self.by_args: dict[str, int] = {}
        self.next_id = 1

    def mount(self, protocol: str, options: dict[str, Any], policy: dict[str, int] | None,
              staging_dir: str | None) -> int:
        """Mount fsspec's filesystem of *protocol* (``"s3"``, or a URL of
        it) made with *options* (its storage_options), with *policy* (the
        fields of a PartPolicy) and *staging_dir*, as the software VM's
        ``mount_objects``; the mount's id.  Raises TypeError or ValueError
        for bad arguments, the filesystem's error if it cannot be made."""
        if not (isinstance(protocol, str) and isinstance(options, dict) and isinstance(policy, dict | None)
                and isinstance(staging_dir, str | None)):
            raise TypeError("a protocol, storage_options and policy as dicts, a staging directory")
        protocol = protocol.split("://", 1)[0]
        check_url(f"{protocol}://")
        key = json.dumps([protocol, options, policy, staging_dir], sort_keys=True)
        with self.lock:
            mount_id = self.by_args.get(key)
            if mount_id is not None:
                om = self.by_id[mount_id]
                registry = objfs_mounts(self.vm.vfs)
                for p in protocols(om.fs):  # current again; single stores, atomic
                    registry.by_protocol[p] = om
                return mount_id
            import fsspec

            fs = fsspec.filesystem(protocol, **options)
            om = objfs_mounts(self.vm.vfs).mount(fs, PartPolicy(**policy) if policy is not None else None,
                                                 staging_dir)
            mount_id, self.next_id = self.next_id, self.next_id + 1
            self.by_id[mount_id] = om
            self.by_args[key] = mount_id
            return mount_id

    def statistics(self, mount_id: int) -> dict[str, int]:
        """The ``statistics()`` of mount *mount_id* (ValueError if none)."""
        with self.lock:
            om = self.by_id.get(mount_id)
        if om is None:
            raise ValueError(f"no object mount {mount_id}")
        return om.statistics()
