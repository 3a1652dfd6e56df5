"""freeze_heap: what exists is collected once, then kept out of the collector's later walks (a GPU
shard's KV block manager holds one object per block; a full collection over them stalled the
device thread)."""
from __future__ import annotations

import gc
import weakref

from common.heap import freeze_heap
from neuron.device import DeviceSpec
from neuron.worker import DeviceWorker
from tests.helpers import load_fixture_shard


class Node:
    def __init__(self):
        self.other = self


def tracked(obj) -> bool:
    """Whether a collection would walk obj (frozen objects are in no generation)."""
    return any(o is obj for o in gc.get_objects())


def test_freeze_heap_collects_cycles_then_freezes_what_survives():
    garbage = Node()
    gone = weakref.ref(garbage)
    del garbage                  # a cycle: only the collector can free it
    kept = [Node()]
    assert tracked(kept)
    freeze_heap()
    assert gone() is None
    assert not tracked(kept)
    assert gc.get_freeze_count() > 0
    late = [Node()]              # objects made later are collected as usual
    assert tracked(late)


def test_a_loaded_shard_is_frozen_and_a_second_freeze_frees_a_dropped_one():
    worker = DeviceWorker(DeviceSpec("cpu", "cpu", 0), 1 << 30)
    worker.start()
    try:
        shard = load_fixture_shard(worker, 3)
        blocks = shard.engine.scheduler.block_manager
        assert blocks.num_blocks > 0 and not tracked(blocks)
        garbage = Node()
        gone = weakref.ref(garbage)
        del garbage
        gc.freeze()              # a cycle frozen by mistake, then dropped: the next freeze_heap finds it
        freeze_heap()
        assert gone() is None
    finally:
        worker.stop()
