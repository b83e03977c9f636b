"""
Memory admission (docs/swapping.md, "Memory"): models run together while
they fit in each device's budget, and a start waits until a stopped server's
memory has come back.

 - L{probe}: device totals and usage, from C{nvidia-smi} or C{/proc/meminfo}.
 - L{admission}: the pure rule that picks a device and the models to stop.
 - L{store}: measured figures, kept in a small JSON file across restarts.
 - L{ledger}: the supervisor's view: who holds what, the memory gate,
   measuring a server once it is ready.
"""
