"""Adoption grouping without a fleet (cortex/adoption.py): which shards on the neurons are orphans,
and how they group into models: a TP=1 shard alone, a TP group only once every rank is seen, in rank
order."""
from __future__ import annotations

from cortex.adoption import orphans
from tests.unit.cortex_fakes import device, node, shard


def summary(groups):
    return [[(f.node, f.device, f.shard.handle) for f in ranks] for ranks in groups]


def test_single_shards_are_models_of_their_own():
    nodes = [node("a:1", device("0", 1, shards=[shard(1, "x"), shard(2, "y")])), node("b:1", device("0", 1, shards=[shard(3, "z")]))]
    assert summary(orphans(nodes, set(), set())) == [[("a:1", "0", 1)], [("a:1", "0", 2)], [("b:1", "0", 3)]]


def test_a_group_is_one_model_in_rank_order_across_nodes():
    g = dict(model="big", tp_size=3, group_id="big-1")
    nodes = [node("a:1", device("0", 1, shards=[shard(12, tp_rank=2, **g)]), device("1", 1, shards=[shard(10, tp_rank=0, **g)])),
             node("b:1", device("3", 1, shards=[shard(11, tp_rank=1, **g)]))]
    assert summary(orphans(nodes, set(), set())) == [[("a:1", "1", 10), ("b:1", "3", 11), ("a:1", "0", 12)]]


def test_a_group_missing_a_rank_is_not_an_orphan_yet():
    g = dict(model="big", tp_size=3, group_id="big-1")
    nodes = [node("a:1", device("0", 1, shards=[shard(10, tp_rank=0, **g), shard(12, tp_rank=2, **g)]))]
    assert orphans(nodes, set(), set()) == []
    # Ranks 1 and 2 without rank 0 are incomplete too.
    nodes = [node("a:1", device("0", 1, shards=[shard(11, tp_rank=1, **g), shard(12, tp_rank=2, **g)]))]
    assert orphans(nodes, set(), set()) == []


def test_taken_failed_and_nameless_shards_are_not_orphans():
    nodes = [node("a:1", device("0", 1, shards=[shard(1, "held"), shard(2, "broken", error="group broke"),
                                                shard(3, ""), shard(4, "grp", tp_size=2, group_id="loading-1"),
                                                shard(5, "free")]))]
    assert summary(orphans(nodes, {("a:1", 1)}, {"loading-1"})) == [[("a:1", "0", 5)]]
    # The same handle on another node is another shard.
    assert summary(orphans(nodes, {("b:1", 5)}, {"loading-1"}))[-1] == [("a:1", "0", 5)]
