"""The paged KV cache of one shard: per layer, keys and values of shape
[num_blocks, block_size, kv_heads, head_dim] on the shard's device.

A token's KV lives in one slot, `block_id * block_size + offset`; which blocks a request holds is the
block manager's business (kv_blocks.py), the cache only stores. The flat view `[slots, kv_heads,
head_dim]` of each layer is what the model writes through the slot mapping and gathers from.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BLOCK_SIZE = 16
DEFAULT_MEMORY_FRACTION = 0.9


def bytes_per_block(num_layers: int, kv_heads: int, block_size: int, head_dim: int, itemsize: int) -> int:
    return 2 * num_layers * block_size * kv_heads * head_dim * itemsize


@dataclass(frozen=True)
class KvSizing:
    """How many blocks a load gets, and why (the load's refusal message uses the figures)."""
    num_blocks: int
    block_size: int
    block_bytes: int
    blocks_per_sequence: int      # blocks one max_context sequence needs

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size


def size_pool(room_bytes: int, fraction: float, block_bytes: int, block_size: int, max_context: int,
              cap_tokens: int | None = None) -> KvSizing:
    """Blocks from `fraction` of `room_bytes` (the memory left after weights and workspace), at most
    `cap_tokens` tokens' worth when given (CPU devices: max_seqs x max_context). The caller refuses a
    load where `num_blocks < blocks_per_sequence`."""
    per_sequence = -(-max_context // block_size)
    blocks = int(max(room_bytes, 0) * fraction) // block_bytes
    if cap_tokens is not None:
        blocks = min(blocks, max(-(-cap_tokens // block_size), per_sequence))
    return KvSizing(blocks, block_size, block_bytes, per_sequence)


class PagedKvCache:
    def __init__(self, xp, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype, max_context: int):
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.keys = [xp.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.values = [xp.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_context = max_context

    def flat_keys(self, layer: int):
        """[num_blocks * block_size, kv_heads, head_dim]: a view, indexed by slot."""
        k = self.keys[layer]
        return k.reshape(-1, k.shape[2], k.shape[3])

    def flat_values(self, layer: int):
        v = self.values[layer]
        return v.reshape(-1, v.shape[2], v.shape[3])

    @property
    def nbytes(self) -> int:
        return sum(int(t.nbytes) for t in self.keys + self.values)

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size
