"""The virtual filesystem layer: vnodes, mounts and the filesystems below."""
