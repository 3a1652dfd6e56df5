"""The KV block manager: the shard's KV cache as a pool of fixed-size blocks, the block table of each
request, and the prefix cache over full blocks.

Block ids are plain integers 0..num_blocks-1; the runner maps them to slots of its KV arrays
(slot = block_id * block_size + offset). This module only does the bookkeeping.

Prefix cache. A full block is named by hash((parent block's hash, its token ids)), so equal hashes
mean equal prefixes up to and including the block. A request whose blocks are registered leaves
them findable: when its ref count falls to 0 a cached block goes to the back of an LRU queue and is
evicted (its hash dropped) only when a fresh block is needed and no uncached free block is left.
Lookups also compare the block's token ids, so a hash collision can only confuse two blocks whose
parent hashes collide (a 64-bit collision).
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Sequence

from .request import Request

_NO_PARENT = 0x5EED  # the parent hash of a request's first block


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None              # set while registered in the prefix cache
    token_ids: tuple[int, ...] = ()      # the tokens it holds, kept while it is registered


@dataclass(frozen=True)
class KVBlockStats:
    queries: int                         # prompt tokens looked up in the prefix cache
    hits: int                            # of those, tokens found cached (not recomputed)
    blocks_total: int
    blocks_used: int                     # blocks held by at least one request
    blocks_cached: int                   # blocks registered in the prefix cache (in use or free)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVBlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # Free blocks: uncached ones are handed out first, then cached ones, least recently freed first.
        self._free_uncached: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[int, int] = {}            # block hash -> block id
        self._num_registered: dict[Request, int] = {}  # leading blocks of a request's table already hashed
        self._queries = 0
        self._hits = 0

    # -- capacity ---------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by requests (free cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def stats(self) -> KVBlockStats:
        return KVBlockStats(queries=self._queries, hits=self._hits, blocks_total=self.num_blocks,
                            blocks_used=self.num_blocks - self.num_free_blocks, blocks_cached=len(self._cached))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def is_cached(self, block_id: int) -> bool:
        return self._blocks[block_id].hash is not None

    # -- prefix cache -----------------------------------------------------------------------------

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest run of cached full blocks that match the request's tokens from the start, and
        the number of tokens they hold. The last token is always left to compute (its logits are
        what the turn samples from), and a request that wants logits at every position gets none."""
        self._queries += request.num_tokens
        if not self.enable_prefix_caching or (request.want_logits and request.all_positions):
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        # One pass hashes each block (unless hashed before: a preempted request), looks it up and
        # compares its tokens, stopping at the first miss; the blocks after it are hashed when they
        # are cached (cache_full_blocks). A burst of requests sharing a long prefix walks all of it
        # here, on the device thread between turns: two slices and calls per block cost twice this.
        found: list[int] = []
        hashes, cached, blocks = request.block_hashes, self._cached, self._blocks
        parent = _NO_PARENT
        for index in range(max_blocks):
            tokens = None
            if index < len(hashes):
                parent = hashes[index]
            else:
                tokens = self._block_tokens(request, index)
                parent = hash((parent, tokens))   # the block's name (module docstring), as _extend_hashes
                hashes.append(parent)
            block_id = cached.get(parent)
            if block_id is None:
                break
            if tokens is None:
                tokens = self._block_tokens(request, index)
            if blocks[block_id].token_ids != tokens:
                break
            found.append(block_id)
        num_hit = len(found) * self.block_size
        self._hits += num_hit
        return found, num_hit

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that are full of computed tokens (call after each turn)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        start = self._num_registered.get(request, 0)
        if num_full <= start:
            return
        self._extend_hashes(request, num_full)
        for index in range(start, num_full):
            block = self._blocks[request.block_ids[index]]
            if block.hash is not None:       # a prefix hit: registered by whoever computed it
                continue
            block_hash = request.block_hashes[index]
            if block_hash in self._cached:   # computed twice by requests running side by side
                continue                     # keep the registered copy; this one stays private
            block.hash = block_hash
            block.token_ids = self._block_tokens(request, index)
            self._cached[block_hash] = block.block_id
        self._num_registered[request] = num_full

    def reset_counters(self) -> None:
        """Zero the prefix-cache lookup counters (after the load-time warm-up, which is no traffic)."""
        self._queries = self._hits = 0

    def reset_prefix_cache(self) -> int:
        """Forget every free cached block (blocks in use keep their hashes); returns how many."""
        dropped = list(self._free_cached)
        self._free_cached.clear()
        for block_id in dropped:
            self._uncache(self._blocks[block_id])
            self._free_uncached.append(block_id)
        return len(dropped)

    def _extend_hashes(self, request: Request, num_blocks: int) -> None:
        hashes = request.block_hashes
        while len(hashes) < num_blocks:
            parent = hashes[-1] if hashes else _NO_PARENT
            hashes.append(hash((parent, self._block_tokens(request, len(hashes)))))

    def _block_tokens(self, request: Request, index: int) -> tuple[int, ...]:
        """Token ids of block `index` of the request, sliced without building all_token_ids."""
        start, end = index * self.block_size, (index + 1) * self.block_size
        prompt, num_prompt = request.prompt_ids, len(request.prompt_ids)
        if end <= num_prompt:
            return tuple(prompt[start:end])
        if start >= num_prompt:
            return tuple(request.output_ids[start - num_prompt:end - num_prompt])
        return tuple(prompt[start:]) + tuple(request.output_ids[:end - num_prompt])

    def _uncache(self, block: _Block) -> None:
        if block.hash is not None and self._cached.get(block.hash) == block.block_id:
            del self._cached[block.hash]
        block.hash = None
        block.token_ids = ()

    # -- block tables -----------------------------------------------------------------------------

    def num_blocks_needed(self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()) -> int:
        """Fresh blocks that allocate() would take from the free pool."""
        total = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        fresh = max(0, self.blocks_for(total) - len(request.block_ids) - len(computed_blocks))
        # A computed block with no holder sits in the free queue: taking it uses up a free block too.
        revived = sum(1 for block_id in computed_blocks if self._blocks[block_id].ref_count == 0)
        return fresh + revived

    def can_allocate(self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()) -> bool:
        return self.num_blocks_needed(request, num_new_tokens, computed_blocks) <= self.num_free_blocks

    def allocate(self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()) -> bool:
        """Grow request.block_ids to cover its computed tokens, the `computed_blocks` (a prefix hit
        from get_computed_blocks, only for a request that holds no blocks yet) and `num_new_tokens`
        more. Returns False, changing nothing, when the pool is short. The caller advances
        request.num_computed_tokens by the hit (len(computed_blocks) * block_size)."""
        if not computed_blocks:      # the common case (decode, next chunk): only fresh blocks
            missing = self.blocks_for(request.num_computed_tokens + num_new_tokens) - len(request.block_ids)
            if missing <= 0:         # most decode turns: the last block has room (called per request per turn)
                return True
            if missing > self.num_free_blocks:
                return False
            for _ in range(missing):
                request.block_ids.append(self._take_fresh())
            return True
        if request.block_ids or request.num_computed_tokens:
            raise ValueError(f"request {request.request_id}: computed blocks are only for a request "
                             f"that holds no blocks (it holds {len(request.block_ids)})")
        if not self.can_allocate(request, num_new_tokens, computed_blocks):
            return False
        for block_id in computed_blocks:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._free_cached[block_id]
            block.ref_count += 1
            request.block_ids.append(block_id)
        self._num_registered[request] = len(computed_blocks)   # registered by whoever computed them
        while len(request.block_ids) < self.blocks_for(len(computed_blocks) * self.block_size + num_new_tokens):
            request.block_ids.append(self._take_fresh())
        return True

    def free(self, request: Request) -> None:
        """Release the request's blocks, last block first, so that on eviction a prefix's tail goes
        before its head (the head is what other requests are likeliest to share)."""
        for block_id in reversed(request.block_ids):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self._free_cached[block_id] = None
                else:
                    self._free_uncached.append(block_id)
        request.block_ids.clear()
        self._num_registered.pop(request, None)

    def _take_fresh(self) -> int:
        if self._free_uncached:
            block_id = self._free_uncached.popleft()
        else:
            block_id, _ = self._free_cached.popitem(last=False)
            self._uncache(self._blocks[block_id])
        self._blocks[block_id].ref_count = 1
        return block_id
