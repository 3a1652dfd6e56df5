"""Shards on the neurons that no model in cortex's table holds: after a cortex restart, the models
that were loaded before it. `orphans` finds them, complete: a TP=1 shard on its own, a TP group
once every one of its ranks has been seen on the nodes that are up (rank 0 first)."""
from __future__ import annotations

from dataclasses import dataclass

from common.proto.neuron.v1 import neuron_pb2 as npb

from .registry import Node


@dataclass(frozen=True)
class Found:
    node: str
    device: str
    shard: npb.ShardSummary


def orphans(nodes: list[Node], skip: set[tuple[str, int]], skip_groups: set[str]) -> list[list[Found]]:
    """The orphaned models on these (UP) nodes, each as its ranks in rank order. skip: (node, handle)
    pairs that are someone's (a model in the table, a deferred drop); skip_groups: TP groups likewise."""
    singles: list[list[Found]] = []
    groups: dict[str, dict[int, Found]] = {}
    for node in nodes:
        for device in node.devices:
            for s in device.shards:
                if s.error or not s.model or (node.address, s.handle) in skip or s.group_id in skip_groups:
                    continue
                found = Found(node.address, device.id, s)
                if s.tp_size <= 1:
                    singles.append([found])
                else:
                    groups.setdefault(s.group_id, {})[s.tp_rank] = found
    complete = [[ranks[r] for r in range(len(ranks))] for ranks in groups.values()
                if set(ranks) == set(range(ranks[min(ranks)].shard.tp_size))]
    return singles + complete
