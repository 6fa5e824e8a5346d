"""The kernel services UVM stands on: sleep and wakeup, locks, panics."""
