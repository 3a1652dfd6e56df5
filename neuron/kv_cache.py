"""The slot-based KV cache of the fused CUDA engine (model/fused.py) and of LlamaModel.forward, the
single-sequence reference path: per layer, [slots, kv_heads, max_context, head_dim] for keys and
values. The serving engine uses the paged cache (engine/kv_cache.py) instead.

A sequence owns one slot from admission to finish; positions index the context dimension directly,
so decode writes one column and attention reads a prefix, with no allocation on the hot path.
"""
from __future__ import annotations


class KvCache:
    def __init__(self, xp, num_layers: int, slots: int, kv_heads: int, max_context: int, head_dim: int, dtype):
        shape = (slots, kv_heads, max_context, head_dim)
        self.keys = [xp.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.values = [xp.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.slots = slots
        self.max_context = max_context
        self._free = list(range(slots - 1, -1, -1))

    @staticmethod
    def bytes_per_slot(num_layers: int, kv_heads: int, max_context: int, head_dim: int, itemsize: int) -> int:
        return 2 * num_layers * kv_heads * max_context * head_dim * itemsize

    @property
    def nbytes(self) -> int:
        return sum(int(t.nbytes) for t in self.keys + self.values)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self) -> int | None:
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def clear(self) -> int:
        """Zero the slots no sequence holds; returns how many were cleared."""
        for slot in self._free:
            for t in self.keys + self.values:
                t[slot] = 0
        return len(self._free)
