"""UVM: the virtual memory system, one module per file of sys/uvm."""
