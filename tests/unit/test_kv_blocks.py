"""The KV block manager: block tables, ref counts, the prefix cache and its LRU eviction."""
from __future__ import annotations

import pytest

from neuron.engine.kv_blocks import KVBlockManager
from neuron.engine.request import Request
from neuron.sampling import SamplingConfig

BS = 4


def make_request(request_id: str, prompt: list[int], **kwargs) -> Request:
    return Request(request_id=request_id, prompt_ids=list(prompt), sampling=SamplingConfig(max_tokens=8),
                   max_context=1024, **kwargs)


def compute(manager: KVBlockManager, request: Request, num_tokens: int | None = None) -> None:
    """What a turn does: allocate for the uncomputed tokens (after a prefix lookup), compute them, cache."""
    blocks, hit = manager.get_computed_blocks(request) if not request.block_ids else ([], 0)
    todo = request.num_tokens - request.num_computed_tokens - hit if num_tokens is None else num_tokens
    assert manager.allocate(request, todo, blocks)
    request.num_computed_tokens += hit + todo
    manager.cache_full_blocks(request)


def test_allocate_covers_the_tokens_and_free_returns_every_block():
    manager = KVBlockManager(num_blocks=8, block_size=BS)
    request = make_request("a", range(10))
    assert manager.allocate(request, 10)
    assert len(request.block_ids) == 3 and len(set(request.block_ids)) == 3
    assert manager.num_free_blocks == 5
    assert manager.usage == pytest.approx(3 / 8)
    request.num_computed_tokens = 10
    assert manager.allocate(request, 2)       # 12 tokens still fit 3 blocks
    assert len(request.block_ids) == 3
    assert manager.allocate(request, 3)       # 13 tokens need a 4th
    assert len(request.block_ids) == 4
    manager.free(request)
    assert request.block_ids == []
    assert manager.num_free_blocks == 8
    assert all(manager.ref_count(b) == 0 for b in range(8))


def test_allocate_that_does_not_fit_changes_nothing():
    manager = KVBlockManager(num_blocks=4, block_size=BS)
    holder = make_request("holder", range(8))
    assert manager.allocate(holder, 8)
    request = make_request("big", range(100, 112))
    assert not manager.can_allocate(request, 12)
    assert not manager.allocate(request, 12)
    assert request.block_ids == []
    assert manager.num_free_blocks == 2
    assert manager.allocate(request, 8)


def test_second_request_with_the_same_prefix_shares_its_full_blocks():
    manager = KVBlockManager(num_blocks=16, block_size=BS)
    first = make_request("first", list(range(10)))            # blocks: [0..3] [4..7] [8, 9]
    compute(manager, first)
    second = make_request("second", list(range(8)) + [50, 51, 52])
    blocks, hit = manager.get_computed_blocks(second)
    assert blocks == first.block_ids[:2] and hit == 2 * BS
    assert manager.allocate(second, second.num_tokens - hit, blocks)
    second.num_computed_tokens = hit
    assert second.block_ids[:2] == first.block_ids[:2]
    assert second.block_ids[2] != first.block_ids[2]
    assert [manager.ref_count(b) for b in first.block_ids] == [2, 2, 1]
    shared = first.block_ids[:2]
    manager.free(first)
    assert [manager.ref_count(b) for b in shared] == [1, 1]    # still held by second: not free
    assert manager.num_free_blocks == 16 - 3
    manager.free(second)
    assert manager.num_free_blocks == 16
    assert all(manager.is_cached(b) for b in shared)           # free but still findable
    third = make_request("third", list(range(8)) + [60])
    assert manager.get_computed_blocks(third) == (shared, 8)


def test_prefix_lookup_always_leaves_the_last_token_to_compute():
    manager = KVBlockManager(num_blocks=16, block_size=BS)
    compute(manager, make_request("first", range(8)))
    same = make_request("same", range(8))
    blocks, hit = manager.get_computed_blocks(same)
    assert hit == BS and len(blocks) == 1


def test_scoring_every_position_gets_no_prefix_hit_but_last_position_scoring_does():
    manager = KVBlockManager(num_blocks=16, block_size=BS)
    compute(manager, make_request("first", range(12)))
    every = make_request("every", range(12), want_logits=True, all_positions=True)
    assert manager.get_computed_blocks(every) == ([], 0)
    last = make_request("last", range(12), want_logits=True)
    assert manager.get_computed_blocks(last)[1] == 2 * BS


def test_only_blocks_full_of_computed_tokens_are_cached():
    manager = KVBlockManager(num_blocks=16, block_size=BS)
    first = make_request("first", range(12))
    assert manager.allocate(first, 12)
    first.num_computed_tokens = 6                              # a chunk: 1.5 blocks computed
    manager.cache_full_blocks(first)
    assert [manager.is_cached(b) for b in first.block_ids] == [True, False, False]
    probe = make_request("probe", range(12))
    assert manager.get_computed_blocks(probe)[1] == BS
    first.num_computed_tokens = 12
    manager.cache_full_blocks(first)
    assert [manager.is_cached(b) for b in first.block_ids] == [True, True, True]


def test_output_tokens_are_part_of_the_cached_prefix():
    manager = KVBlockManager(num_blocks=16, block_size=BS)
    request = make_request("r", range(6))
    compute(manager, request)
    request.output_ids += [70, 71, 72]                         # decoded: tokens 0..5 + 70, 71 fill block 2
    compute(manager, request)
    assert sum(manager.is_cached(b) for b in request.block_ids) == 2
    probe = make_request("probe", list(range(6)) + [70, 71, 99])
    assert manager.get_computed_blocks(probe) == (request.block_ids[:2], 2 * BS)
    other = make_request("other", list(range(6)) + [70, 5, 99])
    assert manager.get_computed_blocks(other)[1] == BS


def test_a_different_earlier_block_means_no_hit_for_the_later_equal_one():
    manager = KVBlockManager(num_blocks=16, block_size=BS)
    compute(manager, make_request("first", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    probe = make_request("probe", [0, 2, 3, 4, 5, 6, 7, 8, 9])   # block 1 equal, block 0 not
    assert manager.get_computed_blocks(probe) == ([], 0)


def test_uncached_free_blocks_are_used_before_cached_ones_and_cached_ones_leave_least_recently_freed_first():
    manager = KVBlockManager(num_blocks=6, block_size=BS)
    older = make_request("older", range(8))                    # 2 full blocks
    newer = make_request("newer", range(100, 108))             # 2 full blocks
    compute(manager, older)
    compute(manager, newer)
    older_blocks, newer_blocks = list(older.block_ids), list(newer.block_ids)
    manager.free(older)
    manager.free(newer)

    filler = make_request("filler", range(200, 208))
    assert manager.allocate(filler, 8)                         # takes the 2 never-cached blocks
    assert not set(filler.block_ids) & set(older_blocks + newer_blocks)
    assert all(manager.is_cached(b) for b in older_blocks + newer_blocks)

    evicting = make_request("evicting", range(300, 304))
    assert manager.allocate(evicting, 4)                       # one more: the least recently freed
    assert evicting.block_ids == [older_blocks[1]]             # the older one's tail, freed first
    assert not manager.is_cached(older_blocks[1])
    assert manager.get_computed_blocks(make_request("p2", list(range(8)) + [1])) == ([older_blocks[0]], BS)
    evicting.num_computed_tokens = 4
    assert manager.allocate(evicting, 8)
    assert evicting.block_ids[1:] == [older_blocks[0], newer_blocks[1]]
    assert manager.get_computed_blocks(make_request("q2", list(range(100, 108)) + [1])) == ([newer_blocks[0]], BS)


def test_a_prefix_hit_revives_a_free_cached_block_out_of_the_free_queue():
    manager = KVBlockManager(num_blocks=4, block_size=BS)
    first = make_request("first", range(8))
    compute(manager, first)
    manager.free(first)
    second = make_request("second", list(range(8)) + [1, 2, 3, 4, 5, 6, 7, 8])   # 4 blocks, 2 hit
    blocks, hit = manager.get_computed_blocks(second)
    assert hit == 8
    assert manager.num_blocks_needed(second, 8, blocks) == 4   # 2 fresh + the 2 revived free ones
    assert manager.allocate(second, 8, blocks)
    assert second.block_ids[:2] == blocks
    assert manager.num_free_blocks == 0
    assert all(manager.ref_count(b) == 1 for b in second.block_ids)


def test_prefix_caching_off_gives_no_hits_and_caches_nothing():
    manager = KVBlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    first = make_request("first", range(12))
    compute(manager, first)
    assert not any(manager.is_cached(b) for b in first.block_ids)
    assert manager.get_computed_blocks(make_request("again", range(12))) == ([], 0)
    stats = manager.stats
    assert stats.hits == 0 and stats.queries == 24 and stats.blocks_cached == 0


def test_stats_count_queried_and_hit_tokens():
    manager = KVBlockManager(num_blocks=16, block_size=BS)
    compute(manager, make_request("first", range(10)))         # queries 10, hits 0
    compute(manager, make_request("second", range(10)))        # queries 10, hits 8
    stats = manager.stats
    assert (stats.queries, stats.hits) == (20, 8)
    assert stats.hit_rate == pytest.approx(0.4)
    assert stats.blocks_total == 16 and stats.blocks_used == 3 + 1
    assert stats.blocks_cached == 2


def test_reset_prefix_cache_forgets_free_blocks_only():
    manager = KVBlockManager(num_blocks=16, block_size=BS)
    gone = make_request("gone", range(8))
    compute(manager, gone)
    manager.free(gone)
    alive = make_request("alive", range(100, 109))
    compute(manager, alive)
    assert manager.reset_prefix_cache() == 2
    assert manager.get_computed_blocks(make_request("p", list(range(8)) + [1])) == ([], 0)
    assert manager.get_computed_blocks(make_request("q", list(range(100, 108)) + [1]))[1] == 8
    assert manager.num_free_blocks == 16 - 3


def test_the_same_prefix_computed_side_by_side_is_cached_once_and_every_block_comes_back():
    manager = KVBlockManager(num_blocks=8, block_size=BS)
    one, two = make_request("one", range(9)), make_request("two", range(9))
    for request in (one, two):                                 # both looked up before either computed
        assert manager.allocate(request, 9)
    for request in (one, two):
        request.num_computed_tokens = 9
        manager.cache_full_blocks(request)
    assert manager.stats.blocks_cached == 2
    assert sum(manager.is_cached(b) for b in one.block_ids + two.block_ids) == 2
    manager.free(one)
    manager.free(two)
    assert manager.num_free_blocks == 8
    assert manager.get_computed_blocks(make_request("probe", range(9)))[1] == 8
