"""A long-running server's Python heap, kept out of the cyclic garbage collector's way.

CPython's oldest-generation collection walks every tracked object, and holds the GIL while it does:
every thread of the process stops. A GPU shard's KV block manager alone holds one object per block
(the 1B shape at 256 sequences of 2,256 tokens: 144,000 blocks), and such a collection, set off by
the objects a burst of requests allocates, stalled the device thread mid-launch (a full collection
over 144,000 blocks: ~29 ms on a 2-core machine; bench/NOTES.md, session 16). What a load or the
startup leaves behind lives as long as the shard or the process, so it is collected once and then
frozen: later collections skip it, and the collector walks only what requests allocate.
"""
from __future__ import annotations

import gc
import time


def freeze_heap() -> float:
    """Collect what is garbage now, then freeze every surviving object out of later collections
    (call after startup and after each load or drop). Returns the seconds it took: one full
    collection, during which every thread of the process waits."""
    started = time.perf_counter()
    gc.unfreeze()   # so what an earlier freeze held and is garbage now (a dropped shard) is collected too
    gc.collect()
    gc.freeze()
    return time.perf_counter() - started
