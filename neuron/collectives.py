"""Collective operations across the ranks of a tensor-parallel group.

One interface, several engines: SingleRank (no group), and for groups the NCCL engine on GPUs and a
CPU engine with the same semantics so tensor parallelism runs in CI.
"""
from __future__ import annotations


class Communicator:
    rank: int = 0
    size: int = 1

    def all_reduce(self, x):
        """Sum of x over ranks, returned (x may be reused as the output)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class SingleRank(Communicator):
    def all_reduce(self, x):
        return x
