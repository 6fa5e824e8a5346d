"""``vnpager mount``: a FUSE passthrough whose file data goes through the pager."""
