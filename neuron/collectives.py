"""Collective operations across the ranks of a tensor-parallel group.

One interface, two engines: NCCL on GPUs (neuron/comm_nccl.py, the production engine) and TCP on
CPU devices (neuron/comm_tcp.py: same semantics, so tensor parallelism runs in CI, across `cpu:N`
devices of one neuron and across neuron processes). SingleRank stands in when there is no group.
"""
from __future__ import annotations

UNIQUE_ID_BYTES = 128  # NCCL's ncclUniqueId size; the TCP engine's rendezvous token uses the same field


class CollectiveError(RuntimeError):
    """A collective failed or passed its deadline: the group is unusable from here on."""


class Communicator:
    rank: int = 0
    size: int = 1

    def all_reduce(self, x):
        """Sum of x over ranks, returned (x may be reused as the output)."""
        raise NotImplementedError

    def broadcast(self, x, root: int = 0):
        raise NotImplementedError

    def all_gather(self, x):
        """Concatenation along a new leading axis of every rank's x, in rank order."""
        raise NotImplementedError

    def all_gather_into(self, out):
        """In place: out holds `size` equal pieces, this rank's piece (out[rank*n:(rank+1)*n]) is
        written; fill in the others. Allocates nothing on the NCCL engine (graph-capturable)."""
        n = out.shape[0] // self.size
        out[...] = self.all_gather(out[self.rank * n:(self.rank + 1) * n]).reshape(out.shape)

    def barrier(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """Make every pending and future collective fail fast."""

    def close(self) -> None:
        self.abort()


class SingleRank(Communicator):
    def all_reduce(self, x):
        return x

    def broadcast(self, x, root: int = 0):
        return x

    def all_gather(self, x):
        return x[None]

    def all_gather_into(self, out):
        pass

    def barrier(self) -> None:
        pass
